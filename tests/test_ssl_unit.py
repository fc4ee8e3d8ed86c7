"""ssl: the certbot command lines, the deploy hook (run for real, locally), cert parsing."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from fabfile import ssl as tls
from fabfile.config import load_settings
from fabfile.errors import ConfigError, OpsError


def settings(**over):
    return load_settings(environ={}, files=[], overrides=over)


def argv(command: str) -> list[str]:
    return shlex.split(command)


def make_cert(directory: Path, cn: str, days: int = 30) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:P-256", "-nodes", "-days", str(days), "-subj", f"/CN={cn}",
                    "-keyout", str(directory / "privkey.pem"),
                    "-out", str(directory / "fullchain.pem")], check=True, capture_output=True)


# --- command lines ------------------------------------------------------------------


def test_obtain_command_is_a_webroot_certonly_against_the_configured_server():
    s = settings(tls={"acme_server": "https://127.0.0.1:14000/dir", "email": "ops@maicivy.test",
                      "letsencrypt_dir": "/srv/le", "ca_bundle": "/srv/pebble.pem"})
    a = argv(tls.obtain_command(s, "maicivy.example.com", ["maicivy.example.com"]))
    assert a[:3] == ["env", "REQUESTS_CA_BUNDLE=/srv/pebble.pem", "certbot"]
    assert a[3] == "certonly"
    pairs = dict(zip(a, a[1:], strict=False))
    assert pairs["--webroot-path"] == "/var/www/certbot"
    assert pairs["--server"] == "https://127.0.0.1:14000/dir"
    assert pairs["--cert-name"] == "maicivy.example.com"
    assert pairs["--email"] == "ops@maicivy.test"
    assert pairs["--config-dir"] == "/srv/le"
    assert pairs["--work-dir"] == "/srv/le/work"
    assert pairs["--logs-dir"] == "/srv/le/logs"
    # the hook's path only (certbot stores it for renewals); its values beside it
    assert argv(pairs["--deploy-hook"]) == ["/opt/maicivy/ssl/deploy-hook.sh"]
    assert tls.hook_values(settings()).splitlines() == [
        "/opt/maicivy/docker/nginx/certs", "maicivy",
        "/opt/maicivy/.env", "/opt/maicivy/docker/docker-compose.prod.yml",
        "maicivy.example.com", "grafana.maicivy.example.com"]
    assert {"--webroot", "--non-interactive", "--agree-tos", "--keep-until-expiring"} <= set(a)
    assert "--force-renewal" not in a


def test_obtain_without_email_registers_without_one_and_force_renews():
    a = argv(tls.obtain_command(settings(), "x.example.com", ["x.example.com"], force=True))
    assert a[0] == "certbot"
    assert "--register-unsafely-without-email" in a and "--email" not in a
    assert "--force-renewal" in a and "--keep-until-expiring" not in a


def test_site_lineage_covers_the_api_name_and_grafana_has_its_own():
    s = settings(domain="maicivy.example.com", api_domain="api.maicivy.example.com",
                 grafana_domain="grafana.maicivy.example.com")
    assert tls.lineages(s) == {
        "maicivy.example.com": ["maicivy.example.com", "api.maicivy.example.com"],
        "grafana.maicivy.example.com": ["grafana.maicivy.example.com"],
    }
    a = argv(tls.obtain_command(s, "maicivy.example.com", tls.lineages(s)["maicivy.example.com"]))
    assert [a[i + 1] for i, x in enumerate(a) if x == "-d"] == [
        "maicivy.example.com", "api.maicivy.example.com"]
    assert tls.cert_names(s) == ["maicivy.example.com", "grafana.maicivy.example.com"]


def test_staging_switches_lets_encrypt_to_its_staging_directory():
    assert tls.acme_directory(settings(tls={"staging": True})) == tls.LE_STAGING
    assert tls.acme_directory(settings()) == tls.LE_PRODUCTION


def test_staging_with_another_ca_is_refused_with_what_to_do():
    s = settings(tls={"staging": True, "acme_server": "https://acme.example.org/dir"})
    with pytest.raises(OpsError, match="set maicivy.tls.acme_server to its staging directory"):
        tls.acme_directory(s)


def test_renew_command_passes_the_deploy_hook_and_forces_only_when_asked():
    s = settings()
    a = argv(tls.renew_command(s))
    assert a[:2] == ["certbot", "renew"] and "--deploy-hook" in a
    assert "--no-random-sleep-on-renew" in a  # no 0-8 minute nap when run without a tty
    assert "--force-renewal" not in a
    assert "--force-renewal" in argv(tls.renew_command(s, force=True))


@pytest.mark.parametrize("key,value,message", [
    ("acme_server", "http://acme.example.org/dir", "an https:// ACME directory URL"),
    ("email", "not-an-address", "empty or an e-mail address"),
    ("staging", "yes", "true or false"),
    ("ca_bundle", "relative.pem", "empty or an absolute path"),
    ("critical_days", 30, "smaller than maicivy.tls.warn_days"),
])
def test_bad_tls_settings_are_refused_naming_the_key(key, value, message):
    with pytest.raises(ConfigError, match=f"maicivy.tls.{key} must be {message}"):
        settings(tls={key: value})


def test_certbot_error_keeps_the_lines_that_explain_the_failure():
    out = """Saving debug log to /x/letsencrypt.log
