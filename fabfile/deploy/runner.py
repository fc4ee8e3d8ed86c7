"""What deploy and rollback do on a host, step by step (the non-task half).

:func:`deploy_host`, on one host:

1. takes the stack lock (a second deploy is refused, naming the holder); the
   lock's report snapshots the managed files for this attempt's rollback;
2. uploads the rendered files whose content differs (one hash round trip);
3. ``docker compose pull``;
4. takes a pre-deploy PostgreSQL backup (``backup.postgres``);
5. converges: backend and frontend are replaced beside the old container
   (start new, wait healthy, nginx reload, retire old); other services whose
   image or config changed are recreated by ``compose up``; nginx, Prometheus
   and Grafana reload when a file they mount changed;
6. health gate: every container healthy, the health URLs answer 2xx through
   nginx, every service runs the files deployed (:mod:`.proof`);
7. if the gate fails, puts the previous files and images back, checks they
   serve again and exits non-zero; a failure before step 5 only puts the
   previous files back (nothing runs on the new ones yet);
8. records the release (kept for ``deploy.rollback``), prunes old ones and
   their images, and appends a line to the deploy log.

The commands come from :mod:`.scripts`, their output is read by
:mod:`.release`, :mod:`.proof` and :mod:`.diagnose`.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from .. import clock
from ..config import SERVICES, Settings
from ..errors import OpsError
from ..host import Host, sha256, upload_if_changed
from ..lock import LockLost, StackLock, stack_lock, who
from ..progress import step
from ..render import COMPOSE_FILE, NGINX_CONF, embedded_config_id
from ..shell import last_lines, q, sections
from ..stack import ensure_certificates, remote_files
from .diagnose import Diagnosis, parse_diagnoses
from .history import log_append, log_line
from .proof import (
    Proof,
    deployed_proof,
    gate_failures,
    mounted_files,
    proof_command,
    proof_failures,
)
from .release import (
    ROLLING,
    Plan,
    ServerState,
    attempt_dir,
    image_refs,
    parse_plan,
    parse_state,
    relative,
    reloads_for,
)
from .scripts import (
    deploy_report_script,
    diagnose_script,
    end_attempt_cmd,
    gate_script,
    plan_script,
    probe_script,
    record_script,
    reload_cmd,
    remove_cmd,
    restore_script,
    save_images_cmd,
    scale_up_cmd,
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


def local_user() -> str:
    return who()


def _step(host: Host, label: str) -> None:
    """Name the next steps in the journal (when a stack lock guards the host)."""
    if isinstance(host.guard, StackLock):
        host.guard.step(label)


def _pre_deploy_backup(host: Host, settings: Settings, plan: Plan):
    """backup.postgres before anything changes; None when there is nothing to back up."""
    if not any(c.running for c in plan.of("postgres")):
        host.say("pre-deploy backup: skipped (PostgreSQL is not running yet)")
        return None
    from ..backup.runner import backup_postgres

    manifest = backup_postgres(host, settings, reason="pre-deploy")
    where = (manifest or {}).get("path") or (manifest or {}).get("file") or ""
    host.say(f"pre-deploy backup: done {where}".rstrip())
    return manifest


# --- what a failed container says ------------------------------------------------------


def say_diagnoses(host: Host, diagnoses: list[Diagnosis]) -> None:
    for d in diagnoses:
        host.say(f"{host.name}: what {d.name} says:")
        for line in d.lines:
            host.say(line)


def diagnose(host: Host, settings: Settings) -> list[Diagnosis]:
    """Diagnoses of the project's containers that are not healthy (read-only)."""
    r = host.check(diagnose_script(settings), sudo=True, timeout=120)
    return parse_diagnoses(r.stdout)


# --- converging --------------------------------------------------------------------------


