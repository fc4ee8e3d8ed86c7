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

The pure half (scripts and their parsing) is in :mod:`fabfile.release`.
"""

from __future__ import annotations

import difflib
import getpass
import shlex
import socket
import subprocess
import time
from datetime import UTC, datetime

from .config import SERVICES, Settings
from .core import host_for, ops_task, settings_for
from .errors import OpsError
from .host import Host, sha256, sudo_wrap, upload_if_changed
from .release import (
    BUSY,
    ROLLING,
    Plan,
    Proof,
    ServerState,
    gate_failures,
    gate_script,
    image_refs,
    lock_script,
    log_line,
    mounted_files,
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
    scale_up_cmd,
    sections,
    state_dir,
    swap_cmd,
    up_cmd,
)
from .render import COMPOSE_FILE, NGINX_CONF, embedded_config_id
from .stack import ensure_certificates, remote_files


class DeployFailed(OpsError):
    """The new release did not pass; the caller rolls back."""


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_release_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def local_user() -> str:
    try:
        user = getpass.getuser()
    except Exception:  # pragma: no cover - no passwd entry
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


# --- the lock: one long-lived command whose stdin keeps it -----------------------


class DeployLock:
    """The server-side deploy lock, held by a command that lives as long as we do.

    Over SSH it is a paramiko session channel; locally (``inv`` on the server)
    a subprocess. Closing its stdin -- or losing the connection -- releases it.
    """

    def __init__(self, host: Host, settings: Settings, managed, owner: str | None = None):
        self.host = host
        self.settings = settings
        self.script = lock_script(settings, owner or f"{local_user()} since {now()}", managed)
        if host.use_sudo:
            self.script = sudo_wrap(self.script)
        self._chan = None
        self._proc = None

    def acquire(self, timeout: float = 120) -> ServerState:
        """Take the lock; return what the server reported. Raises OpsError if busy."""
        if self.host.is_remote:
            text, status = self._open_channel(timeout)
        else:
            text, status = self._open_process(timeout)
        state = parse_state(text)
        if state.busy is not None or status == BUSY:
            self.release()
            raise OpsError(f"{self.host.name}: another deploy holds the lock: "
                           f"{state.busy or 'owner unknown'}. Wait for it, or run "
                           "deploy.unlock if it is stale")
        if status is not None:
            self.release()
            raise OpsError(f"{self.host.name}: could not take the deploy lock "
                           f"(exit {status}): {text.strip().splitlines()[-1:] or ''}")
        return state

    def _open_channel(self, timeout: float):
        chan = self.host.open_channel(self.script, timeout=timeout)
        self._chan = chan
        buf = b""
        while b"== ready\n" not in buf:
            try:
                data = chan.recv(65536)
            except TimeoutError as exc:
                raise OpsError(f"{self.host.name}: the lock command did not answer within "
                               f"{timeout}s") from exc
            if not data:
                err = chan.recv_stderr(65536).decode(errors="replace")
                return buf.decode(errors="replace") + err, chan.recv_exit_status()
            buf += data
        return buf.decode(errors="replace"), None

    def _open_process(self, timeout: float):
        proc = subprocess.Popen(["bash", "-c", self.script], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._proc = proc
        lines = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read().decode(errors="replace")
                return "".join(lines) + err, proc.wait()
            lines.append(line.decode(errors="replace"))
            if line == b"== ready\n":
                return "".join(lines), None
        raise OpsError("the lock command did not answer in time")

    def log(self, line: str) -> None:
        """Append a line to the deploy log on the server (through the lock holder)."""
        data = (line.replace("\n", " ") + "\n").encode()
        try:
            if self._chan is not None:
                self._chan.sendall(data)
            elif self._proc is not None:
                self._proc.stdin.write(data)
                self._proc.stdin.flush()
        except OSError as exc:  # the connection is gone; keep the original error
            self.host.say(f"warning: could not write the deploy log: {exc}")

    def release(self) -> None:
        if self._chan is not None:
            try:
                self._chan.shutdown_write()
                self._chan.settimeout(30)
                self._chan.recv_exit_status()
            except Exception:  # the connection may be gone: the lock went with it
                pass
            finally:
                self._chan.close()
                self._chan = None
        if self._proc is not None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except Exception:  # pragma: no cover
                self._proc.kill()
            self._proc = None


# --- the steps -------------------------------------------------------------------


def _pre_deploy_backup(host: Host, settings: Settings, plan: Plan):
    """backup.postgres before anything changes; None when there is nothing to back up."""
    if not any(c.running for c in plan.of("postgres")):
        host.say("pre-deploy backup: skipped (PostgreSQL is not running yet)")
        return None
    try:
        from .backup import backup_postgres
    except ImportError:
        host.say("pre-deploy backup: skipped (the backup namespace is not installed)")
        return None
    manifest = backup_postgres(host, settings, reason="pre-deploy")
    where = (manifest or {}).get("path") or (manifest or {}).get("file") or ""
    host.say(f"pre-deploy backup: done {where}".rstrip())
    return manifest


def converge(host: Host, settings: Settings, plan: Plan) -> list[str]:
    """Bring every service to the planned state. Returns the services touched.

    Raises DeployFailed when a new container does not become healthy.
    """
    timeout = int(settings.deploy.health_timeout_seconds)
    touched = []
    for service in plan.rolling:
        stopped = [c for c in plan.stale(service) if not c.running]
        if stopped:
            host.run(remove_cmd(stopped), sudo=True)
        running = [c for c in plan.of(service) if c.running]
        good = plan.good(service)
        if not good:
            host.say(f"{service}: starting the new container beside the old one")
            r = host.run(scale_up_cmd(settings, service, len(running) + 1, timeout,
                                      [c.id for c in plan.of(service)]),
                         sudo=True, warn=True, timeout=timeout + 120)
            if r.failed:
                status = " ".join(sections(r.stdout).get("status", [])) or "no status"
                raise DeployFailed(f"the new {service} container did not become healthy "
                                   f"within {timeout}s ({status})")
        # Retire everything but the newest good container.
        keep = sorted(good, key=lambda c: c.created)[-1:] if good else []
        old = [c for c in running if c not in keep]
        if old:
            host.say(f"{service}: new container healthy; nginx now sends traffic to it, "
                     f"retiring {', '.join(c.short for c in old)}")
            host.run(swap_cmd(settings, old), sudo=True, timeout=300)
        touched.append(service)
    if plan.recreate:
        host.say(f"compose up: {', '.join(plan.recreate)}")
        r = host.run(up_cmd(settings, timeout), sudo=True, warn=True, timeout=timeout + 300)
        if r.failed:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise DeployFailed(f"compose up failed: {detail[-1] if detail else 'no output'}")
        touched += plan.recreate
    return touched


def reload_changed(host: Host, settings: Settings, changed_rel, touched) -> None:
    for service in reloads_for(changed_rel):
        if service in touched:
            continue
        host.say(f"{service}: reloading (its configuration changed)")
        r = host.run(reload_cmd(settings, service), sudo=True, warn=True, timeout=180)
        if r.failed:
            detail = (r.stderr or r.stdout).strip().splitlines()
            raise DeployFailed(f"reloading {service} failed: "
                               f"{detail[-1] if detail else 'no output'}")


def health_gate(host: Host, settings: Settings, attempts: int = 5,
                proof: Proof | None = None) -> list[str]:
    """[] when every service is healthy and the health URLs answer through nginx.

    With ``proof``, also when every service runs the files it should: the
    bytes its container sees and the configuration it loaded (see
    :func:`~fabfile.release.proof_failures`).
    """
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
    root = settings.root.rstrip("/")
    by_rel = {p[len(root) + 1:]: data for p, data in files.items()}
    return Proof(mounts=mounted_files(by_rel[COMPOSE_FILE].decode(), by_rel, root),
                 expected={rel: sha256(data) for rel, data in by_rel.items()},
                 nginx_config_id=embedded_config_id(by_rel.get(NGINX_CONF, b"")))


def restored_proof(host: Host, settings: Settings, managed) -> Proof:
    """What the services must run after a rollback: the files now on the server."""
    root = settings.root.rstrip("/")
    compose_file = host.read_file(f"{root}/{COMPOSE_FILE}", sudo=True).decode()
    r = host.check(f"cat -- {shlex.quote(f'{root}/{NGINX_CONF}')}", sudo=True)
    return Proof(mounts=mounted_files(compose_file, relative(settings, managed), root),
                 expected=None,
                 nginx_config_id=embedded_config_id(r.stdout.encode()) if r.ok else None)


def _plan(host: Host, settings: Settings, refs, pull: bool, http: bool = False):
    """(Pull,) read the stack's state and plan; returns (plan, raw output)."""
    r = host.run(plan_script(settings, refs, pull, http), sudo=True, warn=True, timeout=1800)
    if r.failed:
        refused = sections(r.stdout).get("login-failed")
        if refused:
            raise OpsError(f"{host.name}: docker login to {refused[0]}; check "
                           f"REGISTRY_USERNAME and REGISTRY_PASSWORD in {settings.env_file}")
        detail = (r.stderr or r.stdout).strip().splitlines()
        what = "docker compose pull" if pull else "reading the stack's state"
        raise OpsError(f"{host.name}: {what} failed: {detail[-1] if detail else 'no output'}")
    return parse_plan(r.stdout, refs), r.stdout


