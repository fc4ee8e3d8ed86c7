"""Image references of the Docker test rig (built and pushed by setup-docker.sh).

Standard library only. ``TEST_IMAGES`` maps the service names of
``settings.images`` to the stand-in images in the local registry.
"""

from __future__ import annotations

REGISTRY = "127.0.0.1:5000"
ENV_FILE = "/etc/maicivy-rig.env"

_PREFIX = f"{REGISTRY}/maicivy"

TEST_IMAGES: dict[str, str] = {
    "postgres": f"{_PREFIX}/postgres:test",
    "redis": f"{_PREFIX}/redis:test",
    "backend": f"{_PREFIX}/backend:v1",
    "frontend": f"{_PREFIX}/frontend:test",
    "nginx": f"{_PREFIX}/nginx:test",
    "prometheus": f"{_PREFIX}/prometheus:test",
    "grafana": f"{_PREFIX}/grafana:test",
    "node_exporter": f"{_PREFIX}/node-exporter:test",
    "alertmanager": f"{_PREFIX}/alertmanager:test",
}

# Other builds of the stand-ins, for deploy / rollback tests.
BACKEND_V2 = f"{_PREFIX}/backend:v2"  # /health and /version report "v2"
BACKEND_BROKEN = f"{_PREFIX}/backend:broken"  # /health answers 500: never healthy
FRONTEND_V2 = f"{_PREFIX}/frontend:v2"  # page and /api/health report "v2"
# Debian bookworm minbase + curl, wget, python3: the base to build other test images FROM.
PYBASE = f"{_PREFIX}/pybase:test"


def rig_env(path: str = ENV_FILE) -> dict[str, str]:
    """The variables of /etc/maicivy-rig.env ({} if the file is missing).

    Lines look like ``export NAME=value`` or ``NAME=value``; comments and blank
    lines are skipped, one level of surrounding quotes is removed.
    """
    env: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return env
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].strip()
        name, sep, value = line.partition("=")
        name = name.strip()
        if not sep or not name.replace("_", "").isalnum():
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        env[name] = value
    return env


if __name__ == "__main__":  # print the references, e.g. for shell scripts
    for service, ref in TEST_IMAGES.items():
        print(f"{service}={ref}")
    print(f"backend_v2={BACKEND_V2}\nbackend_broken={BACKEND_BROKEN}\nfrontend_v2={FRONTEND_V2}")
