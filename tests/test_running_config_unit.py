"""The proof that services run what was deployed: pure parts (no server)."""

from __future__ import annotations

from fabfile.config import load_settings
from fabfile.deploy.proof import (
    Proof,
    deployed_proof,
    mounted_files,
    proof_command,
    proof_failures,
)
from fabfile.stack import remote_files


def settings(**overrides):
    return load_settings(invoke_section=overrides, environ={}, files=[])


def test_mounted_files_follow_the_compose_file():
    s = settings()
    proof = deployed_proof(s, remote_files(s))
    assert proof.mounts["nginx"]["docker/nginx/nginx.conf"] == "/etc/nginx/nginx.conf"
    assert proof.mounts["nginx"]["docker/nginx/mime.types"] == "/etc/nginx/mime.types"
    assert (proof.mounts["prometheus"]["monitoring/prometheus/alerts.yml"]
            == "/etc/prometheus/alerts.yml")
    assert (proof.mounts["grafana"]["monitoring/grafana/dashboards/maicivy_overview.json"]
            == "/var/lib/grafana/dashboards/maicivy_overview.json")
    assert "backend" not in proof.mounts
    assert proof.nginx_config_id and len(proof.nginx_config_id) == 16
    # Single-file mounts and absolute sources under the root are understood too.
    compose = ("services:\n  web:\n    volumes:\n      - ./nginx/nginx.conf:/etc/n.conf:ro\n"
               "      - /srv/x/monitoring:/m\n      - data:/var/lib\n")
    assert mounted_files(compose, ["docker/nginx/nginx.conf", "monitoring/a.yml"], "/srv/x") \
        == {"web": {"docker/nginx/nginx.conf": "/etc/n.conf", "monitoring/a.yml": "/m/a.yml"}}


PROOF = Proof(mounts={"nginx": {"docker/nginx/nginx.conf": "/etc/nginx/nginx.conf"},
                      "prometheus": {"monitoring/prometheus/alerts.yml":
                                     "/etc/prometheus/alerts.yml"}},
              expected={"docker/nginx/nginx.conf": "aa", "monitoring/prometheus/alerts.yml": "bb"},
              nginx_config_id="0123456789abcdef")


def output(nginx_seen="aa", served="0123456789abcdef", prom_seen="bb", ok=1, loaded=200.5,
           ctime=200):
    return "\n".join([
        "== host", "aa  docker/nginx/nginx.conf", "bb  monitoring/prometheus/alerts.yml",
        "== seen.nginx", f"{nginx_seen}  /etc/nginx/nginx.conf",
        "== nginx-config-id", served,
        "== seen.prometheus", f"{prom_seen}  /etc/prometheus/alerts.yml",
        "== prometheus-ctime", f"{ctime} /etc/prometheus/alerts.yml",
        "== prometheus-reload", f"prometheus_config_last_reload_successful {ok}",
        f"prometheus_config_last_reload_success_timestamp_seconds {loaded}",
    ]) + "\n"


def test_proof_passes_when_everything_runs_what_was_deployed():
    assert proof_failures(output(), PROOF) == []


def test_proof_names_each_mismatch():
    assert proof_failures(output(nginx_seen="old"), PROOF) == [
        "nginx: /etc/nginx/nginx.conf inside its container is not the docker/nginx/nginx.conf "
        "deployed (the container does not see the new file)"]
    assert proof_failures(output(served="fedcba9876543210"), PROOF) == [
        "nginx: serves configuration fedcba9876543210, not the deployed 0123456789abcdef "
        "(the reload did not take effect)"]
    assert proof_failures(output(ok=0), PROOF) == [
        "prometheus: its last configuration reload failed (see its log)"]
    assert proof_failures(output(loaded=150.0), PROOF) == [
        "prometheus: runs a configuration loaded before its files last changed (not reloaded)"]
    text = output().replace("aa  /etc/nginx/nginx.conf",
                            "sha256sum: /etc/nginx/nginx.conf: No such file or directory")
    assert proof_failures(text, PROOF) == [
        "nginx: cannot read /etc/nginx/nginx.conf inside its container"]


