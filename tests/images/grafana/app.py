"""Stand-in for Grafana, on 0.0.0.0:$GF_SERVER_HTTP_PORT (3000).

GET  /api/health                                  200 {"database":"ok","version":"stand-in"}
GET  /                                            200 HTML
POST /api/admin/provisioning/dashboards/reload    200 {"message": ...} (any basic auth; 401 without)
POST /api/admin/provisioning/datasources/reload   same
GET  /api/standin/files    JSON: files found under the provisioning and dashboards paths,
                           reload counts and the GF_* settings (password redacted)
"""

from __future__ import annotations

import os
import threading

from standin import Handler, env_port, log, serve

PROVISIONING = os.environ.get("GF_PATHS_PROVISIONING") or "/etc/grafana/provisioning"
DATA = os.environ.get("GF_PATHS_DATA") or "/var/lib/grafana"
DASHBOARDS = "/var/lib/grafana/dashboards"
RELOADS = {"dashboards": 0, "datasources": 0}
LOCK = threading.Lock()


def list_files(root: str) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            found.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(found)


def settings() -> dict:
    out = {}
    for key, value in sorted(os.environ.items()):
        if key.startswith("GF_"):
            out[key] = "<set>" if "PASSWORD" in key and value else value
    return out


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Grafana</title></head>
<body><div id="reactRoot"><h1>Grafana stand-in</h1><p>maicivy test rig.</p></div></body></html>
"""


class Grafana(Handler):
    quiet_paths = ("/api/health",)

    def dispatch(self, method, path, query, body):
        if path == "/api/health":
            return self.json(200, {"database": "ok", "version": "stand-in"})
        if path in ("/", "/login") and method in ("GET", "HEAD"):
            return self.text(200, PAGE, "text/html; charset=UTF-8")
        if path == "/api/standin/files":
            with LOCK:
                reloads = dict(RELOADS)
            return self.json(200, {
                "provisioning_dir": PROVISIONING,
                "provisioning": list_files(PROVISIONING),
                "dashboards_dir": DASHBOARDS,
                "dashboards": list_files(DASHBOARDS),
                "reloads": reloads,
                "settings": settings(),
            })
        for kind in ("dashboards", "datasources"):
            if path == f"/api/admin/provisioning/{kind}/reload":
                if method != "POST":
                    return self.json(405, {"message": "method not allowed"})
                if not self.headers.get("Authorization", "").startswith(("Basic ", "Bearer ")):
                    return self.json(401, {"message": "Unauthorized"})
                with LOCK:
                    RELOADS[kind] += 1
                return self.json(200, {"message": f"{kind.capitalize()} config reloaded"})
        if path.startswith("/api/"):
            return self.json(404, {"message": "Not found"})
        return self.text(404, PAGE, "text/html; charset=UTF-8")


if __name__ == "__main__":
    try:  # like Grafana, keep a database file in the data volume
        with open(os.path.join(DATA, "grafana.db"), "a"):
            pass
    except OSError as exc:
        log(f"grafana stand-in: cannot write {DATA}: {exc}")
    serve(Grafana, env_port(3000, "GF_SERVER_HTTP_PORT"), "grafana stand-in")
