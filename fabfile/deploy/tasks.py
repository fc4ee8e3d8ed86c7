"""deploy: push a new release of the stack without downtime, roll back on failure.

``fab -H vps deploy`` (or ``inv deploy`` on the server itself), on each host in
turn, stopping at the first host that fails:

1. takes the deploy lock (a second deploy is refused, naming the holder);
2. uploads the rendered files whose content differs (one hash round trip);
3. ``docker compose pull``;
4. takes a pre-deploy PostgreSQL backup (``backup.postgres``);
5. converges: backend and frontend are replaced beside the old container
   (start new, wait healthy, nginx reload, retire old); other services whose
   image or config changed are recreated by ``compose up``; nginx, Prometheus
   and Grafana reload when a file they mount changed;
6. health gate: every container healthy and the health URLs answer 2xx
   through nginx;
7. if the gate fails, puts the previous files and images back, checks they
   serve again and exits non-zero;
8. records the release (kept for ``deploy.rollback``), prunes old ones and
   their images, and appends a line to the deploy log.

The pure half (scripts and their parsing) is in :mod:`fabfile.deploy.release`.
"""

from __future__ import annotations

import json
import re
import shlex
import time

from invoke import Collection

from .. import clock
from ..config import APP_IMAGES, SERVICES, Settings
from ..core import host_for, ops_task, settings_for
from ..errors import ConfigError, OpsError
from ..host import Host, sha256, upload_if_changed
from ..lock import LockLost, StackLock, break_lock, stack_lock, who
from ..progress import step
from ..render import COMPOSE_FILE, NGINX_CONF, embedded_config_id
from ..stack import ensure_certificates, remote_files
from .release import (
    ROLLING,
    Diagnosis,
    Plan,
    Proof,
    ServerState,
    attempt_dir,
    deploy_report_script,
    diagnose_script,
    end_attempt_cmd,
    gate_failures,
    gate_script,
    image_refs,
    log_append,
    log_line,
    mounted_files,
    parse_diagnoses,
    parse_images,
    parse_plan,
    parse_state,
    plan_script,
    probe_script,
    proof_failures,
    proof_lines,
    record_script,
    relative,
    reload_cmd,
    reloads_for,
    remove_cmd,
    restore_script,
    save_images_cmd,
    scale_up_cmd,
    sections,
    state_dir,
    swap_cmd,
    up_cmd,
)


class DeployFailed(OpsError):
    """The new release did not pass; the caller rolls back."""

    def __init__(self, message: str, diagnosed: bool = False):
        super().__init__(message)
        self.diagnosed = diagnosed  # what the failed container says was printed


def new_release_id() -> str:
    return clock.stamp()


# --- image tags given on the command line ---------------------------------------------

_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def with_tag(ref: str, tag: str) -> str:
    """``ref`` with its tag (or digest) replaced by ``tag``."""
    name = ref.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        name = name[:colon]
    return f"{name}:{tag}"


def with_tags(settings: Settings, tags: dict[str, str]) -> Settings:
    """The settings with the app images' tags replaced (``deploy --backend-tag``)."""
    tags = {s: t for s, t in tags.items() if t}
    if not tags:
        return settings
    data = json.loads(json.dumps(settings))
    for service, tag in tags.items():
        if service not in APP_IMAGES or not _TAG.fullmatch(tag):
            raise ConfigError(f"--{service}-tag must be an image tag ([A-Za-z0-9_.-], at most "
                              f"128 characters, not starting with . or -), got {tag!r}")
        data["images"][service] = with_tag(data["images"][service], tag)
    return Settings.wrap(data)


# --- the steps -------------------------------------------------------------------


def local_user() -> str:
    return who()


