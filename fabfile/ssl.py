"""TLS certificates of the stack: obtain and renew them with certbot, show them.

certbot runs on the server itself (not in a container) with the *webroot*
method: it writes the ACME challenge files into ``tls.webroot``, which the
nginx container serves on port 80 under ``/.well-known/acme-challenge/``.
Its state lives under ``tls.letsencrypt_dir`` (``--config-dir``; ``work/`` and
``logs/`` below it).

Each certificate is a certbot *lineage* named after the directory nginx reads
it from (``{root}/docker/nginx/certs/<name>/``): one for the site (plus the API
name when ``api_domain`` is set) and one for Grafana. A deploy hook, written to
``{root}/ssl/deploy-hook.sh`` and passed to every certbot run, copies a new
lineage's fullchain/privkey into that directory (atomically, key and
certificate checked to match first), checks the nginx configuration inside the
container and reloads nginx without restarting it. If nginx rejects the new
files, the previous ones are put back.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from invoke import Collection

from .config import DEFAULTS, Settings
from .core import host_for, ops_task, settings_for
from .errors import OpsError
from .host import Host
from .shell import q, script
from .stack import cert_dir, compose, ensure_certificates

LE_PRODUCTION = DEFAULTS["tls"]["acme_server"]
LE_STAGING = "https://acme-staging-v02.api.letsencrypt.org/directory"
PROBE_TIMEOUT = 5

# --- pure builders ------------------------------------------------------------


def acme_directory(settings: Settings) -> str:
    """The ACME directory URL certbot talks to (staging mode applied)."""
    server = settings.tls.acme_server
    if settings.tls.staging:
        if server != LE_PRODUCTION:
            raise OpsError(
                "maicivy.tls.staging only switches Let's Encrypt to its staging server; "
                "with another CA set maicivy.tls.acme_server to its staging directory "
                "and staging to false"
            )
        return LE_STAGING
    return server


def certbot_dirs(settings: Settings) -> dict[str, str]:
    """certbot's --config-dir, --work-dir and --logs-dir."""
    base = settings.tls.letsencrypt_dir or "/"
    return {"config": base, "work": f"{base}/work", "logs": f"{base}/logs"}


def lineages(settings: Settings) -> dict[str, list[str]]:
    """``{certificate name: [names it covers]}``; each name is an nginx cert dir."""
    site = [settings.domain] + ([settings.api_domain] if settings.api_domain else [])
    return {settings.domain: site, settings.grafana_domain: [settings.grafana_domain]}


def hook_path(settings: Settings) -> str:
    return f"{settings.root}/ssl/deploy-hook.sh"


def live_dir(settings: Settings, name: str) -> str:
    return f"{certbot_dirs(settings)['config']}/live/{name}"


def local_address(settings: Settings) -> str:
    """Where nginx answers on the server itself (the publish address, or loopback)."""
    bind = settings.publish.bind
    if bind in ("0.0.0.0", ""):
        return "127.0.0.1"
    if bind in ("::", "[::]"):
        return "::1"
    return bind


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


DEPLOY_HOOK = script(__file__, "scripts/ssl-deploy-hook.sh")
CERT_PROBE = script(__file__, "scripts/ssl-certs.sh")


def deploy_hook_script(settings: Settings) -> str:
    """The deploy hook certbot runs after it obtained or renewed a lineage (the
    file's text; :func:`hook_command` gives it this stack's values)."""
    return DEPLOY_HOOK.text


def hook_values_path(settings: Settings) -> str:
    return f"{settings.root}/ssl/deploy-hook.values"


def hook_values(settings: Settings) -> str:
    """What the hook reads beside itself, one value per line: the certificates'
    directory, the stack's compose project/env/file and its lineages (certbot
    stores the hook's path only, so the values cannot be its arguments)."""
    return "".join(f"{v}\n" for v in (cert_dir(settings, "").rstrip("/"),
                                      settings.compose_project, settings.env_file,
                                      settings.compose_file, *lineages(settings)))


def hook_command(settings: Settings) -> str:
    """The command certbot runs as its deploy hook (in a shell), as certbot stores it."""
    return q(hook_path(settings))