def restore(host: Host, settings: Settings, tar: str, managed, images) -> list[str]:
    """Put a snapshot's files and image tags back; returns the files it changed."""
    r = host.run(restore_script(settings, tar, managed, images), sudo=True)
    return sections(r.stdout).get("changed", [])


def roll_back(host: Host, settings: Settings, tar: str, managed, images, changed) -> None:
    """Return to the files in ``tar`` and ``images``; raise OpsError if that fails too."""
    restored = restore(host, settings, tar, managed, images)
    refs = image_refs(settings)
    refs.update({s: ref for s, (ref, _i) in images.items()})
    plan, _ = _plan(host, settings, refs, pull=False)
    touched = converge(host, settings, plan)
    reload_changed(host, settings, set(changed) | set(restored), touched)
    problems = health_gate(host, settings, proof=restored_proof(host, settings, managed))
    if problems:
        raise OpsError(f"{host.name}: the previous release does not serve either after the "
                       f"rollback: {'; '.join(problems)}")


def deploy_host(host: Host, settings: Settings) -> str:
    """Deploy to one host; returns 'unchanged' or the new release id. Raises OpsError."""
    files = remote_files(settings)
    managed = list(files)
    lock = DeployLock(host, settings, managed)
    state = lock.acquire()
    try:
        return _deploy_locked(host, settings, files, state, lock)
    finally:
        lock.release()


