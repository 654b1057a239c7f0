"""Limits that hold under abuse, each tried as an abuser would, on a node with small limits:
slow headers, too many connections, too many sessions, an oversized session id, subscription
and setLevel spam, calls left waiting for input and answers given ahead of the questions. Each excess gets its clear error, the node stays up, and other tenants (and
other connections) are served. DELETE of a session ends it on every node."""

from __future__ import annotations

import json
import socket
import ssl
import time
from pathlib import Path

import httpx2
import pytest

from conftest import CA_CERT, MCPD, VENV_BIN, Cluster, start_cluster
from helpers import end_session, legacy_initialize, legacy_post, stateless_post, stateless_tool_names, wait_until

HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 12
MAX_SESSIONS = 5
MAX_PARKED = 1
MAX_ANSWERS_AHEAD = 2
MAX_INPUT_QUESTIONS = 2
QUESTIONS = Path(__file__).resolve().parent / "servers/questions.py"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Cluster:
    config = tmp_path_factory.mktemp("limits-config") / "mcpd.toml"
    config.write_text(
        f"[mcp]\nmax_parked_calls_per_caller = {MAX_PARKED}\nmax_answers_ahead = {MAX_ANSWERS_AHEAD}\n"
        f"[pool]\nmax_input_questions = {MAX_INPUT_QUESTIONS}\n"
    )
    c = start_cluster(
        tmp_path_factory,
        "limits",
        1,
        [
            f"--config={config}",
            f"--header-read-timeout-ms={int(HEADER_TIMEOUT_S * 1000)}",
            f"--max-connections={MAX_CONNECTIONS}",
            f"--max-sessions-per-tenant={MAX_SESSIONS}",
            f"--body-read-timeout-ms={int(BODY_TIMEOUT_S * 1000)}",
        ],
    )
    try:
        # A server's question is attributed to its call only while that call is alone on its
        # process: a process for each call these tests leave parked at once, and one more.
        c.add_server("asks", [MCPD, "demo-server"], pool_size=MAX_PARKED + 2)
        yield c
    finally:
        c.down()


def addr(c: Cluster) -> tuple[str, int]:
    host, port = c.base(0).removeprefix("https://").rsplit(":", 1)
    return host, int(port)


def tls_socket(c: Cluster) -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(CA_CERT))
    return ctx.wrap_socket(socket.create_connection(addr(c), timeout=10), server_hostname=addr(c)[0])


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the peer closes `sock` within `seconds` (reads until EOF or error)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            if sock.recv(4096) == b"":
                return True
        except (TimeoutError, socket.timeout):
            return False
        except (ConnectionError, ssl.SSLError, OSError):
            return True
    return False


def ready(c: Cluster) -> bool:
    return httpx2.get(f"{c.base(0)}/readyz", timeout=5).status_code == 200


def counted(c: Cluster, metric: str, labels: str, before: float, what: str) -> None:
    """Waits until `metric{labels}` on node 0 has grown past `before`."""
    wait_until(lambda: (c.metric(metric, labels) or 0) > before, 10, what)


def test_a_client_that_sends_its_headers_slowly_is_cut_off(small):
    before = small.metric("mcpd_http_connections_closed_total", 'reason="header_read_timeout"') or 0
    slow = tls_socket(small)
    slow.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    # One header line every 300 ms: each arrives in time, the whole never does.
    deadline = time.monotonic() + 5 * HEADER_TIMEOUT_S
    cut = False
    for i in range(int(5 * HEADER_TIMEOUT_S / 0.3)):
        try:
            slow.sendall(f"X-Slow-{i}: x\r\n".encode())
        except (ConnectionError, ssl.SSLError, OSError):
            cut = True
            break
        if closed_within(slow, 0.3):
            cut = True
            break
    assert cut and time.monotonic() < deadline, "a slowloris connection stayed open"
    assert ready(small), "the node stopped serving"
    counted(small, "mcpd_http_connections_closed_total", 'reason="header_read_timeout"', before, "the cut connection counted")


def test_a_body_that_never_arrives_whole_is_cut_off(small):
    before = small.metric("mcpd_http_body_timeouts_total", "") or 0
    slow = tls_socket(small)
    head = (
        "POST /servers/demo/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {small.token}\r\nContent-Type: application/json\r\n"
        "Accept: application/json, text/event-stream\r\nContent-Length: 1000\r\n\r\n"
    )
    slow.sendall(head.encode() + b'{"jsonrpc":')
    # The rest never comes: within a few times the bound the node answers 4xx and closes.
    slow.settimeout(5 * BODY_TIMEOUT_S)
    answer = b""
    try:
        while chunk := slow.recv(4096):
            answer += chunk
    except (TimeoutError, socket.timeout):
        pytest.fail(f"the connection was held past {5 * BODY_TIMEOUT_S} s: {answer!r}")
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else None
    assert status is None or 400 <= status < 500, answer
    assert ready(small)
    counted(small, "mcpd_http_body_timeouts_total", "", before, "the slow body counted")