def test_rollback_proof_compares_with_the_files_on_the_host():
    rollback = Proof(mounts=PROOF.mounts, expected=None, nginx_config_id=None)
    assert proof_failures(output(), rollback) == []
    text = output().replace("aa  docker/nginx/nginx.conf", "cc  docker/nginx/nginx.conf")
    assert len(proof_failures(text, rollback)) == 1


DOCKER_PROOF = r'''
case "$*" in
  *service=nginx*) echo cnginx;;
  *service=prometheus*) echo cprom;;
  "exec cnginx sha256sum -- /etc/nginx/nginx.conf") echo "$NGINX_SEEN  /etc/nginx/nginx.conf";;
  "exec cnginx wget "*) echo 0123456789abcdef;;
  "exec cprom sha256sum "*) echo "$PROM_SEEN  /etc/prometheus/alerts.yml";;
  "exec cprom stat "*) echo "200 /etc/prometheus/alerts.yml";;
  "exec cprom wget "*) printf '%s\n' 'prometheus_config_last_reload_successful 1' \
    'prometheus_config_last_reload_success_timestamp_seconds 200.5' 'other 1';;
esac
'''


def test_proof_asks_the_running_containers(tmp_path):
    """proof.sh run for real with a fake ``docker``: its output passes proof_failures."""
    import hashlib
    import subprocess

    root = tmp_path / "srv"
    files = {"docker/nginx/nginx.conf": "nginx\n", "monitoring/prometheus/alerts.yml": "rules\n"}
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    sums = {rel: hashlib.sha256(text.encode()).hexdigest() for rel, text in files.items()}
    proof = Proof(mounts=PROOF.mounts, expected=sums, nginx_config_id="0123456789abcdef")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "docker $*" >> "$LOG"\n'
                                    + DOCKER_PROOF)
    (bin_dir / "docker").chmod(0o755)

    def run(**env):
        return subprocess.run(
            ["bash", "-c", proof_command(settings(root=str(root)), proof)], capture_output=True,
            text=True, timeout=60, env={"PATH": f"{bin_dir}:/usr/bin:/bin",
                                        "LOG": str(tmp_path / "log"), **env})

    proc = run(NGINX_SEEN=sums["docker/nginx/nginx.conf"],
               PROM_SEEN=sums["monitoring/prometheus/alerts.yml"])
    assert proc.returncode == 0, proc.stderr
    assert proof_failures(proc.stdout, proof) == []
    log = (tmp_path / "log").read_text().splitlines()
    assert ("docker ps -q --filter label=com.docker.compose.project=maicivy --filter "
            "label=com.docker.compose.service=nginx --filter status=running") in log
    assert "docker exec cnginx wget -qO- -T 5 http://127.0.0.1:8099/config-id" in log
    assert "docker exec cprom wget -qO- -T 5 http://127.0.0.1:9090/metrics" in log
    stale = run(NGINX_SEEN="old", PROM_SEEN=sums["monitoring/prometheus/alerts.yml"])
    assert proof_failures(stale.stdout, proof) == [
        "nginx: /etc/nginx/nginx.conf inside its container is not the docker/nginx/nginx.conf "
        "deployed (the container does not see the new file)"]


def test_registry_of_an_image_reference():
    from fabfile.deploy.scripts import registry_host

    assert registry_host("ghcr.io/acme/backend:1") == "ghcr.io"
    assert registry_host("127.0.0.1:5000/maicivy/backend:v1") == "127.0.0.1:5000"
    assert registry_host("localhost/x") == "localhost"
    assert registry_host("acme/backend:1") == ""  # Docker Hub
    assert registry_host("nginx:1.27-alpine") == ""