def _pre_deploy_backup(host: Host, settings: Settings, plan: Plan):
    """backup.postgres before anything changes; None when there is nothing to back up."""
    if not any(c.running for c in plan.of("postgres")):
        host.say("pre-deploy backup: skipped (PostgreSQL is not running yet)")
        return None
    try:
        from ..backup.runner import backup_postgres
    except ImportError:
        host.say("pre-deploy backup: skipped (the backup namespace is not installed)")
        return None
    manifest = backup_postgres(host, settings, reason="pre-deploy")
    where = (manifest or {}).get("path") or (manifest or {}).get("file") or ""
    host.say(f"pre-deploy backup: done {where}".rstrip())
    return manifest


def _step(host: Host, label: str) -> None:
    """Name the next steps in the journal (when a stack lock guards the host)."""
    if isinstance(host.guard, StackLock):
        host.guard.step(label)


def say_diagnoses(host: Host, diagnoses: list[Diagnosis]) -> None:
    for d in diagnoses:
        host.say(f"{host.name}: what {d.name} says:")
        for line in d.lines:
            host.say(line)


def diagnose(host: Host, settings: Settings) -> list[Diagnosis]:
    """Diagnoses of the project's containers that are not healthy (read-only)."""
    r = host.check(diagnose_script(settings), sudo=True, timeout=120)
    return parse_diagnoses(r.stdout)


def converge(host: Host, settings: Settings, plan: Plan, rolling_back: bool = False) -> list[str]:
    """Bring every service to the planned state. Returns the services touched.

    Raises DeployFailed when a new container does not become healthy, after
    printing what it says (health checks, logs).
    """
    timeout = int(settings.deploy.health_timeout_seconds)
    touched = []
    for service in plan.rolling:
        stopped = [c for c in plan.of(service) if not c.running and not plan.is_current(c)]
        if stopped:
            _step(host, f"{service}: remove stopped containers")
            host.run(remove_cmd(stopped), sudo=True)
        running = [c for c in plan.of(service) if c.running]
        good = plan.good(service)
        new_name = ""
        if not good:
            host.say(f"{service}: starting the new container beside the old one")
            _step(host, f"{service}: start the new container")
            with step(f"{service}: wait until the new container is healthy") as s:
                r = host.run(scale_up_cmd(settings, service, len(running) + 1, timeout,
                                          [c.id for c in plan.of(service)]),
                             sudo=True, warn=True, timeout=timeout + 120)
                s.failed = r.failed
            sec = sections(r.stdout)
            new = " ".join(sec.get("new", [])).split()
            new_name = new[1] if len(new) > 1 else (new[0][:12] if new else "")
            if r.failed:
                status = " ".join(sec.get("status", [])) or "no status"
                diagnoses = parse_diagnoses(r.stdout)
                say_diagnoses(host, diagnoses)
                short = "; ".join(d.short for d in diagnoses if d.short)
                raise DeployFailed(
                    f"the new {service} container {new_name or ''} did not become healthy "
                    f"within {timeout}s ({status})".replace("  ", " ")
                    + (f": {short}" if short else ""), diagnosed=True)
        # Retire everything but the newest good container.
        keep = sorted(good, key=lambda c: c.created)[-1:] if good else []
        old = [c for c in running if c not in keep]
        if old:
            names = ", ".join(c.short for c in old)
            if new_name:
                host.say(f"{service}: new container {new_name} healthy; nginx now sends "
                         f"traffic to it, retiring {names}")
            elif rolling_back:
                host.say(f"{service}: {keep[0].short if keep else 'the previous container'} "
                         f"(previous release) keeps serving; removing {names}")
            else:
                host.say(f"{service}: {keep[0].short if keep else 'the current container'} "
                         f"is current; retiring {names}")
            _step(host, f"{service}: retire {names}")
            host.run(swap_cmd(settings, old), sudo=True, timeout=300)
        touched.append(service)
    if plan.recreate:
        host.say(f"compose up: {', '.join(plan.recreate)}")
        _step(host, f"compose up: {', '.join(plan.recreate)}")
        r = host.run(up_cmd(settings, timeout), sudo=True, warn=True, timeout=timeout + 300)
        if r.failed:
            from ..shell import last_lines

            raise DeployFailed(f"compose up failed: {last_lines(r.stderr, r.stdout)}")
        touched += plan.recreate
    return touched


