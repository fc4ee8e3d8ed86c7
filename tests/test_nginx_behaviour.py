"""The rendered nginx.conf, in the real nginx container, seen from a client.

Everything goes through the stack's published ports on 127.0.0.1 with the
real host names (SNI and Host header), like a browser would.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import json
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
# 2 requests/s: the 80 requests of the 429 test exceed it even when a loaded
# machine needs 30 s for their TLS handshakes (at 10/s they sometimes did not).
RATE = {"per_minute": 120, "burst": 20, "grafana_per_minute": 60, "grafana_burst": 10}
SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=63072000; includeSubDomains",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "strict-origin-when-cross-origin",
}


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory):
    # (the pid: parallel runs on one Docker)
    rig = StackRig(ssh_host, tmp_path_factory.mktemp("nginxstack"),
                   f"maicivynginx{os.getpid()}",
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
    assert status == 308  # permanent, and keeps the method and body
    assert headers["Location"] == f"https://{SITE}/experience?lang=fr"
    status, headers, _ = plain_http(stack, "/", host=GRAFANA)
    assert status == 308 and headers["Location"] == f"https://{GRAFANA}/"


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


def test_h5bp_types_are_gzipped_too(stack):
    # a web app manifest (application/manifest+json, once left out), served
    # by nginx itself from the ACME webroot
    challenge = Path(stack.settings.tls.webroot) / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    manifest = json.dumps({"name": "maicivy", "icons": [
        {"src": f"/icons/icon-{n}.png", "sizes": f"{n}x{n}", "type": "image/png"}
        for n in (72, 96, 128, 144, 152, 192, 384, 512)]}).encode()
    (challenge / "site.webmanifest").write_bytes(manifest)
    conn = http.client.HTTPConnection("127.0.0.1", stack.settings.publish.http, timeout=15)
    try:
        conn.request("GET", "/.well-known/acme-challenge/site.webmanifest",
                     headers={"Host": SITE, "Accept-Encoding": "gzip"})
        resp = conn.getresponse()
        body, headers = resp.read(), resp.headers
    finally:
        conn.close()
    assert headers["Content-Type"] == "application/manifest+json"
    assert headers["Content-Encoding"] == "gzip" and gzip.decompress(body) == manifest


def test_static_assets_carry_long_cache_headers_and_html_does_not(stack):
    for path in ("/_next/static/chunks/main-v1.js", "/_next/static/css/app-v1.css"):
        _, headers, _ = https(stack, path)
        assert headers.get_all("Cache-Control") == ["public, max-age=31536000, immutable"]
    _, headers, _ = https(stack, "/")
    assert "max-age=31536000" not in (headers.get("Cache-Control") or "")


@pytest.mark.parametrize("path", ["/ws/chat", "/ws"])
def test_a_websocket_upgrade_on_ws_reaches_the_backend(stack, path):
    # NEXT_PUBLIC_WS_URL is wss://<domain>/ws: /ws itself upgrades (no 301 to /ws/).
    key = base64.b64encode(os.urandom(16)).decode()
    raw = socket.create_connection(("127.0.0.1", stack.settings.publish.https), timeout=15)
    sock = _context().wrap_socket(raw, server_hostname=SITE)
    try:
        sock.sendall((f"GET {path} HTTP/1.1\r\nHost: {SITE}\r\nUpgrade: websocket\r\n"
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


def refill(per_minute: int, burst: int) -> None:
    """Wait until a rate-limit zone's bucket is full again."""
    time.sleep(60 / per_minute * (burst + 5))


def test_429_once_the_rate_limit_and_its_burst_are_exceeded(stack):
    refill(RATE["per_minute"], RATE["burst"])
    total = 4 * RATE["burst"]

    def one(_):
        return https(stack, "/api/ping")[0]

    try:
        with ThreadPoolExecutor(max_workers=16) as pool:
            statuses = list(pool.map(one, range(total)))
    finally:
        refill(RATE["per_minute"], RATE["burst"])  # the next test finds the site answering
    assert set(statuses) <= {200, 429}
    assert statuses.count(429) > 0
    assert statuses.count(200) >= RATE["burst"]
    # the 429 is nginx's own answer, with the security headers
    status, headers, _ = https(stack, "/api/ping")
    if status == 429:
        assert headers["X-Content-Type-Options"] == "nosniff"



