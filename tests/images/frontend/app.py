"""Stand-in for the maicivy Next.js frontend, on 0.0.0.0:$PORT (3000).

GET /                          200 text/html, a few KB (so gzip is worth it)
GET /_next/static/<any>.js     200 application/javascript (.css: text/css)
GET /api/health                200 {"status":"ok","version":V}
other paths                    404 HTML page
"""

from __future__ import annotations

from standin import Handler, app_version, env_port, serve

VERSION = app_version()
NO_STORE = "private, no-cache, no-store, max-age=0, must-revalidate"

SECTIONS = "\n".join(
    f"""    <section id="s{i}" class="card">
      <h2>Experience {i}</h2>
      <p>Designed, built and operated a service of the maicivy stand-in, release {VERSION}.
      Worked on reliability, observability, deployment pipelines and the boring parts
      that keep a small production stack healthy: backups, restores, alerts.</p>
      <ul><li>Go</li><li>PostgreSQL</li><li>Redis</li><li>nginx</li><li>Prometheus</li></ul>
    </section>"""
    for i in range(1, 13)
)

PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <meta name="maicivy-version" content="{VERSION}">
  <title>maicivy (stand-in {VERSION})</title>
  <link rel="stylesheet" href="/_next/static/css/app-{VERSION}.css">
  <script src="/_next/static/chunks/main-{VERSION}.js" defer></script>
</head>
<body>
  <main id="__next" data-version="{VERSION}">
    <h1>maicivy</h1>
    <p>Frontend stand-in, version <span id="version">{VERSION}</span>.</p>
{SECTIONS}
  </main>
</body>
</html>
"""

SCRIPT = (
    f'/* maicivy frontend stand-in {VERSION} */\n'
    + "".join(
        f"export function widget{i}(el) {{ el.dataset.widget = '{i}'; "
        f"el.textContent = 'widget {i} of the maicivy stand-in'; return el; }}\n"
        for i in range(60)
    )
)

STYLE = "".join(f".card-{i} {{ margin: {i}px; padding: {i}px; }}\n" for i in range(80))

NOT_FOUND = "<!DOCTYPE html><html><head><title>404</title></head><body><h1>404</h1>" \
            "<p>This page could not be found.</p></body></html>\n"


class Frontend(Handler):
    extra_headers = (("X-Powered-By", "Next.js"),)

    def route_label(self, path: str) -> str:
        if path.startswith("/_next/static/"):
            return "/_next/static/*"
        return path if path in ("/", "/api/health") else "other"

    def dispatch(self, method, path, query, body):
        if path == "/api/health":
            return self.json(200, {"status": "ok", "version": VERSION})
        if path == "/":
            return self.text(200, PAGE, "text/html; charset=utf-8",
                             [("Cache-Control", NO_STORE)])
        if path.startswith("/_next/static/") and len(path) > len("/_next/static/"):
            immutable = [("Cache-Control", "public, max-age=31536000, immutable")]
            if path.endswith(".js"):
                return self.text(200, SCRIPT, "application/javascript; charset=utf-8", immutable)
            if path.endswith(".css"):
                return self.text(200, STYLE, "text/css; charset=utf-8", immutable)
        return self.text(404, NOT_FOUND, "text/html; charset=utf-8")


if __name__ == "__main__":
    serve(Frontend, env_port(3000, "PORT"), f"frontend {VERSION}")
