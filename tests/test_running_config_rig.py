"""What runs after a deploy is what was deployed: the real fab CLI, a real stack.

One stack for the module, shared to save time, but no test depends on another
having run: each starts from the state it needs -- a fresh server without a
certificate (``rig.fresh()``) or the stack deployed with the rig's settings
(``rig.at_defaults()``, a no-op redeploy when it runs them already):

* the first deploy makes its own stand-in certificates;
* a changed nginx setting and alert threshold are *in effect* after the
  deploy (``nginx -T``, rate limiting seen by a client, Prometheus' rules API),
  and again the previous ones after ``deploy.rollback``;
* a reload that does not take effect (nginx's master process stopped) fails
  the deploy, which rolls back;
* a backend container stopped and started again (new address) is found by
  nginx without a reload.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import time

import pytest
from deploy_support import fab, get, remove_release_tags, write_config
from stack_rig import StackRig

from fabfile.config import SERVICES
from fabfile.render import embedded_config_id
from fabfile.stack import tls_domains

pytestmark = pytest.mark.rig

PROJECT = "maicivyrunning"


def docker(*args: str, check: bool = True) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=check,
                          timeout=120).stdout


def container(service: str) -> str:
    ids = docker("ps", "-q", "--filter", f"label=com.docker.compose.project={PROJECT}",
                 "--filter", f"label=com.docker.compose.service={service}").split()
    assert len(ids) == 1, (service, ids)
    return ids[0]


def pids(top: str) -> list[str]:
    """PIDs of nginx's master and workers in ``docker top`` (not the health checks)."""
    return sorted(line.split()[1] for line in top.splitlines()[1:]
                  if "nginx: master" in line or "nginx: worker" in line)


class Rig:
    def __init__(self, ssh_host, tmp):
        self.ssh_host = ssh_host
        self.tmp = tmp
        self.stack = StackRig(ssh_host, tmp, PROJECT, deploy={"health_timeout_seconds": 30})
        self.settings = self.stack.settings
        self.root = tmp / "srv"
        self.n = 0

    def deploy(self, *args: str, **changes) -> subprocess.CompletedProcess:
        data = {k: (dict(v) if isinstance(v, dict) else v)
                for k, v in self.stack.overrides.items()}
        for key, value in changes.items():
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
        self.n += 1
        config = write_config(self.tmp / f"maicivy-{self.n}.yaml", data,
                              [str(self.ssh_host.known_hosts)])
        return fab(self.ssh_host, config, *(args or ("deploy",)), timeout=900)

    def fresh(self) -> None:
        """A fresh server after provision's directories and .env: no stack, no stack
        files, no deploy state and no certificate."""
        s = self.settings
        if (self.root / "docker/docker-compose.prod.yml").exists():
            self.stack.down()
        remove_release_tags(PROJECT)
        dirs = (s.backup.dir, s.backup.textfile_dir, s.tls.webroot, s.root)
        self.stack.run("rm -rf " + " ".join(shlex.quote(d) for d in dirs))
        for d in dirs:
            self.stack.run(f"mkdir -p {shlex.quote(d)}")
        self.stack.write_env()

    def at_defaults(self) -> None:
        """The stack deployed with the rig's settings (rate 6000/min, disk alert < 15%)."""
        if not (self.root / "docker/docker-compose.prod.yml").exists():
            self.fresh()
        proc = self.deploy()
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def nginx_t(self) -> str:
        return docker("exec", container("nginx"), "nginx", "-T")

    def served_config_id(self) -> str:
        return docker("exec", container("nginx"), "wget", "-qO-",
                      "http://127.0.0.1:8099/config-id").strip()

    def file_config_id(self) -> str | None:
        return embedded_config_id((self.root / "docker/nginx/nginx.conf").read_bytes())

    def burst(self, n: int = 25) -> list[int]:
        """``n`` requests at once-after-another to a rate-limited location."""
        return [get(self.settings.domain, self.settings.publish.https, "/")[0]
                for _ in range(n)]

    def alert_query(self, name: str) -> str:
        out = docker("exec", container("prometheus"), "wget", "-qO-",
                     f"http://127.0.0.1:{self.settings.ports.prometheus}/api/v1/rules")
        rules = [r for g in json.loads(out)["data"]["groups"] for r in g["rules"]]
        return next(r["query"] for r in rules if r["name"] == name)


