"""A tiny reverse proxy on 127.0.0.1 that adds `Authorization: Bearer <token>` to every request.

The MCP conformance suite (`conformance server --url ...`) cannot send headers of its own, and
every MCP endpoint of mcpd needs a bearer token. This proxy sits between them, for the tests
only. It forwards method, path, headers (Host and Origin unchanged, so the suite's DNS-rebinding
checks reach mcpd as sent) and body, and streams the answer back as it arrives (SSE included),
closing the client connection at the end of each answer (HTTP/1.0 framing).

Both of its sides are HTTPS, so the suite's traffic is encrypted end to end: upstream it
trusts the cluster's CA; downstream it serves a certificate for 127.0.0.1 that it issues
itself from that CA (the `ca.pem`/`ca.key` pair it is given), which the suite trusts through
`NODE_EXTRA_CA_CERTS`.
"""

from __future__ import annotations

import datetime
import http.client
import http.server
import ipaddress
import ssl
import tempfile
import threading
import urllib.parse
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def issue_loopback_cert(ca_dir: Path, out: Path) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 signed by the CA in `ca_dir`, valid for a day."""
    ca_cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    ca_key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "authproxy")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = out / "proxy.pem", out / "proxy.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path

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
    """`with AuthProxy(upstream, token, ca_dir) as p:` serves `p.url_for(path)` until the block
    ends; `upstream` is a node's https:// base URL, `ca_dir` holds the cluster's CA."""

    def __init__(self, upstream: str, token: str, ca_dir: Path):
        parsed = urllib.parse.urlsplit(upstream)
        assert parsed.hostname == "127.0.0.1", "the proxy only forwards to the local cluster"
        assert parsed.scheme == "https", "nodes serve HTTPS"
        self.upstream_host = parsed.hostname
        self.upstream_port = parsed.port or 443
        self.upstream_tls = ssl.create_default_context(cafile=str(ca_dir / "ca.pem"))
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
                conn = http.client.HTTPSConnection(
                    proxy.upstream_host, proxy.upstream_port, timeout=120, context=proxy.upstream_tls
                )
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

        self._certs = tempfile.TemporaryDirectory(prefix="authproxy-")
        cert, key = issue_loopback_cert(ca_dir, Path(self._certs.name))
        serving = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        serving.load_cert_chain(cert, key)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.socket = serving.wrap_socket(self._server.socket, server_side=True)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="authproxy", daemon=True)

    def url_for(self, path: str) -> str:
        return f"https://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> AuthProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._certs.cleanup()