Requesting a certificate for maicivy.test
Certbot failed to authenticate some domains (authenticator: webroot).
  Domain: maicivy.test
  Type:   connection
  Detail: 127.0.0.1: Fetching http://maicivy.test/.well-known/acme-challenge/x: Connection refused
Hint: The Certificate Authority failed to download the temporary challenge files.
Some challenges have failed.
Ask for help or search for solutions at https://community.letsencrypt.org. See the logfile
"""
    line = tls.certbot_error(out)
    assert "Connection refused" in line and "\n" not in line
    assert "Ask for help" not in line


# --- the deploy hook, run for real on this machine ------------------------------------


@pytest.fixture
def hook_env(tmp_path):
    root = tmp_path / "srv"
    s = settings(root=str(root), compose_project="maicivyhooktest",
                 tls={"letsencrypt_dir": str(tmp_path / "le")},
                 domain="maicivy.test", grafana_domain="grafana.maicivy.test")
    hook = Path(tls.hook_path(s))
    hook.parent.mkdir(parents=True)
    hook.write_text(tls.deploy_hook_script(s))
    hook.chmod(0o755)
    Path(tls.hook_values_path(s)).write_text(tls.hook_values(s))
    return s, tmp_path


def run_hook(s, lineage: Path, env=None) -> subprocess.CompletedProcess:
    """The hook as certbot runs it: its --deploy-hook command, in a shell."""
    return subprocess.run(["sh", "-c", tls.hook_command(s)],
                          env={**(env or os.environ), "RENEWED_LINEAGE": str(lineage)},
                          capture_output=True, text=True, timeout=60)


def test_deploy_hook_is_valid_bash():
    proc = subprocess.run(["bash", "-n"], input=tls.deploy_hook_script(settings()),
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# nginx runs; `nginx -t` answers as NGINX_T says (0: accepts the files)
FAKE_DOCKER = """
case "$*" in
  *" ps --status running --services") echo postgres; echo nginx;;
  *" exec -T nginx nginx -t -q") [ "${NGINX_T:-0}" = 0 ] || echo "nginx: [emerg] bad key" >&2
                                 exit "${NGINX_T:-0}";;
  *" exec -T nginx nginx -s reload") ;;
  *) echo "unexpected docker $*" >&2; exit 99;;
