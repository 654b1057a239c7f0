"""Backup and disaster recovery: `mcpctl snapshot save`, `status` and `restore`.

The runbook (deploy/README.md, "Backup and restore") as tests: a cluster is backed up, loses
every node's data, and is restored onto three new data directories with new node ids; what was
acknowledged before the snapshot is there, the old tokens work, and the sealed secrets open. A
corrupted file, reused node ids, a wrong data key and an audit trail rewritten without the
key are each refused, saying which.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

from conftest import CA_DIR, MCPD, ROOT, VENV_BIN, Cluster, start_cluster, unused_addr
from helpers import rewrite_audit_trail, stateless_post, wait_until

HOG = ROOT / "tests/py/servers/hog.py"
SECRET = "s3cret-that-only-the-data-key-opens"


def tenants(c: Cluster) -> set[str]:
    return {t["spec"]["name"] for t in json.loads(c.mcpctl("tenant", "list", "-o", "json"))}


def lay_out(c: Cluster, snapshot: Path, id: int, members: dict[int, tuple[str, str]]) -> None:
    """`mcpctl snapshot restore` of node `id` of a new cluster, then the CA and the data key
    into its TLS directory, as the runbook says."""
    data = c.dir / f"node{id}" / "data"
    flags = [f"--member={i}={h},{g}" for i, (h, g) in members.items()]
    c.mcpctl("snapshot", "restore", str(snapshot), "--data-dir", str(data), "--id", str(id), *flags)
    tls = data / "tls"
    tls.mkdir(mode=0o700)
    for f in ("ca.pem", "ca.key", "data.key"):
        shutil.copy(CA_DIR / f, tls / f)


def restore_onto(snapshot: Path, dir: Path, ids: list[int], name: str) -> tuple[Cluster, list[tuple[str, str]]]:
    """Lays out a new cluster of `ids` from `snapshot`; returns it and each node's (HTTP, gRPC)."""
    addrs = {i: (unused_addr(), unused_addr()) for i in ids}
    c = Cluster(name, dir, len(ids), [])
    c.ids = ids
    for i in ids:
        lay_out(c, snapshot, i, addrs)
    c.endpoints = [f"https://{addrs[i][0]}" for i in ids]
    return c, [addrs[i] for i in ids]


def test_a_cluster_restored_from_a_snapshot_holds_every_acknowledged_write(tmp_path_factory):
    # A cluster with tenants, a tenant's token and a server whose env holds a sealed secret.
    src = start_cluster(tmp_path_factory, "snap-src", 3)
    backup = tmp_path_factory.mktemp("backup") / "registry.snapshot"
    try:
        for i in range(20):
            src.mcpctl("tenant", "add", f"team-{i}")
        src.mcpctl("server", "add", "envy", "--pool-size", "1", "--env", f"SECRET={SECRET}", "--",
                   str(VENV_BIN / "python"), str(HOG))
        src.wait_tools("envy", ["getenv"])
        last_ack = json.loads(src.mcpctl("tenant", "add", "last-before-snapshot", "-o", "json"))["revision"]

        header = json.loads(src.mcpctl("snapshot", "save", str(backup), "-o", "json"))
        assert header["leader"], f"the snapshot is the leader's: {header}"
        assert header["revision"] >= last_ack, f"revision {last_ack} was acknowledged before {header}"
        assert json.loads(src.mcpctl("snapshot", "status", str(backup), "-o", "json")) == header
        assert backup.stat().st_mode & 0o777 == 0o600, "a backup holds token hashes and sealed secrets"
        assert not Path(f"{backup}.part").exists()
        src.mcpctl("tenant", "add", "after-snapshot")
        token, admin = src.token, src.admin_token
    finally:
        src.down()
    # Every node's data is lost.
    shutil.rmtree(src.dir)

    dst, addrs = restore_onto(backup, tmp_path_factory.mktemp("snap-dst"), [4, 5, 6], "snap-dst")
    dst.admin_token = admin
    dst.token = token
    try:
        for n in range(3):
            dst.restart(n, at=addrs[n])
        assert wait_until(lambda: dst.leader() is not None, 30, "the restored cluster elects a leader") is not None

        # The old admin token works, every write acknowledged before the snapshot is there,
        # and the one after it is not.
        names = tenants(dst)
        assert {f"team-{i}" for i in range(20)} | {"last-before-snapshot"} <= names
        assert "after-snapshot" not in names
        status = json.loads(dst.mcpctl("cluster", "status", "-o", "json"))
        assert sorted(m["id"] for m in status["members"]) == [4, 5, 6]

        # The tenant token still calls MCP, and the server's sealed secret opened.
        dst.wait_tools("envy", ["getenv"], token=token)
        r = stateless_post(dst.url(0, "envy"), token, "tools/call",
                           {"name": "getenv", "arguments": {"name": "SECRET"}}, name="getenv", timeout=60)
        assert r.json()["result"]["content"][0]["text"] == SECRET, r.text

        # The restored cluster takes writes.
        dst.mcpctl("tenant", "add", "after-restore")
        assert "after-restore" in tenants(dst)
    finally:
        dst.down()