def _deploy_locked(host: Host, settings: Settings, files, state: ServerState,
                   lock: DeployLock) -> str:
    d = state_dir(settings)
    root = settings.root.rstrip("/")
    managed = list(files)
    if ".env" in state.unset:
        raise OpsError(f"{host.name}: {settings.env_file} does not exist; run provision "
                       "(it creates it with strong secrets) and deploy again")
    if state.unset:
        raise OpsError(f"{host.name}: {settings.env_file} lacks {', '.join(state.unset)}; "
                       "run provision (it fills missing secrets) and deploy again")
    known = {f"{root}/{rel}": digest for rel, digest in state.hashes.items()}
    changed = upload_if_changed(host, files, known=known, sudo=True)
    changed_rel = relative(settings, changed)
    if changed:
        host.say(f"uploaded {len(changed)} changed file(s): {', '.join(changed_rel)}")
    refs = image_refs(settings)
    try:
        plan, output = _plan(host, settings, refs, pull=True, http=True)
    except OpsError:
        if changed:  # nothing runs on the new files yet: put the old ones back
            restore(host, settings, f"{d}/pre/files.tar", managed, {})
        raise
    before = plan.running_images()
    wanted = {s: (refs[s], plan.wanted_image[s]) for s in SERVICES}
    reloads = reloads_for(changed_rel)
    if plan.unchanged and not reloads:
        # The plan command already fetched the health URLs: it is the gate.
        problems = gate_failures(output)
        if problems:  # maybe a blip: look again, a few times
            problems = health_gate(host, settings)
        result = "unchanged" if not problems else "unhealthy"
        lock.log(log_line(now(), local_user(), result, state.current, wanted,
                          "; ".join(problems)))
        if problems:
            raise OpsError(f"{host.name}: nothing to change, but the stack is not healthy: "
                           f"{'; '.join(problems)}")
        host.say(f"{host.name}: nothing changed (files, images and containers are current)")
        return "unchanged"
    try:
        # nginx cannot start without a certificate: a fresh server gets
        # self-signed stand-ins until ssl.obtain fetches real ones.
        made = ensure_certificates(host, settings)
        if made:
            host.say(f"self-signed stand-in certificate created for {', '.join(made)} "
                     "(run ssl.obtain for real ones)")
    except OpsError as exc:
        if changed:
            restore(host, settings, f"{d}/pre/files.tar", managed, {})
        raise OpsError(f"{host.name}: creating the stand-in certificates failed, nothing "
                       f"deployed: {exc}") from exc
    try:
        _pre_deploy_backup(host, settings, plan)
    except OpsError as exc:
        if changed:
            restore(host, settings, f"{d}/pre/files.tar", managed, {})
        raise OpsError(f"{host.name}: pre-deploy backup failed, nothing deployed: {exc}") from exc
    release = new_release_id()
    if release in state.releases:
        release += "-1"
    try:
        touched = converge(host, settings, plan)
        reload_changed(host, settings, changed_rel, touched)
        problems = health_gate(host, settings, proof=deployed_proof(settings, files))
        if problems:
            raise DeployFailed("health gate: " + "; ".join(problems))
    except DeployFailed as exc:
        reason = str(exc)
        host.say(f"{host.name}: deploy failed ({reason}); rolling back")
        if not before:
            lock.log(log_line(now(), local_user(), "failed", "", wanted, reason))
            raise OpsError(f"{host.name}: deploy failed: {reason}; there was no previous "
                           "release to return to") from exc
        try:
            roll_back(host, settings, f"{d}/pre/files.tar", managed, before, changed_rel)
        except OpsError as again:
            lock.log(log_line(now(), local_user(), "rollback-failed", state.current, before,
                              f"{reason}; {again}"))
            raise OpsError(f"{host.name}: deploy failed ({reason}) and the rollback failed "
                           f"too: {again}") from exc
        lock.log(log_line(now(), local_user(), "rolled-back", state.current, before, reason))
        raise OpsError(f"{host.name}: deploy failed: {reason}; rolled back automatically to "
                       "the previous images and config, which serve again") from exc
    host.run(record_script(settings, release, managed, wanted,
                           log_line(now(), local_user(), "ok", release, wanted)), sudo=True)
    host.say(f"{host.name}: deployed release {release} "
             f"({', '.join(touched) or 'configuration only'}); all services healthy")
    return release