@pytest.fixture(scope="module")
def rig(ssh_host, tmp_path_factory):
    r = Rig(ssh_host, tmp_path_factory.mktemp("running"))
    r.fresh()  # also drops the release tags an interrupted earlier run left
    try:
        yield r
    finally:
        docker("kill", "-s", "CONT", *docker("ps", "-q", "--filter",
               f"label=com.docker.compose.project={PROJECT}").split(), check=False)
        r.stack.down()
        remove_release_tags(PROJECT)


def test_first_deploy_on_a_server_without_certificates(rig):
    rig.fresh()
    certs = rig.root / "docker/nginx/certs"
    assert not certs.exists() or not any(certs.rglob("*.pem"))
    proc = rig.deploy()
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "self-signed stand-in certificate created for" in out
    for name in tls_domains(rig.settings):
        assert (certs / name / "fullchain.pem").stat().st_size > 0
        assert oct((certs / name / "privkey.pem").stat().st_mode & 0o777) == "0o600"
    assert rig.stack.service_health() == {name: "healthy" for name in SERVICES}
    assert get(rig.settings.domain, rig.settings.publish.https, "/health")[0] == 200
    # nginx serves the very file that was deployed.
    assert rig.served_config_id() == rig.file_config_id() is not None


CHANGED = {"rate_limit": {"per_minute": 60, "burst": 5}, "alerts": {"disk_free_percent": 12}}


def test_changed_nginx_setting_and_alert_threshold_are_in_effect(rig):
    rig.at_defaults()
    time.sleep(2)  # let the rate limiter forget an earlier burst
    assert "rate=6000r/m" in rig.nginx_t()
    assert 429 not in rig.burst()
    assert "< 15" in rig.alert_query("DiskSpaceLow")
    nginx_before = container("nginx")
    proc = rig.deploy(**CHANGED)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "nginx: reloading" in out and "prometheus: reloading" in out
    assert container("nginx") == nginx_before  # reloaded, not recreated
    conf = rig.nginx_t()
    assert "rate=60r/m" in conf and "rate=6000r/m" not in conf
    codes = rig.burst()
    assert codes.count(429) >= 10 and codes[0] == 200, codes
    assert rig.served_config_id() == rig.file_config_id()
    assert "< 12" in rig.alert_query("DiskSpaceLow")


def test_rollback_puts_the_previous_config_in_effect(rig):
    rig.at_defaults()
    changed = rig.deploy(**CHANGED)
    assert changed.returncode == 0, changed.stdout + changed.stderr
    assert "rate=60r/m" in rig.nginx_t()
    time.sleep(2)  # let the rate limiter forget an earlier burst
    proc = rig.deploy("deploy.rollback")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = rig.nginx_t()
    assert "rate=6000r/m" in conf and "rate=60r/m" not in conf
    assert 429 not in rig.burst()
    assert rig.served_config_id() == rig.file_config_id()
    assert "< 15" in rig.alert_query("DiskSpaceLow")


def test_a_reload_that_does_not_take_effect_fails_the_deploy(rig):
    """nginx's master process stopped: ``nginx -s reload`` succeeds, the workers keep
    serving the old configuration. The deploy must see it and roll back."""
    rig.at_defaults()
    nginx = container("nginx")
    before = rig.served_config_id()
    docker("kill", "-s", "STOP", nginx)
    try:
        proc = rig.deploy(rate_limit={"per_minute": 1200})
    finally:
        docker("kill", "-s", "CONT", nginx)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "nginx: reloading" in err
    assert "(the reload did not take effect)" in err
    assert "rolled back automatically" in err
    # The server's files are the previous release's, and nginx serves them.
    assert "rate=6000r/m" in (rig.root / "docker/nginx/nginx.conf").read_text()
    assert rig.file_config_id() == before
    deadline = time.monotonic() + 30
    while rig.served_config_id() != before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert rig.served_config_id() == before
    assert "rate=6000r/m" in rig.nginx_t()


