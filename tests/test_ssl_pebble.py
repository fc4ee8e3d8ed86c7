"""ssl.obtain / ssl.renew / ssl.status end to end against pebble, a real ACME server.

pebble's validation authority really fetches every http-01 challenge: its
DNS (pebble-challtestsrv) sends the test names to 127.0.0.1 and it connects to
the stack's published HTTP port, i.e. to the nginx container serving the
certbot webroot. certbot runs on the "server" (this machine, reached through
the rig's sshd); the tasks run through the real fab and inv CLIs.

One stack and one pebble for the module: the fixtures record what nginx
served at first boot and run the first ``ssl.obtain``, so that the tests,
which check those and what follows, run in any order.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import free_port
from ssl_support import Pebble, fab, inv, served_certificate, task_env
from stack_rig import StackRig

from fabfile import ssl as tls

pytestmark = pytest.mark.rig

SITE, GRAFANA = "maicivy.test", "grafana.maicivy.test"


@pytest.fixture(scope="module")
def pebble(tmp_path_factory):
    http_port = free_port()
    server = Pebble(tmp_path_factory.mktemp("pebble"), http_port).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def stack(ssh_host, tmp_path_factory, pebble):
    if not subprocess.run(["which", "certbot"], capture_output=True).returncode == 0:
        pytest.fail("certbot not found on the server: apt-get install certbot")
    tmp = tmp_path_factory.mktemp("sslstack")
    rig = StackRig(
        ssh_host, tmp, f"maicivyssl{os.getpid()}",
        publish={"bind": "127.0.0.1", "http": pebble.http_port, "https": free_port()},
        tls={"acme_server": pebble.directory_url, "ca_bundle": str(pebble.ca_bundle),
             "email": "ops@maicivy.test", "letsencrypt_dir": str(tmp / "letsencrypt")},
    )
    try:
        rig.up()
        rig.first_boot = {n: served_certificate(rig.settings.publish.https, n)
                          for n in (SITE, GRAFANA)}
        yield rig
    finally:
        rig.down()


@pytest.fixture(scope="module")
def obtained(stack, pebble):
    """The first ``fab ssl.obtain`` of the stack, with nginx's identity around it."""
    before = nginx_identity(stack)
    proc = fab(stack, "ssl.obtain")
    return proc, before, nginx_identity(stack)


def nginx_identity(stack) -> tuple[str, str]:
    """(container start time, nginx master pid): both unchanged by a reload."""
    started = stack.host.check(
        "docker inspect -f '{{.State.StartedAt}}' "
        "$(" + stack.compose("ps", "-q", "nginx") + ")").stdout.strip()
    pid = stack.host.check(stack.compose("exec", "-T", "nginx", "cat", "/tmp/nginx.pid"))
    return started, pid.stdout.strip()


@contextlib.contextmanager
def acme_server_gone(stack, pebble):
    """The lineages' ACME server stops answering: their renewal files name a port where
    nothing listens (certbot's account copied there), put back afterwards; pebble
    itself keeps running for the other tests."""
    config = Path(tls.certbot_dirs(stack.settings)["config"])
    old = pebble.directory_url.split("/")[2]
    gone = f"127.0.0.1:{free_port()}"
    confs = {p: p.read_text() for p in (config / "renewal").glob("*.conf")}
    assert len(confs) == 2 and all(f"server = https://{old}/dir" in t for t in confs.values())
    shutil.copytree(config / "accounts" / old, config / "accounts" / gone)
    try:
        for path, text in confs.items():
            path.write_text(text.replace(f"https://{old}/dir", f"https://{gone}/dir"))
        yield
    finally:
        for path, text in confs.items():
            path.write_text(text)
        shutil.rmtree(config / "accounts" / gone)


def lineage_serial(stack, name: str) -> str:
    path = f"{tls.live_dir(stack.settings, name)}/cert.pem"
    out = subprocess.run(["openssl", "x509", "-in", path, "-noout", "-serial"],
                         capture_output=True, text=True, check=True).stdout
    return out.strip().split("=", 1)[1].lower()


def test_first_boot_serves_a_self_signed_stand_in(stack):
    for name in (SITE, GRAFANA):
        cert = stack.first_boot[name]
        assert cert["issuer"] == cert["subject"] == f"CN={name}"