esac
"""


def test_deploy_hook_installs_and_reloads_a_running_nginx(hook_env):
    from fake_tools import calls, fake_path

    s, tmp = hook_env
    lineage = tmp / "le" / "live" / "grafana.maicivy.test"
    make_cert(lineage, "grafana.maicivy.test")
    proc = run_hook(s, lineage, env=fake_path(tmp, docker=FAKE_DOCKER))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "maicivy deploy hook: installed grafana.maicivy.test and reloaded nginx\n"
    compose = (f"docker compose --project-name maicivyhooktest --env-file {s.env_file} "
               f"-f {s.compose_file}")
    assert calls(tmp) == [f"{compose} ps --status running --services",
                          f"{compose} exec -T nginx nginx -t -q",
                          f"{compose} exec -T nginx nginx -s reload"]
    dest = Path(tls.cert_dir(s, "grafana.maicivy.test"))
    assert sorted(p.name for p in dest.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_deploy_hook_puts_the_previous_certificate_back_when_nginx_rejects_the_new_one(
        hook_env):
    from fake_tools import calls, fake_path

    s, tmp = hook_env
    dest = Path(tls.cert_dir(s, "maicivy.test"))
    make_cert(dest, "maicivy.test")
    before = {f: (dest / f).read_bytes() for f in ("fullchain.pem", "privkey.pem")}
    lineage = tmp / "le" / "live" / "maicivy.test"
    make_cert(lineage, "maicivy.test")
    env = {**fake_path(tmp, docker=FAKE_DOCKER), "NGINX_T": "1"}
    proc = run_hook(s, lineage, env=env)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        "nginx: [emerg] bad key",
        "maicivy deploy hook: nginx rejects the new maicivy.test certificate; "
        "previous one restored"]
    assert {f: (dest / f).read_bytes() for f in before} == before
    assert sorted(p.name for p in dest.iterdir()) == ["fullchain.pem", "privkey.pem"]
    assert not any("reload" in c for c in calls(tmp))


def test_the_hook_without_its_values_says_what_installs_the_certificate(hook_env):
    s, tmp = hook_env
    lineage = tmp / "le" / "live" / "maicivy.test"
    make_cert(lineage, "maicivy.test")
    Path(tls.hook_values_path(s)).unlink()
    proc = subprocess.run([tls.hook_path(s)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "RENEWED_LINEAGE": str(lineage)})
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == (f"maicivy deploy hook: cannot read the stack's values from "
                           f"{tls.hook_values_path(s)}; run ssl.renew, which rewrites them "
                           "and installs the certificate for nginx\n")
    assert not Path(tls.cert_dir(s, "maicivy.test")).exists()


def test_the_hook_says_how_certbot_runs_it_when_run_by_hand(hook_env):
    s, tmp = hook_env
    proc = subprocess.run(["sh", "-c", tls.hook_command(s)], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k != "RENEWED_LINEAGE"})
    assert proc.returncode == 1
    assert proc.stderr.strip().endswith(
        "RENEWED_LINEAGE: this hook is run by certbot, with RENEWED_LINEAGE set")


def test_deploy_hook_installs_a_lineage_for_nginx_with_a_private_key_mode(hook_env):
    s, tmp = hook_env
    lineage = tmp / "le" / "live" / "maicivy.test"
    make_cert(lineage, "maicivy.test")
    proc = run_hook(s, lineage)
    assert proc.returncode == 0, proc.stderr
    # no stack runs under that project name: installed, nginx left for its next start
    assert "nginx is not running" in proc.stdout
    dest = Path(tls.cert_dir(s, "maicivy.test"))
    assert (dest / "fullchain.pem").read_bytes() == (lineage / "fullchain.pem").read_bytes()
    assert (dest / "privkey.pem").read_bytes() == (lineage / "privkey.pem").read_bytes()
    assert (dest / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in dest.iterdir()) == ["fullchain.pem", "privkey.pem"]


def test_deploy_hook_refuses_a_key_that_does_not_match_and_installs_nothing(hook_env):
    s, tmp = hook_env
    dest = Path(tls.cert_dir(s, "maicivy.test"))
    make_cert(dest, "maicivy.test")
    before = (dest / "fullchain.pem").read_bytes()
    lineage = tmp / "le" / "live" / "maicivy.test"
    make_cert(lineage, "maicivy.test")
    other = tmp / "other"
    make_cert(other, "other")
    (lineage / "privkey.pem").write_bytes((other / "privkey.pem").read_bytes())
    proc = run_hook(s, lineage)
    assert proc.returncode == 1
    assert "certificate and key do not match" in proc.stderr
    assert (dest / "fullchain.pem").read_bytes() == before


def test_deploy_hook_leaves_certificates_of_other_sites_alone(hook_env):
    s, tmp = hook_env
    lineage = tmp / "le" / "live" / "someone-else.example.org"
    make_cert(lineage, "someone-else.example.org")
    proc = run_hook(s, lineage)
    assert proc.returncode == 0
    assert "not a certificate of this stack" in proc.stdout
    assert not Path(tls.cert_dir(s, "someone-else.example.org")).exists()


# --- self-signed stand-ins (stack.ensure_certificates) --------------------------------


def test_stand_in_certificates_are_made_once_for_names_without_one(tmp_path):
    from invoke import Context

    from fabfile.host import Host
    from fabfile.stack import ensure_certificates

    s = settings(root=str(tmp_path), domain="maicivy.test", grafana_domain="grafana.maicivy.test")
    keep = Path(tls.cert_dir(s, "grafana.maicivy.test"))
    make_cert(keep, "grafana.maicivy.test")
    before = (keep / "fullchain.pem").read_bytes()
    host = Host(Context())
    assert ensure_certificates(host, s) == ["maicivy.test"]
    made = Path(tls.cert_dir(s, "maicivy.test"))
    assert sorted(p.name for p in made.iterdir()) == ["fullchain.pem", "privkey.pem"]
    assert (made / "privkey.pem").stat().st_mode & 0o777 == 0o600
    assert (keep / "fullchain.pem").read_bytes() == before
    assert ensure_certificates(host, s) == []


def test_a_stand_in_that_cannot_be_made_fails_and_leaves_nothing_half_written(tmp_path):
    from fake_tools import fake_path, run

    from fabfile.stack import SELF_SIGNED

    env = fake_path(tmp_path, openssl="echo 'openssl: no entropy' >&2; exit 1")
    r = run(SELF_SIGNED.command(30, tmp_path / "certs", "a.test", "b.test"), env)
    assert (r.returncode, r.stdout, r.stderr) == (1, "", "")
    assert list((tmp_path / "certs").iterdir()) == [tmp_path / "certs/a.test"]
    assert list((tmp_path / "certs/a.test").iterdir()) == []


# --- reading certificates ----------------------------------------------------------


def test_file_probe_reads_issuer_expiry_and_days_left(tmp_path):
    s = settings(root=str(tmp_path), domain="maicivy.test", grafana_domain="grafana.maicivy.test",
                 publish={"https": 9, "bind": "127.0.0.1"})
    make_cert(Path(tls.cert_dir(s, "maicivy.test")), "maicivy.test", days=10)
    out = subprocess.run(["bash", "-c", tls.cert_probe_command(s)],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    info = [i for i in tls.parse_cert_probe(out)
            if (i.domain, i.source) == ("maicivy.test", "file")][0]
    assert info.error == ""
    assert info.issuer == info.subject == "maicivy.test" and info.self_signed
    assert 9 <= info.days_left <= 10
    assert info.not_after.endswith("Z") and len(info.serial) > 8


def test_probe_of_a_missing_certificate_and_of_a_silent_port_reports_errors(tmp_path):
    s = settings(root=str(tmp_path), domain="maicivy.test", grafana_domain="grafana.maicivy.test",
                 publish={"https": 9, "bind": "127.0.0.1"})
    out = subprocess.run(["bash", "-c", tls.cert_probe_command(s)], capture_output=True,
                         text=True, timeout=60).stdout
    infos = tls.parse_cert_probe(out)
    assert [(i.domain, i.source) for i in infos] == [
        ("maicivy.test", "served"), ("maicivy.test", "file"),
        ("grafana.maicivy.test", "served"), ("grafana.maicivy.test", "file")]
    assert all(i.error for i in infos)
    assert infos[0].error.startswith("no TLS answer") and infos[1].error.startswith(
        "no certificate")
    table = tls.format_status(infos)
    assert table[0].split() == ["DOMAIN", "ISSUER", "EXPIRES", "(UTC)", "DAYS", "LEFT", "NOTE"]
    assert "nginx: no TLS answer" in table[1]


def test_status_table_flags_a_new_file_waiting_for_reload_and_self_signed_stand_ins():
    served = tls.CertInfo("maicivy.test", "served", serial="01", issuer="maicivy.test",
                          subject="maicivy.test", not_after="2026-12-25T00:00:00Z", days_left=30)
    on_disk = tls.CertInfo("maicivy.test", "file", serial="02", issuer="Pebble Intermediate CA",
                           subject="maicivy.test", not_after="2031-11-25T00:00:00Z",
                           days_left=1826)
    row = tls.format_status([served, on_disk])[1]
    assert "maicivy.test" in row and " 30 " in row
    assert "not loaded yet: reload nginx" in row and "self-signed stand-in" in row


def test_local_address_uses_loopback_for_wildcard_binds():
    assert tls.local_address(settings(publish={"bind": "0.0.0.0"})) == "127.0.0.1"
    assert tls.local_address(settings(publish={"bind": "::"})) == "::1"
    assert tls.local_address(settings(publish={"bind": "127.0.0.2"})) == "127.0.0.2"
