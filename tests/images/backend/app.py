"""Stand-in for the maicivy Go API, on 0.0.0.0:$PORT (8080).

GET /health         200 {"status":"ok","version":V}    (500 in the broken image)
GET /health/deep    200 with checks of postgres and redis, 503 if one fails
GET /version        the version string (text/plain, no newline)
GET /metrics        Prometheus text: http_requests_total, http_request_duration_seconds,
                    maicivy_visitors_total, maicivy_build_info
ANY /api/...        200 JSON echo (method, path, version, proxy headers)
    /api/status/N   answers status N (e.g. 503, to produce 5xx samples)
    /api/slow?ms=N  answers after N ms (at most 10 s), to test draining on deploys
GET /ws/...         WebSocket echo (RFC 6455)
"""

from __future__ import annotations

import os
import socket
import struct
import time
from urllib.parse import parse_qs

from standin import METRICS, Handler, app_version, env_port, serve

VERSION = app_version()
VISITORS_HELP = "Distinct visitors seen (no visitor cookie yet)."
BROKEN = os.path.exists("/app/BROKEN")
STARTED = time.time()
ECHO_HEADERS = ("Host", "X-Real-IP", "X-Forwarded-For", "X-Forwarded-Proto", "User-Agent",
                "Connection")


def _check(fn) -> dict:
    start = time.monotonic()
    try:
        detail = fn()
        result = {"status": "ok"}
        if detail:
            result["detail"] = detail
    except Exception as exc:  # report, never raise
        result = {"status": "error", "error": f"{type(exc).__name__}: {exc}"}
    result["latency_ms"] = round((time.monotonic() - start) * 1000, 2)
    return result


def check_postgres() -> str:
    host = os.environ.get("POSTGRES_HOST") or "postgres"
    port = int(os.environ.get("POSTGRES_PORT") or 5432)
    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        s.sendall(struct.pack("!II", 8, 80877103))  # SSLRequest: any postgres answers S or N
        answer = s.recv(1)
    if answer not in (b"S", b"N"):
        raise RuntimeError(f"unexpected answer {answer!r} from {host}:{port}")
    return f"{host}:{port}"


def check_redis() -> str:
    host = os.environ.get("REDIS_HOST") or "redis"
    port = int(os.environ.get("REDIS_PORT") or 6379)
    password = os.environ.get("REDIS_PASSWORD", "")

    def command(*parts: str) -> bytes:
        out = f"*{len(parts)}\r\n".encode()
        for p in parts:
            b = p.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
        return out

    with socket.create_connection((host, port), timeout=2) as s:
        s.settimeout(2)
        f = s.makefile("rb")
        if password:
            s.sendall(command("AUTH", password))
            line = f.readline().strip()
            if line != b"+OK":
                raise RuntimeError(f"AUTH: {line.decode(errors='replace')}")
        s.sendall(command("PING"))
        line = f.readline().strip()
    if line != b"+PONG":
        raise RuntimeError(f"PING: {line.decode(errors='replace')}")
    return f"{host}:{port}"


class Backend(Handler):
    websocket_prefixes = ("/ws",)
    quiet_paths = ("/health", "/metrics")

    def route_label(self, path: str) -> str:
        if path in ("/health", "/health/deep", "/version", "/metrics"):
            return path
        for prefix in ("/api/", "/ws"):
            if path.startswith(prefix):
                return prefix.rstrip("/") + "/*"
        return "other"

    def dispatch(self, method, path, query, body):
        m = self.server.metrics
        if path == "/health":
            if BROKEN:
                return self.json(500, {"status": "error", "version": VERSION,
                                       "error": "this build is broken on purpose"})
            return self.json(200, {"status": "ok", "version": VERSION})
        if path == "/health/deep":
            checks = {"postgres": _check(check_postgres), "redis": _check(check_redis)}
            ok = all(c["status"] == "ok" for c in checks.values())
            data = {"status": "ok" if ok else "degraded", "version": VERSION,
                    "uptime_seconds": round(time.time() - STARTED, 1), "checks": checks}
            if BROKEN:
                data["status"] = "error"
                return self.json(500, data)
            return self.json(200 if ok else 503, data)
        if path == "/version":
            return self.text(200, VERSION)
        if path == "/metrics":
            return self.text(200, m.render(), "text/plain; version=0.0.4; charset=utf-8")
        if path.startswith("/api/"):
            params = parse_qs(query)
            if path.startswith("/api/status/"):
                try:
                    code = int(path.rsplit("/", 1)[1])
                except ValueError:
                    code = 400
                code = code if 200 <= code <= 599 else 400
                return self.json(code, {"status": code, "version": VERSION})
            if path.startswith("/api/slow"):
                ms = min(int((params.get("ms") or ["500"])[0]), 10000)
                time.sleep(ms / 1000)
            headers = []
            if "maicivy_visitor=" not in self.headers.get("Cookie", ""):
                m.counter("maicivy_visitors_total", VISITORS_HELP)
                headers.append(("Set-Cookie", "maicivy_visitor=1; Path=/; HttpOnly; SameSite=Lax"))
            return self.json(200, {
                "ok": True, "method": method, "path": path, "query": query,
                "version": VERSION, "body_bytes": len(body),
                "headers": {h: self.headers[h] for h in ECHO_HEADERS if h in self.headers},
            }, headers)
        return self.json(404, {"error": "not found", "path": path})


if __name__ == "__main__":
    METRICS.counter("maicivy_visitors_total", VISITORS_HELP, by=0)
    METRICS.gauge("maicivy_build_info", "Build of the running backend.", (("version", VERSION),), 1)
    serve(Backend, env_port(8080, "PORT"), f"backend {VERSION}")