def converge(host: Host, settings: Settings, plan: Plan, rolling_back: bool = False) -> list[str]:
    """Bring every service to the planned state. Returns the services touched.

    Raises DeployFailed when a new container does not become healthy, after
    printing what it says (health checks, logs).
    """
    timeout = int(settings.deploy.health_timeout_seconds)
    for service in plan.rolling:
        _replace(host, settings, plan, service, timeout, rolling_back)
    if plan.recreate:
        host.say(f"compose up: {', '.join(plan.recreate)}")
        _step(host, f"compose up: {', '.join(plan.recreate)}")
        r = host.run(up_cmd(settings, timeout), sudo=True, warn=True, timeout=timeout + 300)
        if r.failed:
            raise DeployFailed(f"compose up failed: {last_lines(r.stderr, r.stdout)}")
    return [*plan.rolling, *plan.recreate]


def _replace(host: Host, settings: Settings, plan: Plan, service: str, timeout: int,
             rolling_back: bool) -> None:
    """A new container of ``service`` beside the old one (unless a good one runs),
    healthy before the others are retired."""
    stopped = [c for c in plan.of(service) if not c.running and not plan.is_current(c)]
    if stopped:
        _step(host, f"{service}: remove stopped containers")
        host.run(remove_cmd(stopped), sudo=True)
    running = [c for c in plan.of(service) if c.running]
    good = plan.good(service)
    new_name = "" if good else _start_new(host, settings, plan, service, len(running), timeout)
    # Retire everything but the newest good container.
    keep = sorted(good, key=lambda c: c.created)[-1:] if good else []
    old = [c for c in running if c not in keep]
    if not old:
        return
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


