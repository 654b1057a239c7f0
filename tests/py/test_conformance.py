"""The MCP conformance suite (@modelcontextprotocol/conformance, pinned in tests/py/npm) against
`/servers/demo/mcp`, under the Node 22 of .tools/npm: the 0.1.16 line with every server
scenario (`--suite all`), and the 0.2 line (0.2.0-alpha.12, `conformance-next`) with exactly
the scenarios each of 2025-11-25 and 2026-07-28 requires (`--requirements`), against a demo
server fronted as a stdio server and as an HTTP upstream.

The suite cannot send an Authorization header, so it talks to a local proxy that adds the
tenant token (authproxy.py); HTTPS on both of the proxy's sides, so the suite runs through
TLS end to end. Scenarios expected to fail are listed, with their reasons, in
conformance-expected-failures.yml; the suite fails the run on any other failure and on a
listed scenario that passes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from authproxy import AuthProxy
from conftest import CA_DIR, DEMO_TOOLS, MCPD, NODE22, NPM, own_server_as_remote

SUITE = NPM / "@modelcontextprotocol/conformance/dist/index.js"
EXPECTED = Path(__file__).with_name("conformance-expected-failures.yml")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def server_scenarios() -> list[str]:
    """Every server scenario the suite knows (`conformance list`)."""
    out = subprocess.run([str(NODE22), str(SUITE), "list"], capture_output=True, text=True, timeout=60).stdout
    section = ANSI.sub("", out).split("Server scenarios", 1)[1].split("Client scenarios", 1)[0]
    return re.findall(r"^\s+- (\S+)", section, re.M)


def test_mcp_conformance_suite_passes_every_server_scenario_on_servers_demo(cluster, tmp_path):
    scenarios = server_scenarios()
    assert len(scenarios) >= 30, scenarios
    with AuthProxy(cluster.base(0), cluster.token, CA_DIR) as proxy:
        r = subprocess.run(
            [
                str(NODE22),
                str(SUITE),
                "server",
                "--url",
                proxy.url_for("/servers/demo/mcp"),
                "--suite",
                "all",
                "--expected-failures",
                str(EXPECTED),
                "--output-dir",
                str(tmp_path / "results"),
            ],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
        )
        assert proxy.requests > 0
    out = ANSI.sub("", r.stdout)
    summary = out[out.find("=== SUMMARY ===") :] if "=== SUMMARY ===" in out else out[-4000:]
    print(summary)
    assert r.returncode == 0, f"conformance suite failed ({r.returncode}):\n{summary}\n{r.stderr[-3000:]}"
    ran = set(re.findall(r"^[✓✗] (\S+):", summary, re.M))
    assert ran == set(scenarios), f"scenarios not run: {set(scenarios) - ran}"
    assert re.search(r"^Total: \d+ passed, \d+ failed", summary, re.M), summary


# The 0.2 line of the suite, run as a spec revision requires it (`--requirements`): exactly the
# scenarios the revision requires, at its wire (2026-07-28: stateless, `_meta`,
# `input_required` results). Its expected failures are listed per revision.
NEXT = NPM / "conformance-next/dist/index.js"
REVISIONS = ["2025-11-25", "2026-07-28"]


@pytest.fixture(params=["stdio", "http"])
def conformance_demo(request, cluster):
    """A demo server of the run's own: the suite leaves rounds of questions unanswered on
    purpose, and their calls, parked for the retry that never comes, go with the server
    instead of staying on the processes other tests share. Fronted as a stdio server, and
    as an HTTP upstream (that server's `/servers/conformance/mcp`, registered again as a
    remote server the nodes speak 2026-07-28 to), where the suite must count the same."""
    cluster.add_server("conformance", [MCPD, "demo-server"])
    try:
        cluster.wait_tools("conformance", DEMO_TOOLS)
        if request.param == "stdio":
            yield "/servers/conformance/mcp"
        else:
            for name in own_server_as_remote(cluster, "conformance-http", "conformance", DEMO_TOOLS[0]):
                yield f"/servers/{name}/mcp"
    finally:
        cluster.mcpctl("server", "rm", "conformance")


@pytest.mark.parametrize("revision", REVISIONS)
def test_conformance_suite_next_passes_what_each_revision_requires_on_a_demo_server(
    cluster, conformance_demo, tmp_path, revision
):
    expected = Path(__file__).with_name(f"conformance-next-expected-failures-{revision}.yml")
    with AuthProxy(cluster.base(0), cluster.token, CA_DIR) as proxy:
        r = subprocess.run(
            [str(NODE22), str(NEXT), "server", "--url", proxy.url_for(conformance_demo),
             "--requirements", revision, "--expected-failures", str(expected),
             "--output-dir", str(tmp_path / "results")],
            capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )
        assert proxy.requests > 0
    out = ANSI.sub("", r.stdout)
    summary = out[out.find("=== SUMMARY ===") :] if "=== SUMMARY ===" in out else out[-6000:]
    print(summary)
    assert r.returncode == 0, f"conformance suite {revision} failed ({r.returncode}):\n{summary}\n{r.stderr[-3000:]}"