def reload_changed(host: Host, settings: Settings, changed_rel, touched) -> None:
    for service in reloads_for(changed_rel):
        if service in touched:
            continue
        host.say(f"{service}: reloading (its configuration changed)")
        _step(host, f"{service}: reload")
        r = host.run(reload_cmd(settings, service), sudo=True, warn=True, timeout=180)
        if r.failed:
            from ..shell import last_lines

            raise DeployFailed(f"reloading {service} failed: {last_lines(r.stderr, r.stdout)}")


def health_gate(host: Host, settings: Settings, attempts: int = 5,
                proof: Proof | None = None) -> list[str]:
    """[] when every service is healthy and the health URLs answer through nginx.

    With ``proof``, also when every service runs the files it should: the
    bytes its container sees and the configuration it loaded (see
    :func:`~fabfile.deploy.release.proof_failures`).
    """
    with step("health gate") as s:
        problems = _health_gate(host, settings, attempts, proof)
        s.failed = bool(problems)
    return problems


def _health_gate(host: Host, settings: Settings, attempts: int,
                 proof: Proof | None) -> list[str]:
    problems: list[str] = []
    script = gate_script(settings)
    if proof is not None:
        script += "\n" + "\n".join(proof_lines(settings, proof))
    for i in range(attempts):
        r = host.check(script, sudo=True, timeout=120)
        problems = gate_failures(r.stdout)
        if proof is not None:
            problems += proof_failures(r.stdout, proof)
        if not problems:
            return []
        if i + 1 < attempts:
            time.sleep(2)
    return problems


def deployed_proof(settings: Settings, files) -> Proof:
    """What the services must run after deploying ``files`` (absolute path -> bytes)."""
    root = settings.root
    by_rel = {p[len(root) + 1:]: data for p, data in files.items()}
    return Proof(mounts=mounted_files(by_rel[COMPOSE_FILE].decode(), by_rel, root),
                 expected={rel: sha256(data) for rel, data in by_rel.items()},
                 nginx_config_id=embedded_config_id(by_rel.get(NGINX_CONF, b"")))


def restored_proof(host: Host, settings: Settings, managed) -> Proof:
    """What the services must run after a rollback: the files now on the server."""
    root = settings.root
    compose_file = host.read_file(f"{root}/{COMPOSE_FILE}", sudo=True).decode()
    r = host.check(f"cat -- {shlex.quote(f'{root}/{NGINX_CONF}')}", sudo=True)
    return Proof(mounts=mounted_files(compose_file, relative(settings, managed), root),
                 expected=None,
                 nginx_config_id=embedded_config_id(r.stdout.encode()) if r.ok else None)


def _plan(host: Host, settings: Settings, refs, pull: bool, http: bool = False):
    """(Pull,) read the stack's state and plan; returns (plan, raw output)."""
    _step(host, "pull and plan" if pull else "plan")
    with step("pull images" if pull else "read the stack's state") as s:
        r = host.run(plan_script(settings, refs, pull, http), sudo=True, warn=True,
                     timeout=1800)
        s.failed = r.failed
    if r.failed:
        from ..shell import last_lines

        refused = sections(r.stdout).get("login-failed")
        if refused:
            raise OpsError(f"{host.name}: docker login to {refused[0]}; check "
                           f"REGISTRY_USERNAME and REGISTRY_PASSWORD in {settings.env_file}")
        what = "docker compose pull" if pull else "reading the stack's state"
        raise OpsError(f"{host.name}: {what} failed: {last_lines(r.stderr, r.stdout)}")
    return parse_plan(r.stdout, refs), r.stdout