def dry_run_deploy(host: Host, settings: Settings) -> None:
    """Print the diff of every file that would change and the commands that would run."""
    files = remote_files(settings)
    state = parse_state(host.check(probe_script(settings, list(files)), sudo=True).stdout)
    root = settings.root.rstrip("/")
    if state.busy:
        host.say(f"note: a deploy is running now: {state.busy}")
    if state.unset:
        host.say(f"note: {settings.env_file} lacks {', '.join(state.unset)}: a real deploy "
                 "would refuse; run provision first")
    known = {f"{root}/{rel}": digest for rel, digest in state.hashes.items()}
    changed = [p for p, data in files.items() if known.get(p) != sha256(data)]
    for path in changed:
        old = host.read_file(path, sudo=True) if path in known else b""
        diff = difflib.unified_diff(
            old.decode(errors="replace").splitlines(keepends=True),
            files[path].decode(errors="replace").splitlines(keepends=True),
            fromfile=f"{host.name}:{path}" if path in known else "/dev/null",
            tofile=f"{host.name}:{path} (new)",
        )
        host.say("".join(diff).rstrip("\n"))
    if not changed:
        host.say("no file would change")
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
    "dry_run": "print the diff of every file that would change and the commands that "
               "would run; change nothing",
})
def deploy(c, dry_run=False):
    """Deploy the stack without downtime; roll back automatically if it is not healthy.

    Takes the deploy lock, uploads the rendered files that changed, pulls the
    images, takes a pre-deploy PostgreSQL backup, then replaces backend and
    frontend beside the running containers (new one healthy before the old one
    goes) and recreates any other service whose image or config changed. If a
    new container or the health gate (compose health, plus the health URLs
    through nginx) fails, the previous files and images are put back and the
    task exits non-zero. With several hosts (fab -H a,b) it deploys one host
    at a time and stops at the first failure. A redeploy with nothing new
    changes nothing.
    """
    settings = settings_for(c)
    host = host_for(c, settings, dry_run=dry_run)
    if dry_run:
        dry_run_deploy(host, settings)
        return
    deploy_host(host, settings)


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
    lock = DeployLock(host, settings, list(files))
    state = lock.acquire()
    try:
        if state.current not in state.releases:
            raise OpsError(f"{host.name}: no current release is recorded; deploy first")
        index = state.releases.index(state.current)
        if index == 0:
            raise OpsError(f"{host.name}: release {state.current} is the oldest one kept; "
                           "there is no previous release to return to")
        target = state.releases[index - 1]
        rd = f"{state_dir(settings)}/releases/{target}"
        images = parse_images(host.read_file(f"{rd}/images", sudo=True).decode())
        host.say(f"{host.name}: rolling back from {state.current} to {target}")
        roll_back(host, settings, f"{rd}/files.tar", list(files), images, [])
        d = shlex.quote(state_dir(settings))
        host.run(f"echo {shlex.quote(target)} > {d}/current.tmp && mv -f {d}/current.tmp "
                 f"{d}/current", sudo=True)
        lock.log(log_line(now(), local_user(), "rollback", target, images,
                          f"from {state.current}"))
        host.say(f"{host.name}: release {target} is live again; all services healthy")
    finally:
        lock.release()