def start_mcpd_once(data: Path, id: int) -> subprocess.CompletedProcess:
    """Starts mcpd on `data`, expecting it to refuse to start."""
    return subprocess.run(
        [str(MCPD), "--id", str(id), "--data-dir", str(data), "--http-addr", unused_addr(),
         "--grpc-addr", unused_addr()],
        capture_output=True, text=True, timeout=60,
    )


def test_a_corrupted_snapshot_reused_ids_or_a_wrong_data_key_are_refused(tmp_path_factory):
    src = start_cluster(tmp_path_factory, "snap-bad", 1)
    work = tmp_path_factory.mktemp("snap-bad-files")
    backup = work / "registry.snapshot"
    try:
        src.mcpctl("server", "add", "sealed", "--env", f"SECRET={SECRET}", "--", "/bin/true")
        src.mcpctl("snapshot", "save", str(backup))
        # Never over an existing file.
        again = src.mcpctl_result("snapshot", "save", str(backup))
        assert again.returncode != 0 and "exists" in again.stderr, again
    finally:
        src.down()

    # A flipped byte in the middle of the state.
    corrupted = work / "corrupted.snapshot"
    raw = bytearray(backup.read_bytes())
    raw[len(raw) // 2 + 40] ^= 0x20
    corrupted.write_bytes(raw)
    r = src.mcpctl_result("snapshot", "status", str(corrupted))
    assert r.returncode == 1 and "corrupted" in r.stderr, r
    r = src.mcpctl_result("snapshot", "restore", str(corrupted), "--data-dir", str(work / "d1"),
                          "--id", "2", "--member", "2=127.0.0.1:1,127.0.0.1:2")
    assert r.returncode == 1 and "corrupted" in r.stderr, r
    assert not (work / "d1").exists(), "a refused restore leaves nothing behind"

    # A truncated download.
    truncated = work / "truncated.snapshot"
    truncated.write_bytes(backup.read_bytes()[:-10])
    r = src.mcpctl_result("snapshot", "status", str(truncated))
    assert r.returncode == 1 and "truncated" in r.stderr, r

    # Node 1 was a member of the snapshot's cluster: a restored cluster takes new ids.
    r = src.mcpctl_result("snapshot", "restore", str(backup), "--data-dir", str(work / "d2"),
                          "--id", "1", "--member", "1=127.0.0.1:1,127.0.0.1:2")
    assert r.returncode == 2 and "new ids (2 and up)" in r.stderr, r

    # Another cluster's data key does not open the snapshot's secrets: mcpd says so and stops.
    data = work / "d3"
    src.mcpctl("snapshot", "restore", str(backup), "--data-dir", str(data), "--id", "2",
               "--member", "2=127.0.0.1:1,127.0.0.1:2")
    other_ca = work / "other-ca"
    src.mcpctl("cluster", "ca", "create", "--dir", str(other_ca), "--cluster-id", "elsewhere")
    (data / "tls").mkdir(mode=0o700)
    for f in ("ca.pem", "ca.key"):
        shutil.copy(CA_DIR / f, data / "tls" / f)
    shutil.copy(other_ca / "data.key", data / "tls" / "data.key")
    r = start_mcpd_once(data, 2)
    assert r.returncode != 0 and "do not open with this node's data key" in r.stdout + r.stderr, r

    # The copy in the data directory is checked again at the start.
    shutil.copy(CA_DIR / "data.key", data / "tls" / "data.key")
    (data / "restore.snapshot").write_bytes(raw)
    r = start_mcpd_once(data, 2)
    assert r.returncode != 0 and "corrupted" in r.stdout + r.stderr, r

    # A backup whose audit trail was rewritten by someone without the data key (the hash chain
    # and the file's checksum made to hold) is refused, and so is one whose MACs were taken off.
    def rewritten(name: str, rewrite) -> Path:
        magic, header, state = backup.read_bytes().split(b"\n", 2)
        sm = json.loads(state)
        sm["state"]["audit"] = rewrite(sm["state"]["audit"])
        sm["state"]["audit_head"] = sm["state"]["audit"][-1]["hash"]
        body = json.dumps(sm, separators=(",", ":")).encode()
        head = json.loads(header)
        head.update(data_bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
        out = work / f"{name}.snapshot"
        out.write_bytes(magic + b"\n" + json.dumps(head).encode() + b"\n" + body)
        return out

    def forged(trail: list[dict]) -> list[dict]:
        edited = [*trail[:-1], {**trail[-1], "actor": {**trail[-1]["actor"], "token_id": "someone-else"}}]
        return rewrite_audit_trail(edited, len(edited) - 1)

    for name, rewrite, said in [
        ("forged", forged, "its MAC does not match"),
        ("stripped", lambda t: [{k: v for k, v in e.items() if k != "mac"} for e in t], "carry no MAC"),
    ]:
        data = work / f"d-{name}"
        src.mcpctl("snapshot", "restore", str(rewritten(name, rewrite)), "--data-dir", str(data), "--id", "2",
                   "--member", "2=127.0.0.1:1,127.0.0.1:2")
        (data / "tls").mkdir(mode=0o700)
        for f in ("ca.pem", "ca.key", "data.key"):
            shutil.copy(CA_DIR / f, data / "tls" / f)
        r = start_mcpd_once(data, 2)
        out = r.stdout + r.stderr
        assert r.returncode != 0 and "audit trail does not check" in out and said in out, out[-2000:]


def test_a_learner_becomes_a_new_cluster_after_its_voters_are_lost(tmp_path_factory):
    main = start_cluster(tmp_path_factory, "dr-main", 3)
    try:
        # A standby site: node 4, a learner (it votes in nothing, it holds everything).
        standby = Cluster("dr-standby", main.dir, 1, [])
        standby.ids = [4]
        http, grpc = unused_addr(), unused_addr()
        data = standby.node_dir(0) / "data"
        (data / "tls").mkdir(parents=True, mode=0o700)
        for f in ("ca.pem", "ca.key", "data.key"):
            shutil.copy(CA_DIR / f, data / "tls" / f)
        standby.restart(0, at=(http, grpc))
        main.mcpctl("cluster", "add-node", "--id", "4", "--http", http, "--grpc", grpc, "--learner")
        # The change is in the audit trail, with who asked for it and from where.
        trail = json.loads(main.mcpctl("audit", "list", "--since", "0", "--kind", "change_membership", "-o", "json"))
        [added] = trail
        assert added["object"] == "node 4", added
        assert added["detail"] == {"change": "add", "http_addr": http, "grpc_addr": grpc, "voter": False}, added
        assert added["actor"]["role"] == "cluster-admin" and added["from"].startswith("127.0.0.1:"), added
        standby.endpoints = [f"https://{http}"]
        standby.admin_token = main.admin_token

        for i in range(10):
            main.mcpctl("tenant", "add", f"site-{i}")
        last = json.loads(main.mcpctl("tenant", "add", "last-before-loss", "-o", "json"))["revision"]
        local_revision = lambda: json.loads(standby.mcpctl("cluster", "status", "-o", "json"))["revision"]
        wait_until(lambda: local_revision() >= last, 30, "the learner applied every write")

        # While the voters are up, the learner is not promoted away from them.
        r = standby.mcpctl_result("cluster", "promote", "--force-new-cluster")
        assert r.returncode != 0 and "still answer" in r.stderr, r

        # The main site is lost.
        for n in range(3):
            main.kill(n)
        promoted = json.loads(standby.mcpctl("cluster", "promote", "--force-new-cluster", "-o", "json"))
        assert promoted["node"] == 4 and promoted["revision"] >= last, promoted

        status = json.loads(standby.mcpctl("cluster", "status", "-o", "json"))
        assert status["leader"] == 4 and [m["id"] for m in status["members"]] == [4], status
        assert {f"site-{i}" for i in range(10)} | {"last-before-loss"} <= tenants(standby)
        standby.mcpctl("tenant", "add", "after-promotion")
        assert "after-promotion" in tenants(standby)
        # Its old log is set aside, not deleted.
        assert (data / "raft-log.redb.before-force-new-cluster").exists()
    finally:
        main.down()


def test_members_restored_with_different_member_lists_form_no_cluster_until_one_list(tmp_path_factory):
    src = start_cluster(tmp_path_factory, "snap-lists", 1)
    backup = tmp_path_factory.mktemp("snap-lists-backup") / "registry.snapshot"
    try:
        src.mcpctl("tenant", "add", "before-the-backup")
        src.mcpctl("snapshot", "save", str(backup))
        admin = src.admin_token
    finally:
        src.down()

    ids = [4, 5, 6]
    addrs = {i: (unused_addr(), unused_addr()) for i in ids}
    c = Cluster("snap-lists-dst", tmp_path_factory.mktemp("snap-lists-dst"), 3, [])
    c.ids, c.admin_token = ids, admin
    c.endpoints = [f"https://{addrs[i][0]}" for i in ids]
    # Node 6's restore was given node 5 at another HTTP address (a typo).
    typo = {**addrs, 5: (unused_addr(), addrs[5][1])}
    for i in ids:
        lay_out(c, backup, i, typo if i == 6 else addrs)
    try:
        # The odd one first: once it answers, the others see that it differs.
        for n in (2, 0, 1):
            c.restart(n, at=addrs[ids[n]])
        # Every node says why it does not stand, and none leads.
        for n in range(3):
            wait_until(lambda: "another member list or snapshot" in c.log(n), 30, f"node {ids[n]} refuses to stand")
        assert all(json.loads(c.mcpctl("cluster", "status", "-o", "json", node=n))["leader"] is None
                   for n in range(3))

        # The operator restores node 6 again with the one list: the cluster forms.
        c.kill(2)
        shutil.rmtree(c.node_dir(2) / "data")
        lay_out(c, backup, 6, addrs)
        c.restart(2, at=addrs[6])
        wait_until(lambda: c.leader() is not None, 30, "the restored cluster elects a leader")
        assert "before-the-backup" in tenants(c)
    finally:
        c.down()
