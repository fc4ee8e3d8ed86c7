"""deploy: push a new release of the stack without downtime, roll back on failure.

``fab -H vps deploy`` (or ``inv deploy`` on the server itself), on each host in
turn, stopping at the first host that fails. What it does on a host, step by
step, is :func:`~fabfile.deploy.runner.deploy_host`; this module holds the
tasks only (deploy, rollback, history, unlock) and the namespace.
"""

from __future__ import annotations

import json
import re

from invoke import Collection

from .. import clock
from ..config import APP_IMAGES, Settings
from ..core import host_for, ops_task, settings_for
from ..errors import ConfigError, OpsError
from ..lock import break_lock, stack_lock
from ..shell import q
from ..stack import remote_files
from .history import history_table, log_append, log_line, log_path, parse_log_line
from .release import parse_images, parse_state, state_dir
from .runner import deploy_host, dry_run_commands, local_user, roll_back
from .scripts import end_attempt_cmd, make_current_cmd, state_script

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
    with stack_lock(host, settings, "deploy.rollback", report=state_script(settings)) as lock:
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
        lock.step("make the release current")
        lock.finish("rollback", "\n".join([
            make_current_cmd(settings, target),
            log_append(settings, log_line(clock.iso(), local_user(), "rollback", target, images,
                                          f"from {state.current}")),
            end_attempt_cmd(settings),
        ]))
        host.say(f"{host.name}: release {target} is live again; all services healthy")


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
    log = log_path(settings)
    r = host.check(f"tail -n {count} {q(log)}", sudo=True)
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