# --- issue 12: host names, rate-limit zones, TLS profile, dotfiles, IPv6 ---------


def test_an_unknown_host_on_port_80_gets_no_answer_while_acme_for_our_names_works(stack):
    for host in ("evil.example", "127.0.0.1"):
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            plain_http(stack, "/", host=host)
    # no redirect that echoes the Host header
    with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
        plain_http(stack, "/.well-known/acme-challenge/x", host="evil.example")
    challenge = Path(stack.settings.tls.webroot) / ".well-known" / "acme-challenge"
    challenge.mkdir(parents=True, exist_ok=True)
    (challenge / "tok444").write_text("tok444.thumb")
    assert plain_http(stack, "/.well-known/acme-challenge/tok444")[::2] == (200, b"tok444.thumb")


def test_right_sni_with_a_wrong_host_is_misdirected_with_security_headers(stack):
    conn = SNIConnection(stack.settings.publish.https, SITE)
    try:
        conn.request("GET", "/", headers={"Host": "evil.example"})
        resp = conn.getresponse()
        resp.read()
        status, headers = resp.status, resp.headers
    finally:
        conn.close()
    assert status == 421
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, name
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")


def test_grafana_has_its_own_rate_limit_zone_and_its_static_files_are_unlimited(stack):
    time.sleep(60 / RATE["grafana_per_minute"] * (RATE["grafana_burst"] + 2))
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            statics = list(pool.map(lambda _: https(stack, "/public/build/app.js", GRAFANA)[0],
                                    range(40)))
        assert 429 not in statics, statics
        with ThreadPoolExecutor(max_workers=8) as pool:
            pages = list(pool.map(lambda _: https(stack, "/api/health", GRAFANA)[0],
                                  range(40)))
        assert pages.count(429) > 0 and pages.count(200) >= RATE["grafana_burst"], pages
        # Grafana's zone is spent; the site's is untouched.
        assert https(stack, "/")[0] == 200
        assert https(stack, "/api/ping")[0] == 200
    finally:
        refill(RATE["grafana_per_minute"], RATE["grafana_burst"])


@pytest.mark.parametrize("path", ["/.env", "/.git/config", "/api/.htpasswd"])
def test_dotfiles_are_denied(stack, path):
    status, headers, _ = https(stack, path)
    assert status == 403
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert https(stack, "/.env", host=GRAFANA)[0] == 403


def _handshake(stack, **ctx_settings):
    ctx = _context()
    for key, value in ctx_settings.items():
        if key == "ciphers":
            ctx.set_ciphers(value)
        elif key == "alpn":
            ctx.set_alpn_protocols(value)
        else:
            setattr(ctx, key, value)
    raw = socket.create_connection(("127.0.0.1", stack.settings.publish.https), timeout=15)
    with ctx.wrap_socket(raw, server_hostname=SITE) as sock:
        return sock.version(), sock.cipher()[0], sock.selected_alpn_protocol()


def test_tls_follows_mozilla_intermediate_6(stack):
    # TLS 1.3 and HTTP/2 by ALPN (the rig's nginx 1.22: "listen ... http2").
    version, _, alpn = _handshake(stack, alpn=["h2", "http/1.1"])
    assert (version, alpn) == ("TLSv1.3", "h2")
    # TLS 1.2 with ECDHE + AEAD only.
    version, cipher, _ = _handshake(stack, maximum_version=ssl.TLSVersion.TLSv1_2)
    assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher
                                                                     or "CHACHA" in cipher)
    # No DHE (dropped in 6.0), no CBC, nothing below TLS 1.2.
    for refused in ({"maximum_version": ssl.TLSVersion.TLSv1_2,
                     "ciphers": "DHE-RSA-AES128-GCM-SHA256:DHE-RSA-AES256-GCM-SHA384"},
                    {"maximum_version": ssl.TLSVersion.TLSv1_2,
                     "ciphers": "ECDHE-ECDSA-AES128-SHA:ECDHE-RSA-AES128-SHA"}):
        with pytest.raises(ssl.SSLError):
            _handshake(stack, **refused)


