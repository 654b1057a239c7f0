"""Pools of server processes under real clients: many sessions sharing two processes, a
process that dies in the middle of a call, and connections dealt out to the data-plane
threads."""

from __future__ import annotations

import asyncio
import os
import re
import time
import json
import uuid

import httpx2
import mcp.types as types
import pytest
from mcp.shared.exceptions import MCPError

from conftest import MCPD
from helpers import MODES, await_until, client, run, stateless_post, text_of, wait_until

CRASHED = -32053


def test_fifty_concurrent_sessions_over_two_processes_each_get_their_own_answers(cluster):
    node = 2
    url = cluster.url(node, "pool2")
    assert cluster.metric("mcpd_pool_processes", 'server="pool2",transport="stdio",state="ready"', node) == 2
    run_id = uuid.uuid4().hex[:8]

    async def one_session(i: int) -> tuple[list[tuple[str, str]], int]:
        mode = MODES[i % 2]
        async with client(url, cluster.token, mode) as c:
            payloads = [f"{run_id}-session{i}-call{j}-{uuid.uuid4().hex}" for j in range(3)]
            # A slow call keeps both processes busy while the echoes are in flight, so the
            # sessions' calls interleave on the two processes.
            slow = asyncio.create_task(c.call_tool("sleep", {"ms": 400, "steps": 0}))
            answers = await asyncio.gather(*(c.call_tool("echo", {"message": p}) for p in payloads))
            pid = json.loads((await c.read_resource("demo://status")).contents[0].text)["pid"]
            assert text_of(await slow) == "slept 400 ms"
            return [(p, text_of(a)) for p, a in zip(payloads, answers)], pid

    async def scenario():
        return await asyncio.gather(*(one_session(i) for i in range(50)))

    results = run(scenario(), timeout=180)
    wrong = [(sent, got) for answers, _ in results for sent, got in answers if sent != got]
    assert not wrong, f"{len(wrong)} answers reached the wrong session, e.g. {wrong[:3]}"
    assert sum(len(a) for a, _ in results) == 150
    pids = {pid for _, pid in results}
    assert len(pids) == 2, f"the sessions were served by processes {pids}, expected the pool's two"


@pytest.mark.parametrize("mode", MODES)
def test_a_process_crashing_mid_call_fails_that_call_clearly_and_is_replaced(cluster, mode):
    node = 0
    url = cluster.url(node, "crashy")
    restarts = cluster.metric("mcpd_pool_restarts_total", 'server="crashy",transport="stdio"', node) or 0

    async def scenario():
        async with client(url, cluster.token, mode) as c:
            before = json.loads((await c.read_resource("demo://status")).contents[0].text)["pid"]
            with pytest.raises(MCPError) as crash:
                await c.call_tool("crash", {})
            assert crash.value.code == CRASHED, crash.value
            assert "exited while the call was in flight" in crash.value.message

            async def echo_works() -> bool:
                return text_of(await c.call_tool("echo", {"message": "again"})) == "again"

            await await_until(echo_works, 30, "a call after the crash succeeds")
            after = json.loads((await c.read_resource("demo://status")).contents[0].text)["pid"]
            assert after != before
            return before, after

    before, after = run(scenario())
    # The node replaced its own process: one more restart, and the slot is ready again.
    wait_until(
        lambda: (cluster.metric("mcpd_pool_restarts_total", 'server="crashy",transport="stdio"', node) or 0) == restarts + 1,
        30,
        "the pool counted the restart",
    )
    wait_until(
        lambda: cluster.metric("mcpd_pool_processes", 'server="crashy",transport="stdio",state="ready"', node) == 1,
        30,
        "the replacement process is ready",
    )
    assert re.search(rf"server process ready.*\bpid={before}\b", cluster.log(node))
    assert re.search(rf"server process ready.*\bpid={after}\b", cluster.log(node)), "the new process was not started by this node"