def _certbot(settings: Settings, *args: str) -> str:
    dirs = certbot_dirs(settings)
    env = ["env", f"REQUESTS_CA_BUNDLE={settings.tls.ca_bundle}"] if settings.tls.ca_bundle else []
    argv = [
        *env, "certbot", *args,
        "--non-interactive",
        "--config-dir", dirs["config"],
        "--work-dir", dirs["work"],
        "--logs-dir", dirs["logs"],
        "--deploy-hook", hook_command(settings),
    ]
    return " ".join(shlex.quote(a) for a in argv)


def obtain_command(settings: Settings, name: str, domains: list[str], force: bool = False) -> str:
    """``certbot certonly --webroot`` for one lineage (kept until it is due, unless force)."""
    contact = (["--email", settings.tls.email, "--no-eff-email"] if settings.tls.email
               else ["--register-unsafely-without-email"])
    args = [
        "certonly", "--webroot", "--webroot-path", settings.tls.webroot,
        "--cert-name", name,
        *[arg for d in domains for arg in ("-d", d)],
        "--server", acme_directory(settings),
        "--agree-tos", *contact,
        "--force-renewal" if force else "--keep-until-expiring",
    ]
    return _certbot(settings, *args)


def renew_command(settings: Settings, force: bool = False) -> str:
    """``certbot renew`` of every lineage that is due (all of them with force).

    Without a terminal certbot would first sleep a random 0-8 minutes; the
    cron schedule (provision.cron.ssl_renew) already picks the time.
    """
    return _certbot(settings, "renew", "--no-random-sleep-on-renew",
                    *(["--force-renewal"] if force else []))


def run_hook_command(settings: Settings, name: str) -> str:
    """Run the deploy hook by hand for one lineage (what certbot would do)."""
    return f"RENEWED_LINEAGE={q(live_dir(settings, name))} {hook_command(settings)}"


