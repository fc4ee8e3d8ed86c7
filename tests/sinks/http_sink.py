"""An HTTP sink for the alerting rig test: records every POST, answers 200.

    python3 http_sink.py OUTDIR        (listens on 0.0.0.0:8080)

Each request is written to OUTDIR/http-<n>.json as {"path": ..., "body": ...}.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

OUT = sys.argv[1]
COUNTER = itertools.count(1)


class Sink(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server API)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        path = os.path.join(OUT, f"http-{next(COUNTER)}.json")
        with open(path + ".tmp", "w") as fh:
            json.dump({"path": self.path, "body": body.decode("utf-8", "replace")}, fh)
        os.rename(path + ".tmp", path)
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    print("http-sink: listening on 0.0.0.0:8080", flush=True)
    ThreadingHTTPServer(("0.0.0.0", 8080), Sink).serve_forever()