def restore(host: Host, settings: Settings, tar: str, managed, images) -> list[str]:
    """Put a snapshot's files and image tags back; returns the files it changed."""
    _step(host, "restore the previous files")
    r = host.run(restore_script(settings, tar, managed, images), sudo=True)
    return sections(r.stdout).get("changed", [])


def roll_back(host: Host, settings: Settings, tar: str, managed, images, changed) -> None:
    """Return to the files in ``tar`` and ``images``; raise OpsError if that fails too."""
    restored = restore(host, settings, tar, managed, images)
    refs = image_refs(settings)
    refs.update({s: ref for s, (ref, _i) in images.items()})
    plan, _ = _plan(host, settings, refs, pull=False)
    touched = converge(host, settings, plan, rolling_back=True)
    reload_changed(host, settings, set(changed) | set(restored), touched)
    problems = health_gate(host, settings, proof=restored_proof(host, settings, managed))
    if problems:
        raise OpsError(f"{host.name}: the previous release does not serve either after the "
                       f"rollback: {'; '.join(problems)}")


def deploy_host(host: Host, settings: Settings) -> str:
    """Deploy to one host; returns 'unchanged' or the new release id. Raises OpsError."""
    files = remote_files(settings)
    managed = list(files)
    with stack_lock(host, settings, "deploy",
                    report=deploy_report_script(settings, managed)) as lock:
        state = parse_state(lock.report_text)
        return _deploy_locked(host, settings, files, state, lock)


def describe_leftover(plan: Plan) -> str:
    """What an interrupted deploy left, service by service (what this one converges)."""
    out = []
    for service in SERVICES:
        mine = plan.of(service)
        if plan.ok(service):
            continue
        stale = len(plan.stale(service))
        out.append(f"{service}: {len(mine)} container(s), {stale} not current")
    return "; ".join(out) or "every container is current"


