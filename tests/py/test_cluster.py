"""The data plane follows the replicated registry: a server registered through one node is
served by every node, without restarting anything."""

from __future__ import annotations

import pytest

from conftest import MCPD
from helpers import MODES, await_until, client, run, text_of, wait_until


def is_running_mcpd(pid: int) -> bool:
    """Whether `pid` is still a live mcpd process (not exited, not a zombie, not reused)."""
    try:
        cmdline = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z" and bool(cmdline) and cmdline[0].endswith(b"mcpd")


@pytest.mark.parametrize("mode", MODES)
def test_a_server_added_on_one_node_appears_on_another_nodes_aggregate(cluster, mode):
    name = "late-legacy" if mode == "legacy" else "late-stateless"
    pids = [cluster.pid(n) for n in range(3)]

    async def names(c) -> set[str]:
        return {t.name for t in (await c.list_tools(cache_mode="bypass")).tools}

    async def scenario():
        # A session on node 3, open before the server exists, and kept open throughout.
        async with client(cluster.url(2), cluster.token, mode) as c:
            assert f"{name}__echo" not in await names(c)
            cluster.add_server(name, [MCPD, "demo-server"], pool_size=1, node=0)

            async def listed() -> bool:
                return f"{name}__echo" in await names(c)

            await await_until(listed, 60, f"{name}__echo on node 3's /mcp")
            r = await c.call_tool(f"{name}__echo", {"message": "served by node 3"})
            assert text_of(r) == "served by node 3"

            # Removed through node 2: gone from node 3 too.
            cluster.mcpctl("server", "rm", name, node=1)

            async def gone() -> bool:
                return not [t for t in await names(c) if t.startswith(f"{name}__")]

            await await_until(gone, 60, f"{name}__* gone from node 3's /mcp")

    run(scenario())
    # Nothing was restarted: the node processes that served before are the ones still running.
    assert [p for p in pids if not is_running_mcpd(p)] == []
    for n in range(3):
        wait_until(lambda: cluster.metric("mcpd_pool_processes", 'server="demo",transport="stdio",state="ready"', n), 10, "node alive")