def test_obtain_gets_certificates_through_the_nginx_webroot_and_reloads_nginx(stack, obtained):
    proc, before, after = obtained
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"new certificates, installed for nginx (reloaded): {SITE}, {GRAFANA}" in proc.stdout
    for name in (SITE, GRAFANA):
        cert = served_certificate(stack.settings.publish.https, name)
        assert cert["issuer"].startswith("CN=Pebble Intermediate CA")
        assert cert["subject"] == f"CN={name}"
        assert cert["serial"] == lineage_serial(stack, name)
    # pebble fetched the challenges through nginx (its access log), over plain HTTP
    logs = stack.host.check(stack.compose("logs", "--no-log-prefix", "nginx")).stdout
    assert logs.count('"GET /.well-known/acme-challenge/') >= 2
    assert after == before  # reloaded, not restarted


def test_status_shows_issuer_expiry_and_days_left(stack, obtained):
    proc = fab(stack, "ssl.status", "--json")
    assert proc.returncode == 0, proc.stderr
    served = {c["domain"]: c for c in json.loads(proc.stdout) if c["source"] == "served"}
    assert set(served) == {SITE, GRAFANA}
    for name, cert in served.items():
        assert cert["issuer"].startswith("Pebble Intermediate CA")
        assert cert["days_left"] > 300 and cert["not_after"].endswith("Z")
        assert cert["serial"] == lineage_serial(stack, name)
    table = fab(stack, "ssl.status").stdout.splitlines()
    assert table[0].split()[:2] == ["DOMAIN", "ISSUER"]
    assert any(line.startswith(SITE) and "Pebble Intermediate CA" in line for line in table)


def test_obtain_dry_run_shows_the_certbot_commands_and_changes_nothing(stack, obtained):
    serials = {n: lineage_serial(stack, n) for n in (SITE, GRAFANA)}
    proc = fab(stack, "ssl.obtain", "--force", "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    planned = [ln for ln in proc.stdout.splitlines() if "[dry-run] would run:" in ln
               and " certbot certonly " in ln]
    assert len(planned) == 2 and all("--force-renewal" in ln for ln in planned)
    assert {n: lineage_serial(stack, n) for n in (SITE, GRAFANA)} == serials


def test_obtain_again_keeps_the_certificates_that_are_not_due(stack, obtained):
    serials = {n: lineage_serial(stack, n) for n in (SITE, GRAFANA)}
    proc = inv(stack, "ssl.obtain")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "certificates not due for renewal: kept" in proc.stdout
    assert {n: lineage_serial(stack, n) for n in (SITE, GRAFANA)} == serials


def test_forced_renewal_is_served_without_restarting_nginx(stack, obtained):
    before = nginx_identity(stack)
    old = {n: served_certificate(stack.settings.publish.https, n)["serial"]
           for n in (SITE, GRAFANA)}
    proc = inv(stack, "ssl.renew", "--force")  # as cron runs it on the server
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Congratulations, all renewals succeeded" in proc.stdout
    for name in (SITE, GRAFANA):
        new = served_certificate(stack.settings.publish.https, name)
        assert new["serial"] != old[name]
        assert new["serial"] == lineage_serial(stack, name)
    assert nginx_identity(stack) == before


def test_renew_that_is_not_due_changes_nothing(stack, obtained):
    serial = served_certificate(stack.settings.publish.https, SITE)["serial"]
    proc = fab(stack, "ssl.renew")
    assert proc.returncode == 0, proc.stderr
    assert "not due for renewal" in proc.stdout or "No renewals were attempted" in proc.stdout
    assert served_certificate(stack.settings.publish.https, SITE)["serial"] == serial


def test_failed_renewal_exits_non_zero_and_the_current_certificate_keeps_serving(
        stack, pebble, obtained):
    serving = {n: served_certificate(stack.settings.publish.https, n)["serial"]
               for n in (SITE, GRAFANA)}
    files = {n: stack.host.read_file(f"{tls.cert_dir(stack.settings, n)}/fullchain.pem")
             for n in (SITE, GRAFANA)}
    with acme_server_gone(stack, pebble):
        proc = inv(stack, "ssl.renew", "--force")
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: certbot renew failed")
    assert "the current certificates keep serving" in proc.stderr
    for name in (SITE, GRAFANA):
        assert served_certificate(stack.settings.publish.https, name)["serial"] == serving[name]
        assert stack.host.read_file(
            f"{tls.cert_dir(stack.settings, name)}/fullchain.pem") == files[name]


def test_obtain_refuses_staging_with_a_private_ca_before_touching_anything(stack):
    proc = fab(stack, "ssl.obtain", env=task_env(stack, tls={"staging": True}))
    assert proc.returncode == 1
    assert "maicivy.tls.staging only switches Let's Encrypt" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