def _deploy_locked(host: Host, settings: Settings, files, state: ServerState,
                   lock: StackLock) -> str:
    managed = list(files)
    snapshot = f"{attempt_dir(settings, state.base)}/files.tar"
    user = local_user()

    def finish(result: str, release: str, images, detail: str = "", end: bool = True):
        extra = log_append(settings, log_line(clock.iso(), user, result, release, images, detail))
        if end:
            extra += "\n" + end_attempt_cmd(settings)
        lock.finish(result, extra)

    if ".env" in state.unset:
        lock.finish("refused")
        raise OpsError(f"{host.name}: {settings.env_file} does not exist; run provision "
                       "(it creates it with strong secrets) and deploy again")
    if state.unset:
        lock.finish("refused")
        raise OpsError(f"{host.name}: {settings.env_file} lacks {', '.join(state.unset)}; "
                       "run provision (it fills missing secrets) and deploy again")
    root = settings.root
    known = {f"{root}/{rel}": digest for rel, digest in state.hashes.items()}
    lock.step("upload changed files")
    changed = upload_if_changed(host, files, known=known, sudo=True)
    changed_rel = relative(settings, changed)
    if changed:
        host.say(f"uploaded {len(changed)} changed file(s): {', '.join(changed_rel)}")
    refs = image_refs(settings)
    try:
        plan, output = _plan(host, settings, refs, pull=True, http=True)
    except LockLost:
        raise
    except OpsError as exc:
        if changed:  # nothing runs on the new files yet: put the old ones back
            restore(host, settings, snapshot, managed, {})
        finish("failed", state.current, {}, str(exc))
        raise
    if state.base_interrupted:
        host.say(f"{host.name}: state left by the interrupted deploy: {describe_leftover(plan)}")
    before = state.base_images or plan.running_images()
    wanted = {s: (refs[s], plan.wanted_image[s]) for s in SERVICES}
    reloads = reloads_for(changed_rel)
    if plan.unchanged and not reloads:
        # The plan command already fetched the health URLs: it is the gate.
        problems = gate_failures(output)
        if problems:  # maybe a blip: look again, a few times
            problems = health_gate(host, settings)
        result = "unchanged" if not problems else "unhealthy"
        finish(result, state.current, wanted, "; ".join(problems))
        if problems:
            raise OpsError(f"{host.name}: nothing to change, but the stack is not healthy: "
                           f"{'; '.join(problems)}")
        host.say(f"{host.name}: nothing changed (files, images and containers are current)")
        return "unchanged"
    if not state.base_interrupted and before:
        lock.step("record the images before the deploy")
        host.run(save_images_cmd(settings, state.base, before), sudo=True)
    try:
        lock.step("stand-in certificates")
        # nginx cannot start without a certificate: a fresh server gets
        # self-signed stand-ins until ssl.obtain fetches real ones.
        made = ensure_certificates(host, settings)
        if made:
            host.say(f"self-signed stand-in certificate created for {', '.join(made)} "
                     "(run ssl.obtain for real ones)")
    except LockLost:
        raise
    except OpsError as exc:
        if changed:
            restore(host, settings, snapshot, managed, {})
        finish("failed", state.current, {}, f"stand-in certificates: {exc}")
        raise OpsError(f"{host.name}: creating the stand-in certificates failed, nothing "
                       f"deployed: {exc}") from exc
    try:
        lock.step("pre-deploy backup")
        _pre_deploy_backup(host, settings, plan)
    except LockLost:
        raise
    except OpsError as exc:
        if changed:
            restore(host, settings, snapshot, managed, {})
        finish("failed", state.current, {}, f"pre-deploy backup: {exc}")
        raise OpsError(f"{host.name}: pre-deploy backup failed, nothing deployed: {exc}") from exc
    release = new_release_id()
    if release in state.releases:
        release += "-1"
    try:
        touched = converge(host, settings, plan)
        reload_changed(host, settings, changed_rel, touched)
        problems = health_gate(host, settings, proof=deployed_proof(settings, files))
        if problems:
            say_diagnoses(host, diagnose(host, settings))
            raise DeployFailed("health gate: " + "; ".join(problems))
    except DeployFailed as exc:
        reason = str(exc)
        lock.verify("roll back")  # still ours? (another task may be why it failed)
        if not exc.diagnosed:
            say_diagnoses(host, diagnose(host, settings))
        host.say(f"{host.name}: deploy failed ({reason}); rolling back")
        if not before:
            finish("failed", "", wanted, reason)
            raise OpsError(f"{host.name}: deploy failed: {reason}; there was no previous "
                           "release to return to") from exc
        try:
            roll_back(host, settings, snapshot, managed, before, changed_rel)
        except LockLost:
            raise
        except OpsError as again:
            finish("rollback-failed", state.current, before, f"{reason}; {again}", end=False)
            raise OpsError(f"{host.name}: deploy failed ({reason}) and the rollback failed "
                           f"too: {again}") from exc
        finish("rolled-back", state.current, before, reason)
        raise OpsError(f"{host.name}: deploy failed: {reason}; rolled back automatically to "
                       "the previous images and config, which serve again") from exc
    lock.step("record the release")
    host.run(record_script(settings, release, managed, wanted, ""), sudo=True)
    finish("ok", release, wanted)
    host.say(f"{host.name}: deployed release {release} "
             f"({', '.join(touched) or 'configuration only'}); all services healthy")
    return release


def dry_run_commands(host: Host, settings: Settings) -> None:
    """Print the commands a deploy would run (deploy --dry-run --verbose)."""
    files = remote_files(settings)
    state = parse_state(host.check(probe_script(settings, list(files)), sudo=True).stdout)
    root = settings.root
    known = {f"{root}/{rel}": digest for rel, digest in state.hashes.items()}
    changed = [p for p, data in files.items() if known.get(p) != sha256(data)]
    for path in changed:
        host.say(f"[dry-run] would write {path}")
    host.run(plan_script(settings, image_refs(settings), pull=True))
    host.say("[dry-run] then: pre-deploy backup (backup.postgres); replace "
             f"{' and '.join(ROLLING)} beside the old containers if their image or config "
             "changed (" + scale_up_cmd(settings, "backend", 2,
                                        int(settings.deploy.health_timeout_seconds))
             + " ...); " + up_cmd(settings, int(settings.deploy.health_timeout_seconds))
             + " for the other services whose image or config changed; health gate; "
             "record the release and prune")
    for service in reloads_for(relative(settings, changed)):
        host.run(reload_cmd(settings, service))