@ops_task(help={"lines": "how many of the latest entries to print (default 20)"})
def history(c, lines=20):
    """Print the deploy log: time, local user, result, release and images of each deploy."""
    settings = settings_for(c)
    host = host_for(c, settings)
    log = f"{state_dir(settings)}/deploy.log"
    r = host.check(f"tail -n {int(lines)} {shlex.quote(log)}", sudo=True)
    if r.failed:
        host.say(f"{host.name}: no deploy recorded yet ({log} does not exist)")
        return
    host.say(r.stdout.rstrip("\n"))


@ops_task
def unlock(c):
    """Break a stale deploy lock (stops the command that holds it).

    A deploy whose connection dies releases the lock by itself; use this only
    when a hung deploy keeps it. Says who held it.
    """
    settings = settings_for(c)
    host = host_for(c, settings)
    d = shlex.quote(state_dir(settings))
    r = host.check(f"[ -e {d}/lock ] && ! flock -n {d}/lock true && "
                   f"cat {d}/lock.owner", sudo=True)
    if r.failed:
        host.say(f"{host.name}: no deploy holds the lock")
        return
    owner = r.stdout.strip()
    pid = owner.rsplit(" pid ", 1)[-1] if " pid " in owner else ""
    if not pid.isdigit():
        raise OpsError(f"{host.name}: the lock is held but its owner is unknown; find the "
                       f"process with: fuser -v {state_dir(settings)}/lock")
    host.run(f"kill {pid} && for i in $(seq 50); do flock -n {d}/lock true && break; "
             f"sleep 0.2; done; flock -n {d}/lock true && rm -f {d}/lock.owner", sudo=True)
    host.say(f"{host.name}: lock broken (was held by {owner})")