def certbot_error(output: str) -> str:
    """The lines of certbot's output that say what went wrong, as one line."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    keep = [ln for ln in lines if re.search(r"(Detail:|[Ee]rror|failed|Failed|Unable|refused)",
                                           ln) and "Ask for help" not in ln
            and "log file" not in ln and "logs" not in ln and not ln.endswith(":")]
    chosen = keep[-3:] if keep else lines[-2:]
    return "; ".join(dict.fromkeys(chosen)) or "no output"


# --- certificate inspection (shared with health.check) --------------------------


@dataclass
class CertInfo:
    """One certificate: the one nginx serves for a name, or the file it will load."""

    domain: str
    source: str  # "served" or "file"
    serial: str = ""
    issuer: str = ""
    subject: str = ""
    not_after: str = ""  # ISO 8601, UTC
    days_left: float | None = None
    error: str = ""

    @property
    def self_signed(self) -> bool:
        return bool(self.issuer) and self.issuer == self.subject

    def as_dict(self) -> dict:
        return {**asdict(self), "self_signed": self.self_signed}


def cert_probe_command(settings: Settings, timeout: float = PROBE_TIMEOUT) -> str:
    """The command printing the served and on-disk certificate of every name."""
    target = _hostport(local_address(settings), settings.publish.https)
    return CERT_PROBE.command(f"{timeout:g}", target, cert_dir(settings, "").rstrip("/"),
                              *cert_names(settings))


def cert_names(settings: Settings) -> list[str]:
    """The names nginx loads a certificate for (the API name shares the site's)."""
    return list(lineages(settings))


def _cn(dn: str) -> str:
    m = re.search(r"(?:^|,)\s*CN\s*=\s*((?:[^,\\]|\\.)*)", dn)
    return m.group(1).strip() if m else dn.strip()


def parse_x509(domain: str, source: str, text: str, now: float) -> CertInfo:
    """CertInfo from ``openssl x509 -serial -issuer -subject -enddate`` output."""
    info = CertInfo(domain, source)
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in ("serial", "issuer", "subject", "notAfter"):
            fields[key] = value.strip()
    if "notAfter" not in fields:
        detail = " ".join(text.split())[:200]
        info.error = ("no certificate" + (f" ({detail})" if detail else "")) if source == "file" \
            else "no TLS answer" + (f" ({detail})" if detail else "")
        return info
    info.serial = fields.get("serial", "").lower()
    info.issuer = _cn(fields.get("issuer", ""))
    info.subject = _cn(fields.get("subject", ""))
    try:
        when = datetime.strptime(fields["notAfter"], "%b %d %H:%M:%S %Y %Z").replace(tzinfo=UTC)
    except ValueError:
        info.error = f"unreadable expiry date {fields['notAfter']!r}"
        return info
    info.not_after = when.isoformat().replace("+00:00", "Z")
    info.days_left = round((when.timestamp() - now) / 86400, 1)
    return info


def parse_cert_probe(text: str) -> list[CertInfo]:
    """Parse :func:`cert_probe_command` output."""
    now = None
    blocks: list[tuple[str, str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("@@now "):
            now = float(line.split()[1])
        elif line.startswith("@@cert "):
            _, domain, source = line.split()
            blocks.append((domain, source, []))
        elif blocks:
            blocks[-1][2].append(line)
    if now is None:
        now = datetime.now(UTC).timestamp()
    return [parse_x509(d, s, "\n".join(lines), now) for d, s, lines in blocks]


def format_status(infos: list[CertInfo]) -> list[str]:
    """The table ssl.status prints."""
    rows = [("DOMAIN", "ISSUER", "EXPIRES (UTC)", "DAYS LEFT", "NOTE")]
    by_domain: dict[str, dict[str, CertInfo]] = {}
    for info in infos:
        by_domain.setdefault(info.domain, {})[info.source] = info
    for domain, pair in by_domain.items():
        served, on_disk = pair.get("served"), pair.get("file")
        shown = served if served and not served.error else on_disk
        notes = []
        if served and served.error:
            notes.append(f"nginx: {served.error}")
        if on_disk and on_disk.error:
            notes.append(f"file: {on_disk.error}")
        if (served and on_disk and not served.error and not on_disk.error
                and served.serial != on_disk.serial):
            notes.append(f"newer file on disk (expires {on_disk.not_after[:10]}) not loaded yet: "
                         "reload nginx")
        if shown and shown.self_signed:
            notes.append("self-signed stand-in: run ssl.obtain")
        if not shown or shown.error:
            rows.append((domain, "-", "-", "-", "; ".join(notes)))
            continue
        rows.append((domain, shown.issuer, shown.not_after.replace("T", " ").rstrip("Z"),
                     f"{shown.days_left:.0f}", "; ".join(notes)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return ["  ".join(r[i].ljust(widths[i]) for i in range(4)) + ("  " + r[4] if r[4] else "")
            for r in rows]


CERT_METRIC = "maicivy_tls_certificate_not_after_timestamp_seconds"


def cert_metrics_text(infos: list[CertInfo]) -> str:
    """node-exporter textfile: expiry (Unix time) of the certificate of each name.

    The served certificate when nginx answered, else the file it will load.
    The CertificateExpiresSoon alert fires below 14 days.
    """
    best: dict[str, CertInfo] = {}
    for info in infos:
        if not info.not_after or info.error:
            continue
        if info.domain not in best or info.source == "served":
            best[info.domain] = info
    lines = [f"# HELP {CERT_METRIC} Expiry of the TLS certificate served for a name "
             "(written by ssl.renew and ssl.status).", f"# TYPE {CERT_METRIC} gauge"]
    for domain, info in sorted(best.items()):
        ts = datetime.fromisoformat(info.not_after.replace("Z", "+00:00")).timestamp()
        lines.append(f'{CERT_METRIC}{{domain="{domain}"}} {int(ts)}')
    return "\n".join(lines) + "\n"


def cert_metrics_file(settings: Settings) -> str:
    return f"{settings.backup.textfile_dir}/maicivy_tls.prom"


# --- steps ----------------------------------------------------------------------


def write_cert_metrics(host: Host, settings: Settings, infos: list[CertInfo]) -> None:
    """Update the certificate expiry metric for Prometheus (never fails the task)."""
    if host.dry_run or not any(i.not_after for i in infos):
        return
    try:
        host.run(f"mkdir -p {shlex.quote(settings.backup.textfile_dir)}", sudo=True)
        host.write_file(cert_metrics_file(settings), cert_metrics_text(infos), mode=0o644,
                        sudo=True)
    except Exception as exc:  # noqa: BLE001 - a metric must not fail a renewal
        print(f"warning: could not write the certificate metric: {exc}")


def read_certs(host: Host, settings: Settings) -> list[CertInfo]:
    """Served and on-disk certificate of every name, in one round trip."""
    r = host.check(cert_probe_command(settings), sudo=True,
                   timeout=PROBE_TIMEOUT * 2 * len(cert_names(settings)) + 10)
    return parse_cert_probe(r.stdout)


def require_certbot(host: Host) -> None:
    if not host.check("command -v certbot").ok:
        raise OpsError(f"certbot is not installed on {host.name}: apt-get install certbot "
                       "(provision installs it)")


def nginx_running(host: Host, settings: Settings) -> bool:
    r = host.check(compose(settings, "ps", "--status", "running", "--services"), sudo=True)
    return "nginx" in r.stdout.split()


def install_hook(host: Host, settings: Settings) -> None:
    """(Re)write the deploy hook and make certbot's directories."""
    dirs = certbot_dirs(settings)
    paths = [settings.tls.webroot, dirs["config"], dirs["work"], dirs["logs"],
             hook_path(settings).rsplit("/", 1)[0]]
    host.run("mkdir -p " + " ".join(shlex.quote(p) for p in paths), sudo=True)
    host.write_file(hook_values_path(settings), hook_values(settings), mode=0o644, sudo=True)
    host.write_file(hook_path(settings), deploy_hook_script(settings), mode=0o755, sudo=True)


def probe_webroot(host: Host, settings: Settings) -> None:
    """Fail early unless nginx serves the ACME webroot on port 80 for every name."""
    import secrets

    token = f"maicivy-probe-{secrets.token_hex(8)}"
    challenge_dir = f"{settings.tls.webroot.rstrip('/')}/.well-known/acme-challenge"
    path = f"{challenge_dir}/{token}"
    host.run(f"mkdir -p {shlex.quote(challenge_dir)} && printf %s {token} > {shlex.quote(path)}",
             sudo=True)
    try:
        address = local_address(settings)
        for names in lineages(settings).values():
            for domain in names:
                url = f"http://{domain}:{settings.publish.http}/.well-known/acme-challenge/{token}"
                r = host.check(
                    f"curl -sS --max-time 10 --resolve "
                    f"{shlex.quote(f'{domain}:{settings.publish.http}:{address}')} "
                    f"-w '\\n%{{http_code}}' {shlex.quote(url)}")
                body, _, code = r.stdout.rpartition("\n")
                if not r.ok or code.strip() != "200" or body.strip() != token:
                    got = f"HTTP {code.strip()}" if r.ok else (r.stderr.strip() or "no answer")
                    raise OpsError(
                        f"nginx does not serve the ACME webroot {settings.tls.webroot} for "
                        f"http://{domain}/.well-known/acme-challenge/ ({got}); check the "
                        "nginx container's /var/www/certbot mount and port "
                        f"{settings.publish.http}")
    finally:
        host.run(f"rm -f {shlex.quote(path)}", sudo=True, warn=True)


def sync_to_nginx(host: Host, settings: Settings) -> list[str]:
    """Install every lineage whose certificate nginx does not have yet (via the hook)."""
    pairs = {name: (f"{live_dir(settings, name)}/fullchain.pem",
                    f"{cert_dir(settings, name)}/fullchain.pem") for name in lineages(settings)}
    digests = host.hashes([p for pair in pairs.values() for p in pair], sudo=True)
    installed = []
    for name, (live, served) in pairs.items():
        if live in digests and digests[live] != digests.get(served):
            r = host.run(run_hook_command(settings, name), sudo=True, warn=True, timeout=120)
            if r.failed:
                raise OpsError(f"could not install the {name} certificate for nginx: "
                               f"{(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            installed.append(name)
    return installed


def obtain_certificates(host: Host, settings: Settings, force: bool = False) -> list[str]:
    """Obtain (or keep) every lineage and make sure nginx serves it.

    Returns the names certbot issued a new certificate for (the deploy hook
    installed them and reloaded nginx); lineages kept as they were are still
    installed for nginx if its copy differs.
    """
    acme_directory(settings)  # bad staging/server combination: fail before anything
    require_certbot(host)
    install_hook(host, settings)
    ensure_certificates(host, settings)
    if not host.dry_run:
        if not nginx_running(host, settings):
            raise OpsError("nginx is not running, so it cannot serve the ACME challenges; "
                           "start the stack first (deploy), then run ssl.obtain")
        probe_webroot(host, settings)
    issued = []
    for name, domains in lineages(settings).items():
        host.say(f"certbot: {name} ({', '.join(domains)}) from {acme_directory(settings)}")
        r = host.run(obtain_command(settings, name, domains, force=force), sudo=True, warn=True,
                     timeout=900)
        if r.failed:
            raise OpsError(f"certbot could not obtain the {name} certificate: "
                           f"{certbot_error(r.stderr + r.stdout)}; nginx keeps serving the "
                           "current one")
        if "Successfully received certificate" in r.stdout + r.stderr:
            issued.append(name)
    if host.dry_run:
        return []
    sync_to_nginx(host, settings)
    return issued


def renew_certificates(host: Host, settings: Settings, force: bool = False) -> str:
    """``certbot renew`` with our deploy hook; returns certbot's summary line."""
    require_certbot(host)
    install_hook(host, settings)
    r = host.run(renew_command(settings, force=force), sudo=True, warn=True, timeout=1800)
    if r.failed:
        raise OpsError(f"certbot renew failed: {certbot_error(r.stderr + r.stdout)}; the "
                       "current certificates keep serving")
    if host.dry_run:
        return ""
    sync_to_nginx(host, settings)
    write_cert_metrics(host, settings, read_certs(host, settings))
    text = r.stdout + r.stderr
    for marker in ("Congratulations, all renewals succeeded", "No renewals were attempted",
                   "The following certificates are not due for renewal yet"):
        if marker in text:
            return marker
    return "certbot renew finished"


# --- tasks ----------------------------------------------------------------------


@ops_task(help={
    "force": "ask for new certificates even if the current ones are not due",
    "dry_run": "show the certbot commands, change nothing",
})
def obtain(c, force=False, dry_run=False):
    """Get Let's Encrypt (ACME) certificates for the site and Grafana names.

    certbot runs on the server with the webroot method: nginx (already running
    with the temporary self-signed certificates deploy created) serves the
    challenges on port 80. The new certificates are copied where nginx reads
    them and nginx is reloaded, not restarted. Certificates that are not due
    are kept (use --force to replace them). ACME server, contact email and
    staging mode come from the `tls` settings. Safe to run again.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    issued = obtain_certificates(host, settings, force=force)
    if dry_run:
        return
    if issued:
        print(f"new certificates, installed for nginx (reloaded): {', '.join(issued)}")
    else:
        print("certificates not due for renewal: kept (use --force to replace them)")
    for line in format_status(read_certs(host, settings)):
        print(line)


@ops_task(help={
    "force": "renew every certificate now, even if it is not due",
    "dry_run": "show the certbot command, change nothing",
})
def renew(c, force=False, dry_run=False):
    """Renew the certificates that are due and reload nginx (what cron runs daily).

    `certbot renew` with a deploy hook that installs each renewed certificate
    for nginx and reloads nginx inside the compose stack. A failed renewal
    exits non-zero and leaves the current certificate serving.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    summary = renew_certificates(host, settings, force=force)
    if summary:
        print(summary)


@ops_task(help={"json_": "print JSON instead of a table"})
def status(c, json_=False):
    """Show each name's certificate: issuer, expiry date and days left.

    Reads the certificate nginx actually serves (TLS handshake with SNI on
    the server) and the file on disk, and says when they differ (a new
    certificate waiting for an nginx reload) or when a self-signed stand-in
    is still in place.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    infos = read_certs(host, settings)
    write_cert_metrics(host, settings, infos)
    if json_:
        print(json.dumps([i.as_dict() for i in infos], indent=2))
        return
    for line in format_status(infos):
        print(line)


ns = Collection("ssl", obtain, renew, status)