# --- tasks ---------------------------------------------------------------------------


@ops_task(default=True, help={
    "dry_run": "print the plan: the diff of every file that would change, then per "
               "service the image running now, the one the registry has and what would "
               "happen, and the backup; change nothing",
    "verbose": "with --dry-run: also print the commands deploy would run",
    "backend_tag": "deploy this tag of the backend image (e.g. sha-abc1234) instead of "
                   "the one in the settings",
    "frontend_tag": "deploy this tag of the frontend image instead of the one in the "
                    "settings",
})
def deploy(c, dry_run=False, verbose=False, backend_tag="", frontend_tag=""):
    """Deploy the stack without downtime; roll back automatically if it is not healthy.

    Takes the stack lock, uploads the rendered files that changed, pulls the
    images, takes a pre-deploy PostgreSQL backup, then replaces backend and
    frontend beside the running containers (new one healthy before the old one
    goes) and recreates any other service whose image or config changed. If a
    new container or the health gate (compose health, plus the health URLs
    through nginx) fails, it prints what the failed container says (its last
    health checks and log lines), puts the previous files and images back and
    exits non-zero. With several hosts (fab -H a,b) it deploys one host at a
    time and stops at the first failure. A redeploy with nothing new changes
    nothing. --backend-tag/--frontend-tag deploy another tag of the app images
    (for CI); it is what runs until the next deploy, and the deploy log
    records it.
    """
    settings = with_tags(settings_for(c), {"backend": backend_tag, "frontend": frontend_tag})
    host = host_for(c, settings, dry_run=dry_run)
    if dry_run:
        from .plan import show_plan

        show_plan(host, settings)
        if verbose:
            dry_run_commands(host, settings)
        return
    deploy_host(host, settings)
    from ..app import maintenance_note

    if note := maintenance_note(host, settings):  # never silently left on
        host.say(note)