def test_nginx_answers_on_ipv6_too(stack):
    raw = socket.create_connection(("::1", stack.settings.publish.https), timeout=15)
    with _context().wrap_socket(raw, server_hostname=SITE) as sock:
        sock.sendall(f"GET / HTTP/1.1\r\nHost: {SITE}\r\nConnection: close\r\n\r\n".encode())
        head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 200")


# --- issue 12: what the containers run with ----------------------------------------


def _container(stack, service: str) -> str:
    return stack.run(stack.compose("ps", "-q", service), hide=True).stdout.strip()


def _inspect(stack, service: str, template: str) -> str:
    return stack.run(f"docker inspect -f '{template}' {_container(stack, service)}",
                     hide=True).stdout.strip()


def _proc_status(stack, service: str) -> dict[str, str]:
    """/proc/<pid>/status of the service's main process, read on the host."""
    pid = _inspect(stack, service, "{{.State.Pid}}")
    r = stack.run(f"cat /proc/{int(pid)}/status", hide=True)
    return dict(line.split(":\t", 1) for line in r.stdout.splitlines() if ":\t" in line)


CAPS = {"CHOWN": 0, "DAC_OVERRIDE": 1, "DAC_READ_SEARCH": 2, "FOWNER": 3, "SETGID": 6,
        "SETUID": 7, "NET_BIND_SERVICE": 10}
ALLOWED = {"postgres": {"CHOWN", "DAC_READ_SEARCH", "FOWNER", "SETGID", "SETUID"},
           "nginx": {"CHOWN", "NET_BIND_SERVICE", "SETGID", "SETUID"}}


def test_every_service_runs_without_new_privileges_and_only_the_capabilities_it_needs(stack):
    services = stack.service_health()
    assert "alertmanager" in services and len(services) == 9
    for service in services:
        status = _proc_status(stack, service)
        assert status["NoNewPrivs"].strip() == "1", service
        bounding = int(status["CapBnd"].strip(), 16)
        allowed = sum(1 << CAPS[c] for c in ALLOWED.get(service, ()))
        assert bounding & ~allowed == 0, (service, hex(bounding))


def test_redis_runs_as_an_unprivileged_user(stack):
    uid = _proc_status(stack, "redis")["Uid"].split()
    assert uid[0] != "0" and uid[1] != "0", uid
    r = stack.run(stack.compose("exec", "-T", "redis", "sh", "-c",
                                'REDISCLI_AUTH="$REDIS_PASSWORD" redis-cli set k v'), hide=True)
    assert r.stdout.strip() == "OK"  # and it can still write its data


def test_frontend_listens_on_every_address_and_nginx_waits_for_healthy_apps(stack):
    r = stack.run(stack.compose("exec", "-T", "frontend", "sh", "-c",
                                "tr '\\0' '\\n' < /proc/1/environ"), hide=True)
    assert "HOSTNAME=0.0.0.0" in r.stdout.splitlines()
    label = _inspect(stack, "nginx",
                     '{{index .Config.Labels "com.docker.compose.depends_on"}}')
    deps = dict(d.split(":", 2)[:2] for d in label.split(","))
    assert deps["backend"] == deps["frontend"] == "service_healthy"


def test_node_exporter_sees_the_host_processes(stack):
    assert _inspect(stack, "node-exporter", "{{.HostConfig.PidMode}}") == "host"
    r = stack.run(stack.compose("exec", "-T", "node-exporter", "cat", "/proc/1/comm"), hide=True)
    assert "node_exporter" not in r.stdout and "prometheus-node" not in r.stdout
