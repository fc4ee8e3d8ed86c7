"""Shared HTTP/1.1 server of the rig's stand-in images (backend, frontend, grafana).

Standard library only. A ThreadingHTTPServer with keep-alive, a small
Prometheus registry, a hand-written RFC 6455 WebSocket echo, and a graceful
stop on SIGTERM/SIGINT: stop accepting, let in-flight requests finish (1.5 s
at most), close idle keep-alive and WebSocket connections, exit 0.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
DRAIN_SECONDS = 1.5


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} {message}\n")
    sys.stderr.flush()


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names, values) -> str:
    return ",".join(f'{n}="{_esc(v)}"' for n, v in zip(names, values, strict=True))


class Metrics:
    """Counters and one request-duration histogram, in Prometheus text format."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple, int] = {}
        self.durations: dict[tuple, list] = {}
        self.counters: dict[str, list] = {}  # name -> [help, {labels: value}]
        self.gauges: dict[str, list] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        with self.lock:
            key = (method, path, str(status))
            self.requests[key] = self.requests.get(key, 0) + 1
            h = self.durations.setdefault((method, path), [0] * len(self.BUCKETS) + [0, 0.0])
            for i, bound in enumerate(self.BUCKETS):
                if seconds <= bound:
                    h[i] += 1
            h[-2] += 1
            h[-1] += seconds

    def counter(self, name: str, help_text: str, labels: tuple = (), by: float = 1) -> None:
        with self.lock:
            entry = self.counters.setdefault(name, [help_text, {}])
            entry[1][labels] = entry[1].get(labels, 0) + by

    def gauge(self, name: str, help_text: str, labels: tuple, value: float) -> None:
        with self.lock:
            self.gauges.setdefault(name, [help_text, {}])[1][labels] = value

    def render(self) -> str:
        out = []
        with self.lock:
            out.append("# HELP http_requests_total "
                       "HTTP requests served, by method, route and status.")
            out.append("# TYPE http_requests_total counter")
            for (method, path, status), n in sorted(self.requests.items()):
                labels = _labels(("method", "path", "status"), (method, path, status))
                out.append(f"http_requests_total{{{labels}}} {n}")
            out.append("# HELP http_request_duration_seconds "
                       "Time to serve an HTTP request.")
            out.append("# TYPE http_request_duration_seconds histogram")
            for (method, path), h in sorted(self.durations.items()):
                base = _labels(("method", "path"), (method, path))
                bucket = "http_request_duration_seconds_bucket"
                for i, bound in enumerate(self.BUCKETS):
                    out.append(f'{bucket}{{{base},le="{bound}"}} {h[i]}')
                out.append(f'{bucket}{{{base},le="+Inf"}} {h[-2]}')
                out.append(f"http_request_duration_seconds_sum{{{base}}} {h[-1]:.6f}")
                out.append(f"http_request_duration_seconds_count{{{base}}} {h[-2]}")
            for kind, table in (("counter", self.counters), ("gauge", self.gauges)):
                for name, (help_text, values) in sorted(table.items()):
                    out.append(f"# HELP {name} {help_text}")
                    out.append(f"# TYPE {name} {kind}")
                    for labels, value in sorted(values.items()):
                        pairs = ",".join(f'{k}="{_esc(v)}"' for k, v in labels)
                        text = "{" + pairs + "}" if labels else ""
                        out.append(f"{name}{text} {value:g}")
        return "\n".join(out) + "\n"


METRICS = Metrics()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # the drain below waits for in-flight requests itself
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, address, handler) -> None:
        super().__init__(address, handler)
        self.stopping = False
        self.lock = threading.Lock()
        self.handlers: set = set()
        self.metrics = METRICS

    def busy_count(self) -> int:
        with self.lock:
            return sum(1 for h in self.handlers if h.busy and not h.ws)

    def close_idle(self) -> None:
        """Idle keep-alive connections: stop reading; WebSockets: send 1001 close."""
        with self.lock:
            handlers = list(self.handlers)
        for h in handlers:
            try:
                if h.ws:
                    h.ws_send(0x8, struct.pack("!H", 1001) + b"server stopping")
                    h.connection.shutdown(socket.SHUT_RDWR)
                elif not h.busy:
                    h.connection.shutdown(socket.SHUT_RD)
            except OSError:
                pass