@ops_task
def rollback(c):
    """Return to the previous release kept on the server (files and images).

    Uses the release before the current one (deploy keeps
    deploy.keep_releases of them), replaces backend and frontend without
    downtime, checks health through nginx and makes it the current release.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    files = remote_files(settings)
    probe = probe_script(settings, [])
    report = probe[probe.index("echo '== hashes'"):]
    with stack_lock(host, settings, "deploy.rollback", report=report) as lock:
        state = parse_state(lock.report_text)
        if state.current not in state.releases:
            lock.finish("refused")
            raise OpsError(f"{host.name}: no current release is recorded; deploy first")
        index = state.releases.index(state.current)
        if index == 0:
            lock.finish("refused")
            raise OpsError(f"{host.name}: release {state.current} is the oldest one kept; "
                           "there is no previous release to return to")
        target = state.releases[index - 1]
        rd = f"{state_dir(settings)}/releases/{target}"
        images = parse_images(host.read_file(f"{rd}/images", sudo=True).decode())
        host.say(f"{host.name}: rolling back from {state.current} to {target}")
        roll_back(host, settings, f"{rd}/files.tar", list(files), images, [])
        d = shlex.quote(state_dir(settings))
        lock.step("make the release current")
        lock.finish("rollback", "\n".join([
            f"echo {shlex.quote(target)} > {d}/current.tmp && mv -f {d}/current.tmp "
            f"{d}/current",
            log_append(settings, log_line(clock.iso(), local_user(), "rollback", target, images,
                                          f"from {state.current}")),
            end_attempt_cmd(settings),
        ]))
        host.say(f"{host.name}: release {target} is live again; all services healthy")


# --- history ---------------------------------------------------------------------------

_LOG = re.compile(r"^(\S+) user=(\S+) result=(\S+) release=(\S+) images=(\S+)"
                  r'(?: detail=("(?:[^"\\]|\\.)*"))?'
                  r"(?: server_user=(\S+) sudo_user=(\S+) ssh_from=(\S+))?$")


def parse_log_line(line: str) -> dict | None:
    """One deploy log line as a dict (None for a line that is not one)."""
    m = _LOG.match(line.strip())
    if not m:
        return None
    images = {}
    if m.group(5) != "-":
        for item in m.group(5).split(","):
            service, _, rest = item.partition("=")
            ref, _, image_id = rest.rpartition("@")
            images[service] = {"ref": ref or image_id, "id": image_id if ref else ""}
    detail = ""
    if m.group(6):
        try:
            detail = json.loads(m.group(6))
        except ValueError:
            detail = m.group(6)
    release = m.group(4)
    return {"time": m.group(1), "user": m.group(2), "result": m.group(3),
            "release": "" if release == "-" else release, "images": images, "detail": detail,
            # What the server saw (fabfile/audit.py), when the line has it.
            "server_user": m.group(7) or "", "sudo_user": m.group(8) or "",
            "ssh_from": m.group(9) or ""}


def _tag(ref: str) -> str:
    name = ref.rsplit("/", 1)[-1]
    return name.split(":", 1)[1] if ":" in name else (name or "-")


def history_table(entries: list[dict]) -> str:
    """The deploy log as an aligned table: time, result, release, user, app tags, detail."""
    head = ("TIME", "RESULT", "RELEASE", "USER", "BACKEND", "FRONTEND", "DETAIL")
    rows = [head]
    for e in entries:
        imgs = e["images"]
        rows.append((e["time"], e["result"], e["release"] or "-", e["user"],
                     _tag(imgs["backend"]["ref"]) if "backend" in imgs else "-",
                     _tag(imgs["frontend"]["ref"]) if "frontend" in imgs else "-",
                     (str(e["detail"])[:100] or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(head) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False))
                     + "  " + r[-1] for r in rows).rstrip()


@ops_task(help={"lines": "how many of the latest entries to show (default 20)",
                "json_": "print a JSON list (every image reference and ID) instead"})
def history(c, lines=20, json_=False):
    """Show the deploy log: time, result, release, user and image tags of each deploy.

    A table by default; --json prints every entry with all images (reference
    and ID) and the failure detail, for scripts.
    """
    settings = settings_for(c)
    count = int(lines)  # a value that is not a number was refused by ops_task
    if count < 1:
        raise ConfigError(f"--lines must be a whole number >= 1 (got {lines!r})")
    host = host_for(c, settings)
    log = f"{state_dir(settings)}/deploy.log"
    r = host.check(f"tail -n {count} {shlex.quote(log)}", sudo=True)
    if r.failed:
        if json_:
            print("[]")
        else:
            host.say(f"{host.name}: no deploy recorded yet ({log} does not exist)")
        return
    entries = [e for e in (parse_log_line(x) for x in r.stdout.splitlines()) if e]
    if json_:
        print(json.dumps(entries, indent=2))
    else:
        host.say(history_table(entries))


@ops_task
def unlock(c):
    """Break a stale stack lock (kills the command that holds it).

    A task whose connection dies releases the lock by itself; use this only
    when a hung one keeps it. Says who held it. The task that held it stops
    at its next step (it no longer holds the lock), without rolling back.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    owner = break_lock(host, settings)
    if owner is None:
        host.say(f"{host.name}: no task holds the stack lock")
        return
    host.say(f"{host.name}: lock broken (was held by {owner})")


ns = Collection("deploy", deploy, rollback, history, unlock)