def _start_new(host: Host, settings: Settings, plan: Plan, service: str, running: int,
               timeout: int) -> str:
    """Start one more container and wait for its health; returns its name.
    Raises DeployFailed (after printing what it says) when it is not healthy."""
    host.say(f"{service}: starting the new container beside the old one")
    _step(host, f"{service}: start the new container")
    with step(f"{service}: wait until the new container is healthy") as s:
        r = host.run(scale_up_cmd(settings, service, running + 1, timeout,
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
    return new_name


def reload_changed(host: Host, settings: Settings, changed_rel, touched) -> None:
    for service in reloads_for(changed_rel):
        if service in touched:
            continue
        host.say(f"{service}: reloading (its configuration changed)")
        _step(host, f"{service}: reload")
        r = host.run(reload_cmd(settings, service), sudo=True, warn=True, timeout=180)
        if r.failed:
            raise DeployFailed(f"reloading {service} failed: {last_lines(r.stderr, r.stdout)}")


# --- the health gate -------------------------------------------------------------------


def health_gate(host: Host, settings: Settings, attempts: int = 5,
                proof: Proof | None = None) -> list[str]:
    """[] when every service is healthy and the health URLs answer through nginx.

    With ``proof``, also when every service runs the files it should: the
    bytes its container sees and the configuration it loaded (see
    :func:`~fabfile.deploy.proof.proof_failures`).
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
        script += "\n" + proof_command(settings, proof)
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


def restored_proof(host: Host, settings: Settings, managed) -> Proof:
    """What the services must run after a rollback: the files now on the server."""
    root = settings.root
    compose_file = host.read_file(f"{root}/{COMPOSE_FILE}", sudo=True).decode()
    r = host.check(f"cat -- {q(f'{root}/{NGINX_CONF}')}", sudo=True)
    return Proof(mounts=mounted_files(compose_file, relative(settings, managed), root),
                 expected=None,
                 nginx_config_id=embedded_config_id(r.stdout.encode()) if r.ok else None)


# --- planning, restoring -----------------------------------------------------------------


def make_plan(host: Host, settings: Settings, refs, pull: bool, http: bool = False):
    """(Pull,) read the stack's state and plan; returns (plan, raw output)."""
    _step(host, "pull and plan" if pull else "plan")
    with step("pull images" if pull else "read the stack's state") as s:
        r = host.run(plan_script(settings, refs, pull, http), sudo=True, warn=True,
                     timeout=1800)
        s.failed = r.failed
    if r.failed:
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
    plan, _ = make_plan(host, settings, refs, pull=False)
    touched = converge(host, settings, plan, rolling_back=True)
    reload_changed(host, settings, set(changed) | set(restored), touched)
    problems = health_gate(host, settings, proof=restored_proof(host, settings, managed))
    if problems:
        raise OpsError(f"{host.name}: the previous release does not serve either after the "
                       f"rollback: {'; '.join(problems)}")


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


# --- one deploy ---------------------------------------------------------------------------


def deploy_host(host: Host, settings: Settings) -> str:
    """Deploy to one host; returns 'unchanged' or the new release id. Raises OpsError."""
    files = remote_files(settings)
    with stack_lock(host, settings, "deploy",
                    report=deploy_report_script(settings, list(files))) as lock:
        attempt = Attempt(host, settings, lock, files, parse_state(lock.report_text))
        return attempt.run()


@dataclass
class Attempt:
    """One deploy under the stack lock: every decision between the lock and the log line."""

    host: Host
    settings: Settings
    lock: StackLock
    files: dict[str, bytes]
    state: ServerState
    user: str = field(default_factory=local_user)
    changed: list[str] = field(default_factory=list)  # files uploaded (absolute)

    @property
    def managed(self) -> list[str]:
        return list(self.files)

    @property
    def snapshot(self) -> str:
        """The files as they were before this deploy (or the interrupted one)."""
        return f"{attempt_dir(self.settings, self.state.base)}/files.tar"

    def run(self) -> str:
        self.refuse_unset_secrets()
        changed_rel = self.upload()
        refs = image_refs(self.settings)
        with self.nothing_deployed():
            plan, output = make_plan(self.host, self.settings, refs, pull=True, http=True)
        if self.state.base_interrupted:
            self.host.say(f"{self.host.name}: state left by the interrupted deploy: "
                          f"{describe_leftover(plan)}")
        before = self.state.base_images or plan.running_images()
        wanted = {s: (refs[s], plan.wanted_image[s]) for s in SERVICES}
        if plan.unchanged and not reloads_for(changed_rel):
            return self.unchanged(output, wanted)
        if not self.state.base_interrupted and before:
            self.lock.step("record the images before the deploy")
            self.host.run(save_images_cmd(self.settings, self.state.base, before), sudo=True)
        self.prepare(plan)
        release = new_release_id()
        if release in self.state.releases:
            release += "-1"
        touched = self.converge_or_roll_back(plan, changed_rel, before, wanted)
        self.lock.step("record the release")
        self.host.run(record_script(self.settings, release, self.managed, wanted), sudo=True)
        self.finish("ok", release, wanted)
        self.host.say(f"{self.host.name}: deployed release {release} "
                      f"({', '.join(touched) or 'configuration only'}); all services healthy")
        return release

    def finish(self, result: str, release: str, images, detail: str = "",
               end: bool = True) -> None:
        """The journal's end line, the deploy log's line (and the attempt ends)."""
        extra = log_append(self.settings, log_line(clock.iso(), self.user, result, release,
                                                   images, detail))
        if end:
            extra += "\n" + end_attempt_cmd(self.settings)
        self.lock.finish(result, extra)

    def refuse_unset_secrets(self) -> None:
        unset, env = self.state.unset, self.settings.env_file
        if not unset:
            return
        self.lock.finish("refused")
        if ".env" in unset:
            raise OpsError(f"{self.host.name}: {env} does not exist; run provision "
                           "(it creates it with strong secrets) and deploy again")
        raise OpsError(f"{self.host.name}: {env} lacks {', '.join(unset)}; "
                       "run provision (it fills missing secrets) and deploy again")

    def upload(self) -> list[str]:
        """Write the files that changed; returns them relative to the root."""
        root = self.settings.root
        known = {f"{root}/{rel}": digest for rel, digest in self.state.hashes.items()}
        self.lock.step("upload changed files")
        self.changed = upload_if_changed(self.host, self.files, known=known, sudo=True)
        changed_rel = relative(self.settings, self.changed)
        if self.changed:
            self.host.say(f"uploaded {len(self.changed)} changed file(s): "
                          f"{', '.join(changed_rel)}")
        return changed_rel

    @contextmanager
    def nothing_deployed(self, detail: str = "", doing: str = ""):
        """Until the deploy converges: on a failure, put the previous files back
        (nothing runs on the new ones yet), log it and say nothing was deployed."""
        try:
            yield
        except LockLost:
            raise
        except OpsError as exc:
            if self.changed:
                restore(self.host, self.settings, self.snapshot, self.managed, {})
            self.finish("failed", self.state.current, {},
                        f"{detail}: {exc}" if detail else str(exc))
            if not doing:
                raise
            raise OpsError(f"{self.host.name}: {doing} failed, nothing deployed: "
                           f"{exc}") from exc

    def unchanged(self, output: str, wanted) -> str:
        """Nothing to change: the plan command already fetched the health URLs (the gate)."""
        problems = gate_failures(output)
        if problems:  # maybe a blip: look again, a few times
            problems = health_gate(self.host, self.settings)
        self.finish("unchanged" if not problems else "unhealthy", self.state.current, wanted,
                    "; ".join(problems))
        if problems:
            raise OpsError(f"{self.host.name}: nothing to change, but the stack is not "
                           f"healthy: {'; '.join(problems)}")
        self.host.say(f"{self.host.name}: nothing changed (files, images and containers are "
                      "current)")
        return "unchanged"

    def prepare(self, plan: Plan) -> None:
        """Stand-in certificates and the pre-deploy backup, before anything is replaced."""
        with self.nothing_deployed("stand-in certificates", "creating the stand-in certificates"):
            self.lock.step("stand-in certificates")
            # nginx cannot start without a certificate: a fresh server gets
            # self-signed stand-ins until ssl.obtain fetches real ones.
            made = ensure_certificates(self.host, self.settings)
            if made:
                self.host.say(f"self-signed stand-in certificate created for "
                              f"{', '.join(made)} (run ssl.obtain for real ones)")
        with self.nothing_deployed("pre-deploy backup", "pre-deploy backup"):
            self.lock.step("pre-deploy backup")
            _pre_deploy_backup(self.host, self.settings, plan)

    def converge_or_roll_back(self, plan: Plan, changed_rel, before, wanted) -> list[str]:
        """Converge and pass the gate; else put the previous release back and raise."""
        try:
            touched = converge(self.host, self.settings, plan)
            reload_changed(self.host, self.settings, changed_rel, touched)
            problems = health_gate(self.host, self.settings,
                                   proof=deployed_proof(self.settings, self.files))
            if problems:
                say_diagnoses(self.host, diagnose(self.host, self.settings))
                raise DeployFailed("health gate: " + "; ".join(problems))
        except DeployFailed as exc:
            self.roll_back(exc, changed_rel, before, wanted)
        return touched

    def roll_back(self, exc: DeployFailed, changed_rel, before, wanted) -> None:
        """The new release failed: back to ``before`` (files and images). Always raises."""
        host, reason = self.host, str(exc)
        self.lock.verify("roll back")  # still ours? (another task may be why it failed)
        if not exc.diagnosed:
            say_diagnoses(host, diagnose(host, self.settings))
        host.say(f"{host.name}: deploy failed ({reason}); rolling back")
        if not before:
            self.finish("failed", "", wanted, reason)
            raise OpsError(f"{host.name}: deploy failed: {reason}; there was no previous "
                           "release to return to") from exc
        try:
            roll_back(host, self.settings, self.snapshot, self.managed, before, changed_rel)
        except LockLost:
            raise
        except OpsError as again:
            self.finish("rollback-failed", self.state.current, before, f"{reason}; {again}",
                        end=False)
            raise OpsError(f"{host.name}: deploy failed ({reason}) and the rollback failed "
                           f"too: {again}") from exc
        self.finish("rolled-back", self.state.current, before, reason)
        raise OpsError(f"{host.name}: deploy failed: {reason}; rolled back automatically to "
                       "the previous images and config, which serve again") from exc


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
    timeout = int(settings.deploy.health_timeout_seconds)
    host.say("[dry-run] then: pre-deploy backup (backup.postgres); replace "
             f"{' and '.join(ROLLING)} beside the old containers if their image or config "
             "changed (" + scale_up_cmd(settings, "backend", 2, timeout) + " ...); "
             + up_cmd(settings, timeout) + " for the other services whose image or config "
             "changed; health gate; record the release and prune")
    for service in reloads_for(relative(settings, changed)):
        host.run(reload_cmd(settings, service))
