"""The rendered nginx.conf, in the real nginx container, seen from a client.

Everything goes through the stack's published ports on 127.0.0.1 with the
real host names (SNI and Host header), like a browser would.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import os
import socket
import ssl
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from stack_rig import StackRig

pytestmark = pytest.mark.rig

SITE, GRAFANA = "maicivy.test", "grafana.maicivy.test"
RATE = {"per_minute": 600, "burst": 20}
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("nginxstack"), "maicivynginx",
                   rate_limit=RATE)
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


def _context() -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the rig's certificates are self-signed
    return ctx


class SNIConnection(http.client.HTTPSConnection):
    """HTTPS to 127.0.0.1:port presenting ``server_name`` in SNI."""

    def __init__(self, port: int, server_name: str, timeout: float = 15):
        super().__init__("127.0.0.1", port, timeout=timeout, context=_context())
        self.server_name = server_name

    def connect(self):
        raw = socket.create_connection((self.host, self.port), self.timeout)
        self.sock = self._context.wrap_socket(raw, server_hostname=self.server_name)


def https(stack, path: str, host: str = SITE, headers: dict | None = None, method="GET"):
    conn = SNIConnection(stack.settings.publish.https, host)
    try:
        conn.request(method, path, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def plain_http(stack, path: str, host: str = SITE):
    conn = http.client.HTTPConnection("127.0.0.1", stack.settings.publish.http, timeout=15)
    try:
        conn.request("GET", path, headers={"Host": host})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


def test_plain_http_is_redirected_to_https_with_the_same_path(stack):
    status, headers, _ = plain_http(stack, "/experience?lang=fr")
    assert status == 301
    assert headers["Location"] == f"https://{SITE}/experience?lang=fr"
    status, headers, _ = plain_http(stack, "/", host=GRAFANA)
    assert status == 301 and headers["Location"] == f"https://{GRAFANA}/"


def test_plain_http_serves_the_acme_challenge_path(stack):
    challenge = Path(stack.settings.tls.webroot) / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    token = base64.urlsafe_b64encode(os.urandom(24)).decode().rstrip("=")
    (challenge / token).write_text(f"{token}.thumbprint")
    for host in (SITE, GRAFANA):
        status, _, body = plain_http(stack, f"/.well-known/acme-challenge/{token}", host=host)
        assert (status, body.decode()) == (200, f"{token}.thumbprint")
    status, _, _ = plain_http(stack, "/.well-known/acme-challenge/missing-token")
    assert status == 404


@pytest.mark.parametrize("path,kind", [
    ("/", "text/html"),
    ("/api/profile", "application/json"),
    ("/_next/static/chunks/main-v1.js", "application/javascript"),
    ("/no-such-page", "text/html"),
])
def test_security_headers_on_html_api_and_static_responses(stack, path, kind):
    status, headers, _ = https(stack, path)
    assert status in (200, 404)
    assert headers["Content-Type"].startswith(kind)
    for name, value in SECURITY_HEADERS.items():
        assert headers.get_all(name) == [value], (name, headers.get_all(name))
    csp = headers.get_all("Content-Security-Policy")
    assert csp and len(csp) == 1 and csp[0].startswith("default-src 'self'")
    assert f"wss://{SITE}" in csp[0] and "frame-ancestors 'self'" in csp[0]
    assert "X-Powered-By" not in headers


@pytest.mark.parametrize("path", ["/", "/_next/static/chunks/main-v1.js",
                                  "/_next/static/css/app-v1.css"])
def test_text_responses_are_gzipped(stack, path):
    _, plain_headers, plain = https(stack, path)
    status, headers, body = https(stack, path, headers={"Accept-Encoding": "gzip"})
    assert status == 200
    assert headers["Content-Encoding"] == "gzip"
    assert "Accept-Encoding" in headers.get("Vary", "")
    assert gzip.decompress(body) == plain
    assert len(body) < len(plain)
    assert "Content-Encoding" not in plain_headers


def test_static_assets_carry_long_cache_headers_and_html_does_not(stack):
    for path in ("/_next/static/chunks/main-v1.js", "/_next/static/css/app-v1.css"):
        _, headers, _ = https(stack, path)
        assert headers.get_all("Cache-Control") == ["public, max-age=31536000, immutable"]
    _, headers, _ = https(stack, "/")
    assert "max-age=31536000" not in (headers.get("Cache-Control") or "")


def test_a_websocket_upgrade_on_ws_reaches_the_backend(stack):
    key = base64.b64encode(os.urandom(16)).decode()
    raw = socket.create_connection(("127.0.0.1", stack.settings.publish.https), timeout=15)
    sock = _context().wrap_socket(raw, server_hostname=SITE)
    try:
        sock.sendall((f"GET /ws/chat HTTP/1.1\r\nHost: {SITE}\r\nUpgrade: websocket\r\n"
                      f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                      "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            assert chunk, head
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0].startswith("HTTP/1.1 101"), lines
        fields = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
        accept = base64.b64encode(hashlib.sha1(
            (key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()).digest()).decode()
        assert fields["sec-websocket-accept"] == accept
        assert fields["upgrade"].lower() == "websocket"
        # one masked text frame; the backend stand-in echoes it back
        payload, mask = b"hello through nginx", os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        data = rest
        while len(data) < 2 or len(data) < 2 + (data[1] & 0x7F):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        assert opcode == 0x1 and data[2:2 + length] == payload
        sock.sendall(bytes([0x88, 0x82]) + mask + bytes(
            b ^ mask[i % 4] for i, b in enumerate(struct.pack("!H", 1000))))
    finally:
        sock.close()


def test_the_grafana_host_name_reaches_grafana(stack):
    status, headers, body = https(stack, "/api/health", host=GRAFANA)
    assert status == 200 and b'"database"' in body
    status, _, body = https(stack, "/", host=GRAFANA)
    assert status == 200 and b"Grafana" in body
    assert headers["Strict-Transport-Security"] == SECURITY_HEADERS["Strict-Transport-Security"]
    status, _, body = https(stack, "/", host=SITE)
    assert status == 200 and b"Grafana" not in body and b"maicivy" in body


def test_an_unknown_host_name_gets_no_tls_handshake(stack):
    with pytest.raises(ssl.SSLError):
        https(stack, "/", host="unknown.example")


def test_429_once_the_rate_limit_and_its_burst_are_exceeded(stack):
    time.sleep(60 / RATE["per_minute"] * (RATE["burst"] + 5))  # let the bucket refill
    total = 4 * RATE["burst"]

    def one(_):
        return https(stack, "/api/ping")[0]

    with ThreadPoolExecutor(max_workers=16) as pool:
        statuses = list(pool.map(one, range(total)))
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0
    assert statuses.count(200) >= RATE["burst"]
    # the 429 is nginx's own answer, with the security headers
    status, headers, _ = https(stack, "/api/ping")
    if status == 429:
        assert headers["X-Content-Type-Options"] == "nosniff"
