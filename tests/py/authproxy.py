"""A tiny reverse proxy on 127.0.0.1 that adds `Authorization: Bearer <token>` to every request.

The MCP conformance suite (`conformance server --url ...`) cannot send headers of its own, and
every MCP endpoint of mcpd needs a bearer token. This proxy sits between them, for the tests
only. It forwards method, path, headers (Host and Origin unchanged, so the suite's DNS-rebinding
checks reach mcpd as sent) and body, and streams the answer back as it arrives (SSE included),
closing the client connection at the end of each answer (HTTP/1.0 framing).
"""

from __future__ import annotations

import http.client
import http.server
import threading
import urllib.parse

# Headers that belong to one connection, not to the request.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
}


class AuthProxy:
    """`with AuthProxy(upstream, token) as p:` serves `p.url_for(path)` until the block ends."""

    def __init__(self, upstream: str, token: str):
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.hostname == "127.0.0.1", "the proxy only forwards to the local cluster"
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 80
        self.token = token
        self.requests = 0
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, format, *args):  # noqa: A002 - the base class's name
                pass

            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward()

            def do_DELETE(self):
                self._forward()

            def _forward(self):
                proxy.requests += 1
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port, timeout=120)
                try:
                    conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        if name.lower() in HOP_BY_HOP or name.lower() in ("authorization", "content-length"):
                            continue
                        conn.putheader(name, value)
                    conn.putheader("Authorization", f"Bearer {proxy.token}")
                    if body is not None:
                        conn.putheader("Content-Length", str(len(body)))
                    conn.endheaders(body)
                    resp = conn.getresponse()
                    self.send_response(resp.status, resp.reason)
                    for name, value in resp.getheaders():
                        if name.lower() in HOP_BY_HOP or name.lower() in ("date", "server"):
                            continue
                        self.send_header(name, value)
                    self.send_header("Connection", "close")
                    self.end_headers()
                    while True:
                        chunk = resp.read1(65536)
                        if not chunk:
                            break
                        self.wfile.write(chunk)
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away: drop the upstream connection too
                except http.client.IncompleteRead:
                    pass  # upstream ended a stream mid-chunk (a node stopping): end ours too
                except OSError as e:
                    try:
                        self.send_error(502, f"upstream: {e}")
                    except OSError:
                        pass
                finally:
                    conn.close()

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="authproxy", daemon=True)

    def url_for(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> AuthProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