def test_a_sampling_request_never_reaches_another_session(cluster):
    """On a shared process a server's request cannot name the call that caused it. While calls
    of two sessions are in flight, the gateway refuses to guess: B's sampling is refused with a
    clear error (the fix is session_mode = dedicated), and A never sees B's prompt."""
    url = cluster.url(0, "everything")  # one process on this node, shared by both sessions
    asked: dict[str, list[str]] = {"A": [], "B": []}

    def sampler(who: str):
        async def cb(ctx, p: types.CreateMessageRequestParams) -> types.CreateMessageResult:
            asked[who].append(p.messages[0].content.text)
            return types.CreateMessageResult(
                role="assistant", content=types.TextContent(type="text", text=f"answer of {who}"), model="m"
            )

        return cb

    async def scenario():
        async with client(url, cluster.token, "legacy", sampling_callback=sampler("A")) as a, client(
            url, cluster.token, "legacy", sampling_callback=sampler("B")
        ) as b:
            started = asyncio.Event()

            async def on_progress(progress, total, message) -> None:
                started.set()

            # Session A has a call in flight on the process...
            slow = asyncio.create_task(
                a.call_tool(
                    "trigger-long-running-operation", {"duration": 4, "steps": 8}, progress_callback=on_progress
                )
            )
            await asyncio.wait_for(started.wait(), 20)
            # ...when session B's call makes the server ask for a sample.
            r = await b.call_tool("trigger-sampling-request", {"prompt": "B's private prompt"})
            await slow
            return text_of(r)

    answer = run(scenario())
    assert not any("B's private prompt" in t for t in asked["A"]), "session A was shown session B's prompt"
    assert "answer of A" not in answer, "session B got session A's answer"
    assert asked["B"] or "dedicated" in answer, f"B got neither its own sampling nor a clear refusal: {answer}"


def test_connections_are_dealt_out_to_every_data_plane_thread(cluster):
    node = 1

    def open_by_shard() -> dict[int, float]:
        found = {}
        for line in cluster.metrics(node).splitlines():
            m = re.match(r'mcpd_http_open_connections\{shard="(\d+)"\} (\S+)$', line)
            if m:
                found[int(m[1])] = float(m[2])
        return found

    shards = open_by_shard()
    assert shards, "mcpd_http_open_connections is not exported"
    if len(shards) < 2:
        pytest.skip("one CPU, so one data-plane thread: nothing to deal out")
    # Twice as many keep-alive connections as shards, each accepted in turn.
    clients = [httpx2.Client(timeout=10) for _ in range(2 * len(shards))]
    try:
        for c in clients:
            assert c.get(f"{cluster.base(node)}/livez").status_code == 200
        now = open_by_shard()
        assert sorted(now) == sorted(shards), now
        assert all(n >= 1 for n in now.values()), f"a shard was given no connection: {now}"
        assert sum(now.values()) >= len(clients), now
    finally:
        for c in clients:
            c.close()


def test_a_call_waiting_for_a_restarting_process_sleeps_until_its_timeout(cluster, tmp_path):
    """A server (one replica, one process) crashes, and its next start hangs (its command
    sleeps instead of starting once a flag file exists) until its 20 s start timeout. A call
    made meanwhile, with a 3 s request timeout, waits for a process and ends with "no running
    process" once those 3 s are out; the node sleeps while it waits (its CPU time over the
    call is a small part of the call's length), instead of polling for a process without
    end, which held the call (and its thread) until the start gave up."""
    name = f"hangs-{uuid.uuid4().hex[:6]}"
    flag = tmp_path / "started-once"
    once = f'test -e "{flag}" && exec sleep 60; touch "{flag}"; exec {MCPD} demo-server'
    cluster.put_server({"name": name, "command": "sh", "args": ["-c", once], "replicas": 1, "pool_size": 1,
                        "timeouts": {"startup_ms": 20_000, "request_ms": 3_000}})
    try:
        home = cluster.node_with(name, "ready")
        url = cluster.url(home, name)
        r = stateless_post(url, cluster.token, "tools/call", {"name": "crash", "arguments": {}}, name="crash")
        assert "error" in r.json(), r.text

        def restarting() -> bool:
            status = json.loads(cluster.mcpctl("server", "status", name, "-o", "json"))
            return any(p in ("restarting", "starting") for rep in status["replicas"] for p in rep["processes"])

        wait_until(restarting, 30, f"{name} starting again")

        def cpu_seconds() -> float:
            with open(f"/proc/{cluster.pid(home)}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

        cpu, began = cpu_seconds(), time.monotonic()
        r = stateless_post(url, cluster.token, "tools/call", {"name": "echo", "arguments": {"message": "hi"}},
                           name="echo", timeout=60)
        took, used = time.monotonic() - began, cpu_seconds() - cpu
        assert "no running process" in r.json().get("error", {}).get("message", ""), r.text
        assert used < took / 2, f"the node used {used:.2f} s of CPU in a call of {took:.2f} s"
    finally:
        cluster.mcpctl_result("server", "rm", name)