def test_restarted_backend_is_found_again_without_an_nginx_reload(rig):
    """What Docker's restart policy does after a crash: the container comes back,
    often with another address; nginx asks Docker's DNS again (no reload)."""
    rig.at_defaults()
    nginx = container("nginx")
    workers = pids(docker("top", nginx))
    backend = container("backend")
    net = f"{PROJECT}_edge"
    fmt = "{{(index .NetworkSettings.Networks \"" + net + "\").IPAddress}}"
    old_ip = docker("inspect", "-f", fmt, backend).strip()
    docker("stop", "-t", "5", backend)
    # Another container on the network meanwhile, as on a busy host: the backend
    # comes back with another address.
    holder = f"{PROJECT}-ip-holder"
    docker("rm", "-f", holder, check=False)
    docker("run", "-d", "--name", holder, "--network", net, "--entrypoint", "sleep",
           rig.stack.settings.image("backend"), "300")
    try:
        docker("start", backend)
        new_ip = docker("inspect", "-f", fmt, backend).strip()
        deadline = time.monotonic() + 60
        status = 0
        while time.monotonic() < deadline:
            try:
                status = get(rig.settings.domain, rig.settings.publish.https, "/health",
                             timeout=5)[0]
            except OSError:
                status = 0
            if status == 200:
                break
            time.sleep(0.5)
    finally:
        docker("rm", "-f", holder, check=False)
    assert new_ip and new_ip != old_ip, (old_ip, new_ip)
    assert status == 200, f"/health still answers {status} after the backend restarted"
    assert workers and pids(docker("top", nginx)) == workers  # the same ones: no reload


def test_private_images_are_pulled_with_the_credentials_in_env(rig, tmp_path):
    """REGISTRY_USERNAME / REGISTRY_PASSWORD in the server's .env: deploy logs in
    (password on docker's stdin) before it pulls."""
    from registry_support import AuthRegistry
    from rig.images import BACKEND_V2

    rig.at_defaults()
    registry = AuthRegistry(tmp_path).start()
    env_file = rig.root / ".env"
    original = env_file.read_text()
    ref = None
    try:
        ref = registry.push(BACKEND_V2, "maicivy/backend:v2")
        # No credentials yet: the pull is refused, nothing changes.
        proc = rig.deploy(images={"backend": ref})
        assert proc.returncode != 0
        assert "docker compose pull failed" in proc.stderr, proc.stderr
        assert "rate=6000r/m" in (rig.root / "docker/nginx/nginx.conf").read_text()
        assert f"{ref}" not in (rig.root / "docker/docker-compose.prod.yml").read_text()
        # A wrong password: one line naming the registry and the .env keys.
        env_file.write_text(original + f"REGISTRY_USERNAME={registry.user}\n"
                                       "REGISTRY_PASSWORD=not-the-password\n")
        proc = rig.deploy(images={"backend": ref})
        assert proc.returncode != 0
        assert f"docker login to {registry.host}:" in proc.stderr, proc.stderr
        assert "check REGISTRY_USERNAME and REGISTRY_PASSWORD" in proc.stderr
        # The right one, quoted as a .env may have it.
        env_file.write_text(original + f"REGISTRY_USERNAME={registry.user}\n"
                                       f"REGISTRY_PASSWORD='{registry.password}'\n")
        proc = rig.deploy(images={"backend": ref})
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert registry.password not in out
        assert registry.password not in (rig.root / ".deploy/deploy.log").read_text()
        status, body = get(rig.settings.domain, rig.settings.publish.https, "/health")
        assert status == 200 and json.loads(body)["version"] == "v2"
        assert docker("inspect", "-f", "{{.Config.Image}}", container("backend")).strip() == ref
    finally:
        env_file.write_text(original)
        registry.stop()
        if ref:
            docker("rmi", ref, check=False)