def response_head(sock: ssl.SSLSocket) -> tuple[int, dict[str, str]]:
    """The status and headers (lower-cased names) of the response that `sock` receives."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a whole response head: {data!r}"
        data += chunk
    lines = data.split(b"\r\n\r\n", 1)[0].decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split(" ", 2)[1]), headers


def test_a_refusal_given_before_the_body_arrived_tells_the_client_to_reconnect(small):
    """A 401 answered before the request's body arrived: hyper cannot keep that connection, so
    the answer says so, and the client's next request (the OAuth client's metadata fetch) goes
    on a new connection instead of being lost to a reset."""
    before = small.metric("mcpd_http_connections_closed_total", 'reason="unread_body"') or 0
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "ping"}).encode()
    sock = tls_socket(small)
    try:
        sock.sendall(
            (
                "POST /servers/demo/mcp HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Accept: application/json, text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
            ).encode()
        )
        # The body is held back until the answer is in.
        status, headers = response_head(sock)
    finally:
        sock.close()
    assert status == 401, headers
    assert headers.get("connection") == "close", headers
    counted(small, "mcpd_http_connections_closed_total", 'reason="unread_body"', before, "the closed connection counted")
    # A request whose body was read keeps its connection.
    r = legacy_post(small.url(0, "demo"), small.token, INITIALIZE)
    assert r.status_code == 200, r.text
    end_session(small.url(0, "demo"), small.token, r.headers["mcp-session-id"])
    assert r.headers.get("connection") != "close", r.headers


def test_connections_past_the_cap_are_closed_at_once_not_queued(small):
    before = small.metric("mcpd_http_connections_refused_total", 'reason="max_connections"') or 0
    # Plain TCP connections that never start TLS hold their places until the handshake
    # timeout; open them all, then one more.
    held = [socket.create_connection(addr(small), timeout=5) for _ in range(MAX_CONNECTIONS)]
    try:
        extra = socket.create_connection(addr(small), timeout=5)
        assert closed_within(extra, HEADER_TIMEOUT_S / 2), "the connection past the cap was queued"
        extra.close()
    finally:
        for s in held:
            s.close()
    # Once they are gone, the node serves again, and the refusal was counted.
    wait_until(lambda: ready(small) or None, 10, "the node to serve again")
    after = small.metric("mcpd_http_connections_refused_total", 'reason="max_connections"') or 0
    assert after > before


def test_sessions_past_the_tenant_cap_get_429_and_other_tenants_are_served(small):
    url = small.url(0, "demo")
    sessions = [legacy_initialize(url, small.token) for _ in range(MAX_SESSIONS)]
    try:
        r = legacy_post(url, small.token, INITIALIZE)
        assert r.status_code == 429, r.text
        assert r.headers.get("retry-after"), r.headers
        assert "mcp.max_sessions_per_tenant" in r.json()["error"]["message"]
        # Another tenant is served.
        small.mcpctl("tenant", "add", "other")
        other = small.mcpctl("token", "create", "--tenant", "other", "--name", "o").strip()
        end_session(url, other, legacy_initialize(url, other))
        # Ending one frees its place.
        end_session(url, small.token, sessions.pop(0))
        sessions.append(legacy_initialize(url, small.token))
    finally:
        # The module's other tests open sessions of this tenant too.
        for sid in sessions:
            end_session(url, small.token, sid)


INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}},
}


def test_an_oversized_client_info_is_refused_naming_the_field(small):
    big = json.loads(json.dumps(INITIALIZE))
    big["params"]["clientInfo"]["padding"] = "x" * 300_000
    r = legacy_post(small.url(0, "demo"), small.token, big)
    assert r.status_code == 400, r.text
    assert "params.clientInfo" in r.json()["error"]["message"]
    assert "mcp.max_session_info_bytes" in r.json()["error"]["message"]
    assert ready(small)


def revision(c: Cluster) -> int:
    return json.loads(c.mcpctl("cluster", "status", "-o", "json"))["revision"]


def test_subscription_and_set_level_spam_costs_a_bounded_number_of_raft_writes(cluster):
    url = cluster.url(0, "demo")
    sid = legacy_initialize(url, cluster.token)

    def call(method: str, params: dict, i: int) -> dict:
        r = legacy_post(url, cluster.token, {"jsonrpc": "2.0", "id": i, "method": method, "params": params}, session=sid)
        assert r.status_code == 200, r.text
        return r.json()

    start = revision(cluster)
    began = time.monotonic()
    for i in range(200):
        assert "error" not in call("logging/setLevel", {"level": ["debug", "info"][i % 2]}, i)
    spent = time.monotonic() - began
    # One write at once, then at most one per second (mcp.session_state_interval_ms) while
    # the loop ran, and one after it: far fewer than the 200 calls.
    wait_until(lambda: revision(cluster) > start or None, 10, "the level replicated")
    bound = 2 + int(spent) + 1 + 2  # + 2: a placement or other session may write meanwhile
    assert revision(cluster) - start <= bound, (revision(cluster) - start, bound)

    # Subscriptions: a URI past the length limit, and more than the per-session cap.
    r = call("resources/subscribe", {"uri": "demo://" + "x" * 3000}, 1000)
    assert "params.uri" in r["error"]["message"] and "mcp.max_uri_bytes" in r["error"]["message"], r
    # A URI no server has: its server refuses it, and the node keeps (and replicates) nothing,
    # so 300 of them use up none of the per-session cap below.
    for i in range(300):
        r = call("resources/subscribe", {"uri": f"demo://nothing/{i}"}, 1500 + i)
        assert r.get("error", {}).get("code") == -32002, r
    refused = None
    for i in range(300):
        r = call("resources/subscribe", {"uri": f"test://template/{i}/data"}, 2000 + i)
        if "error" in r and "mcp.max_subscriptions_per_session" in r["error"]["message"]:
            refused = i
            break
    assert refused == 256, refused


def test_deleting_a_session_ends_it_on_every_node(cluster):
    url0, url1 = cluster.url(0, "demo"), cluster.url(1, "demo")
    sid = legacy_initialize(url0, cluster.token)
    ping = {"jsonrpc": "2.0", "id": 1, "method": "ping"}
    # Node 1 continues it (and caches it) before the end.
    assert legacy_post(url1, cluster.token, ping, session=sid).status_code == 200
    r = httpx2.delete(url0, headers={"Authorization": f"Bearer {cluster.token}", "Mcp-Session-Id": sid}, timeout=10)
    assert r.status_code == 200, r.text
    wait_until(
        lambda: legacy_post(url1, cluster.token, ping, session=sid).status_code == 404 or None,
        10,
        "node 1 to refuse the ended session",
    )
    assert legacy_post(cluster.url(2, "demo"), cluster.token, ping, session=sid).status_code == 404


def test_sse_streams_past_the_per_session_cap_get_429(small):
    url = small.url(0, "demo")
    sid = legacy_initialize(url, small.token)
    headers = {"Authorization": f"Bearer {small.token}", "Accept": "text/event-stream", "Mcp-Session-Id": sid}
    max_streams = 4  # mcp.max_streams_per_session's default
    with httpx2.Client(timeout=10) as client:
        streams = [client.stream("GET", url, headers=headers) for _ in range(max_streams)]
        opened = [s.__enter__() for s in streams]
        try:
            assert all(r.status_code == 200 for r in opened), [r.status_code for r in opened]
            r = client.get(url, headers=headers)
            assert r.status_code == 429, r.text
            assert "mcp.max_streams_per_session" in r.json()["error"]["message"]
        finally:
            for s in streams:
                s.__exit__(None, None, None)
        # Closed streams give their places back.
        wait_until(
            lambda: _stream_opens(client, url, headers) or None,
            10,
            "a stream to open again after the others closed",
        )


def _stream_opens(client: httpx2.Client, url: str, headers: dict) -> bool:
    with client.stream("GET", url, headers=headers) as r:
        return r.status_code == 200


ASKS_CAPS = {"elicitation": {}}


def ask(c: Cluster, tool: str, **params) -> httpx2.Response:
    """A 2026-07-28 call of the demo's `tool` (which asks the client something), declaring
    elicitation."""
    url = f"{c.base(0)}/servers/asks/mcp"
    body = {"name": tool, "arguments": {}, **params}
    return stateless_post(url, c.token, "tools/call", body, name=tool, capabilities=ASKS_CAPS)


def test_calls_left_waiting_for_input_past_the_callers_cap_are_refused(small):
    url = f"{small.base(0)}/servers/asks/mcp"
    wait_until(lambda: "test_input_required_result_request_state" in stateless_tool_names(url, small.token), 60,
               "the asks server lists its tools")
    first = ask(small, "test_input_required_result_request_state")
    assert first.status_code == 200, first.text
    first = first.json()["result"]
    refused_before = small.metric("mcpd_mcp_input_refused_total", 'reason="parked_per_caller"') or 0

    r = ask(small, "test_input_required_result_request_state")
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    err = r.json()["error"]
    assert err["code"] == -32029, err
    assert err["data"]["limit"] == "mcp.max_parked_calls_per_caller", err
    assert "mcp.max_parked_calls_per_caller" in err["message"], err
    assert small.metric("mcpd_mcp_input_refused_total", 'reason="parked_per_caller"') == refused_before + 1

    # The call that was parked first is still there, and answering it frees the slot.
    assert first["resultType"] == "input_required", first
    answered = ask(small, "test_input_required_result_request_state", requestState=first["requestState"],
                   inputResponses={"confirm": {"action": "accept", "content": {"ok": True}}})
    assert answered.status_code == 200, answered.text
    assert "confirmed true" in answered.json()["result"]["content"][0]["text"]
    again = ask(small, "test_input_required_result_request_state")
    assert again.status_code == 200 and again.json()["result"]["resultType"] == "input_required", again.text
    # Answered, so that no call of this test stays parked for the tests after it.
    done = ask(small, "test_input_required_result_request_state", requestState=again.json()["result"]["requestState"],
               inputResponses={"confirm": {"action": "accept", "content": {"ok": True}}})
    assert done.status_code == 200 and "confirmed true" in done.text, done.text


def test_answers_ahead_of_the_questions_past_the_cap_are_refused_naming_the_field(small):
    name = {"action": "accept", "content": {"name": "Ada"}}
    too_many = {"user_name": name, **{f"extra{i}": name for i in range(MAX_ANSWERS_AHEAD)}}
    r = ask(small, "test_input_required_result_elicitation", inputResponses=too_many)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == -32602, err
    assert "params.inputResponses" in err["message"] and "mcp.max_answers_ahead" in err["message"], err

    # As many as the cap are taken, and answer the question when the server asks it: no round.
    within = {"user_name": name, "extra0": name}
    assert len(within) == MAX_ANSWERS_AHEAD
    r = ask(small, "test_input_required_result_elicitation", inputResponses=within)
    assert r.status_code == 200, r.text
    assert r.json()["result"]["content"][0]["text"] == "Hello, Ada!", r.text


def test_a_round_of_more_questions_than_the_cap_ends_the_call_naming_the_setting(small):
    """A stdio server of 2026-07-28 (servers/questions.py) whose `survey` asks three questions
    in one round, on a node that passes on at most two: the call ends with an error naming
    `pool.max_input_questions`, none of the questions reaches the client, and a call of one
    question still goes through."""
    small.add_server("questions", [VENV_BIN / "python", QUESTIONS], pool_size=1)
    small.wait_tools("questions", ["survey", "greet"])
    url = f"{small.base(0)}/servers/questions/mcp"
    refused = ("mcpd_upstream_input_refused_total", 'server="questions",reason="too_many_questions"')
    before = small.metric(*refused) or 0

    r = stateless_post(url, small.token, "tools/call", {"name": "survey", "arguments": {}}, name="survey",
                       capabilities={"elicitation": {}})
    err = r.json()["error"]
    assert "pool.max_input_questions" in err["message"] and "3 questions" in err["message"], err
    assert small.metric(*refused) == before + 1

    r = stateless_post(url, small.token, "tools/call", {"name": "greet", "arguments": {}}, name="greet",
                       capabilities={"elicitation": {}})
    assert r.status_code == 200, r.text
    assert r.json()["result"]["resultType"] == "input_required", r.text


def test_a_listen_stream_asks_for_at_most_as_many_resources_as_a_session_may_hold(cluster):
    """A 2026-07-28 `subscriptions/listen` names the resources it wants; each may stay
    subscribed on a server process as long as it runs, so a stream may ask for at most
    `mcp.max_subscriptions_per_session` (256), each URI at most `mcp.max_uri_bytes` long."""
    too_many = [f"demo://resource/static/{i}" for i in range(257)]
    # (A stream the node took would never end: the short timeout fails the test instead.)
    r = stateless_post(cluster.url(0), cluster.token, "subscriptions/listen",
                       {"notifications": {"resourceSubscriptions": too_many}}, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == -32602, err
    assert "params.notifications.resourceSubscriptions" in err["message"], err
    assert "mcp.max_subscriptions_per_session" in err["message"], err

    r = stateless_post(cluster.url(0), cluster.token, "subscriptions/listen",
                       {"notifications": {"resourceSubscriptions": ["demo://" + "x" * 5000]}}, timeout=10)
    assert r.status_code == 400, r.text
    assert "mcp.max_uri_bytes" in r.json()["error"]["message"], r.text