class Handler(BaseHTTPRequestHandler):
    """Base request handler; subclasses implement ``dispatch``."""

    protocol_version = "HTTP/1.1"
    server_version = "maicivy-standin/1"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are dropped after this
    websocket_prefixes: tuple = ()
    quiet_paths: tuple = ()
    extra_headers: tuple = ()

    # -- connection bookkeeping -------------------------------------------------
    def setup(self) -> None:
        super().setup()
        self.busy = False
        self.ws = False
        self.ws_lock = threading.Lock()
        with self.server.lock:
            self.server.handlers.add(self)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            with self.server.lock:
                self.server.handlers.discard(self)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt, *args) -> None:  # access log on stderr
        if getattr(self, "path", "").split("?")[0] in self.quiet_paths:
            return
        log(f"{self.client_address[0]} {fmt % args}")

    # -- routing ----------------------------------------------------------------
    def route_label(self, path: str) -> str:
        return path

    def dispatch(self, method: str, path: str, query: str, body: bytes):
        return self.text(404, "not found\n")

    @staticmethod
    def json(status: int, data, headers=()):
        return status, "application/json", json.dumps(data).encode(), list(headers)

    @staticmethod
    def text(status: int, text: str, ctype: str = "text/plain; charset=utf-8", headers=()):
        return status, ctype, text.encode(), list(headers)

    def do_GET(self):
        self._serve("GET")

    def do_HEAD(self):
        self._serve("HEAD")

    def do_POST(self):
        self._serve("POST")

    def do_PUT(self):
        self._serve("PUT")

    def do_PATCH(self):
        self._serve("PATCH")

    def do_DELETE(self):
        self._serve("DELETE")

    def do_OPTIONS(self):
        self._serve("OPTIONS")

    def _serve(self, method: str) -> None:
        self.busy = True
        start = time.monotonic()
        path, _, query = self.path.partition("?")
        status = 500
        try:
            upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
            if upgrade and method == "GET" and path.startswith(self.websocket_prefixes):
                status = self._websocket()
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length > 0 else b""
            try:
                status, ctype, payload, headers = self.dispatch(method, path, query, body)
            except Exception:  # a bug in a stand-in must show, not hang the client
                log(traceback.format_exc())
                status, ctype, payload, headers = self.json(500, {"error": "internal error"})
            self._respond(method, status, ctype, payload, headers)
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True
        finally:
            self.busy = False
            self.server.metrics.observe(method, self.route_label(path), status,
                                        time.monotonic() - start)

    def _respond(self, method, status, ctype, payload, headers) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(payload)))
        for name, value in list(self.extra_headers) + list(headers):
            self.send_header(name, value)
        if self.server.stopping:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    # -- WebSocket (RFC 6455): handshake, then echo ---------------------------------
    def _websocket(self) -> int:
        key = self.headers.get("Sec-WebSocket-Key", "").strip()
        if self.headers.get("Sec-WebSocket-Version", "").strip() != "13" or not key:
            self._respond("GET", 426, "text/plain", b"WebSocket version 13 required\n",
                          [("Sec-WebSocket-Version", "13")])
            return 426
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101, "Switching Protocols")
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.close_connection = True
        self.ws = True
        self.server.metrics.counter("websocket_connections_total",
                                    "WebSocket connections accepted.")
        message, message_op = b"", 0
        while True:
            frame = self._ws_read()
            if frame is None:
                return 101
            fin, opcode, payload = frame
            if opcode == 0x8:  # close: answer with the same code
                self.ws_send(0x8, payload[:2] if len(payload) >= 2 else b"")
                return 101
            if opcode == 0x9:
                self.ws_send(0xA, payload)
                continue
            if opcode == 0xA:
                continue
            if opcode in (0x1, 0x2):
                message, message_op = payload, opcode
            elif opcode == 0x0:
                message += payload
            else:
                self.ws_send(0x8, struct.pack("!H", 1002))
                return 101
            if fin and message_op:
                self.server.metrics.counter("websocket_messages_total",
                                            "WebSocket messages echoed.")
                self.ws_send(message_op, message)
                message, message_op = b"", 0

    def _read_exact(self, n: int) -> bytes | None:
        data = self.rfile.read(n) if n else b""
        return data if len(data) == n else None

    def _ws_read(self):
        head = self._read_exact(2)
        if head is None:
            return None
        fin, opcode = head[0] & 0x80, head[0] & 0x0F
        masked, length = head[1] & 0x80, head[1] & 0x7F
        if length == 126:
            ext = self._read_exact(2)
            length = struct.unpack("!H", ext)[0] if ext else None
        elif length == 127:
            ext = self._read_exact(8)
            length = struct.unpack("!Q", ext)[0] if ext else None
        if length is None or length > 16 * 1024 * 1024:
            return None
        mask = self._read_exact(4) if masked else b"\0\0\0\0"
        payload = self._read_exact(length)
        if mask is None or payload is None:
            return None
        if masked:
            payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        return bool(fin), opcode, payload

    def ws_send(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 126, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
        with self.ws_lock:
            self.wfile.write(head + payload)


def serve(handler: type, port: int, name: str) -> None:
    """Serve on 0.0.0.0:port until SIGTERM/SIGINT, then drain and exit 0."""
    server = Server(("0.0.0.0", port), handler)

    def on_signal(signum, _frame):
        if server.stopping:
            return
        server.stopping = True
        log(f"{name}: signal {signum}, stopping")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    log(f"{name}: listening on 0.0.0.0:{port}")
    server.serve_forever(poll_interval=0.1)
    server.socket.close()  # no new connections from here on
    server.close_idle()
    deadline = time.monotonic() + DRAIN_SECONDS
    while server.busy_count() and time.monotonic() < deadline:
        time.sleep(0.02)
        server.close_idle()
    log(f"{name}: stopped ({server.busy_count()} request(s) cut short)")
    sys.stdout.flush()
    os._exit(0)


def app_version() -> str:
    """The release this stand-in plays: /app/VERSION (baked in), else $APP_VERSION."""
    try:
        with open("/app/VERSION") as f:
            version = f.read().strip()
    except OSError:
        version = ""
    return version or os.environ.get("APP_VERSION", "dev")


def env_port(default: int, *names: str) -> int:
    for n in names:
        if os.environ.get(n, "").strip():
            return int(os.environ[n])
    return default
