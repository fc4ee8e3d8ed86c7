"""The command lines deploy runs on the server (pure builders, no I/O).

Every script of more than a line is a ``.sh`` file beside this module
(``state.sh``, ``plan.sh``, ``containers.sh``, ``swap.sh``, ``record.sh``,
``restore.sh``; ``proof.sh`` is built in :mod:`.proof`, ``facts.sh`` in
:mod:`.plan`): values reach it as positional arguments (lists as one argument,
an item a line), never by editing its text. What they print is read back by
:mod:`.release`, :mod:`.proof` and :mod:`.diagnose`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from ..config import Settings
from ..shell import q, script
from ..stack import compose
from .release import (
    KEEP_ATTEMPTS,
    ROLLING,
    Container,
    attempt_dir,
    images_text,
    relative,
    release_tag,
    state_dir,
)

STATE = script(__file__, "state.sh")
PLAN = script(__file__, "plan.sh")
CONTAINERS = script(__file__, "containers.sh")
SWAP = script(__file__, "swap.sh")
RECORD = script(__file__, "record.sh")
RESTORE = script(__file__, "restore.sh")

# One line per container: id|name|service|hash|image|ref|state|health|created.
INSPECT = ("{{.Id}}|{{.Name}}|{{index .Config.Labels \"com.docker.compose.service\"}}|"
           "{{index .Config.Labels \"com.docker.compose.config-hash\"}}|{{.Image}}|"
           "{{.Config.Image}}|{{.State.Status}}|{{if .State.Health}}{{.State.Health.Status}}"
           "{{end}}|{{.Created}}")


def lines(items: Iterable[str]) -> str:
    """A list as one script argument: an item a line."""
    return "\n".join(items)


def _compose_args(settings: Settings) -> tuple[str, str, str]:
    return settings.compose_project, settings.env_file, settings.compose_file


# --- what deploy reads when it takes the lock -----------------------------------------


def _state(settings: Settings, mode: str, managed: Iterable[str]) -> str:
    return STATE.command(mode, state_dir(settings), settings.root, settings.env_file,
                         KEEP_ATTEMPTS, lines(relative(settings, managed)))


def deploy_report_script(settings: Settings, managed: Iterable[str]) -> str:
    """Run by the stack lock's holder once the lock is ours (its ``$T`` is set):
    this attempt's rollback snapshot (``== base``), then the state (``state.sh``)."""
    return 'T="$T" ' + _state(settings, "report", managed)


def probe_script(settings: Settings, managed: Iterable[str]) -> str:
    """What the deploy lock reports, read-only, without the lock (for --dry-run)."""
    return _state(settings, "probe", managed)


def state_script(settings: Settings) -> str:
    """The current release and the releases kept (deploy.rollback's lock report)."""
    return _state(settings, "state", [])


def save_images_cmd(settings: Settings, attempt: str,
                    images: Mapping[str, tuple[str, str]]) -> str:
    """Record the images that ran before this attempt changed anything."""
    path = q(f"{attempt_dir(settings, attempt)}/images")
    return f"printf '%s' {q(images_text(images))} > {path}"


def end_attempt_cmd(settings: Settings) -> str:
    """The attempt ended in a known state: the next deploy snapshots afresh."""
    return f"rm -f {q(state_dir(settings) + '/attempt')}"


def make_current_cmd(settings: Settings, release: str) -> str:
    d = state_dir(settings)
    return f"echo {q(release)} > {q(d + '/current.tmp')} && mv -f {q(d + '/current.tmp')} " \
           f"{q(d + '/current')}"


# --- the plan and the health gate ---------------------------------------------------


def inspect_containers_cmd(settings: Settings) -> str:
    """One line per container of the project (:data:`INSPECT`)."""
    label = q(f"label=com.docker.compose.project={settings.compose_project}")
    return (f"docker ps -aq --no-trunc --filter {label} | "
            f"xargs -r docker inspect --format {q(INSPECT)}")


def registry_host(ref: str) -> str:
    """The registry an image reference is pulled from ("" for Docker Hub)."""
    first, sep, _rest = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return ""


def _http_args(settings: Settings) -> list:
    """DOMAIN PORT ADDRESS TIMEOUT PATHS of ``plan.sh``'s == http."""
    addr = settings.publish.bind
    if addr in ("0.0.0.0", "::", ""):
        addr = "127.0.0.1"
    paths = (settings.health.backend_path, settings.health.backend_deep_path,
             settings.health.frontend_path)
    return [settings.domain, settings.publish.https, addr, settings.health.timeout_seconds,
            lines(paths)]


def plan_script(settings: Settings, refs: Mapping[str, str], pull: bool,
                http: bool = False) -> str:
    """(Log in and pull, then) report wanted config hashes, image IDs and the containers.

    With ``http``, also the health URLs through nginx: when nothing needs to
    change, this one command is the health gate too. What does not depend on
    the pull runs while it pulls. A refused ``docker login`` (the .env's
    REGISTRY_USERNAME / REGISTRY_PASSWORD, password on its stdin) prints
    ``== login-failed REGISTRY: reason`` (exit 3).
    """
    registries = sorted({registry_host(settings.image(s)) or "docker.io" for s in ROLLING})
    http_args = _http_args(settings) if http else ["", "", "", "", ""]
    return PLAN.command("pull" if pull else "state", *_compose_args(settings), INSPECT,
                        lines(sorted(set(refs.values()))), lines(registries), *http_args)


def gate_script(settings: Settings) -> str:
    """Compose health of every service, then HTTP status through nginx."""
    return PLAN.command("gate", settings.compose_project, "", "", INSPECT, "", "",
                        *_http_args(settings))


# --- converging -------------------------------------------------------------------


def scale_up_cmd(settings: Settings, service: str, count: int, timeout: int,
                 known: Iterable[str] = ()) -> str:
    """Start one more container of ``service`` and wait for its health
    (``containers.sh scale-up``; ``known``: the IDs that existed before)."""
    return CONTAINERS.command("scale-up", *_compose_args(settings), service, int(count),
                              int(timeout), lines(known))


def diagnose_script(settings: Settings) -> str:
    """The diagnosis of every container of the project that is not healthy."""
    return CONTAINERS.command("diagnose", settings.compose_project)


def swap_cmd(settings: Settings, old: Iterable[Container], grace: int = 30) -> str:
    """Let nginx see the new container, retire the old ones, then reload again
    (``swap.sh``: unhealthy old containers go before nginx can see them)."""
    old = list(old)
    sick = " ".join(c.id for c in old if c.health not in ("healthy", ""))
    fine = " ".join(c.id for c in old if c.health in ("healthy", ""))
    return SWAP.command(*_compose_args(settings), int(grace), sick, fine)


def remove_cmd(old: Iterable[Container]) -> str:
    ids = " ".join(q(c.id) for c in old)
    return f"docker rm -f {ids} >/dev/null"


def up_cmd(settings: Settings, timeout: int) -> str:
    return compose(settings, "up", "-d", "--remove-orphans", "--wait", "--wait-timeout",
                   str(timeout))


def nginx_reload_cmd(settings: Settings) -> str:
    """Test nginx's config, then reload it (re-resolves the upstream names)."""
    return (compose(settings, "exec", "-T", "nginx", "nginx", "-t", "-q") + " && "
            + compose(settings, "exec", "-T", "nginx", "nginx", "-s", "reload"))


def reload_cmd(settings: Settings, service: str) -> str:
    if service == "nginx":
        return nginx_reload_cmd(settings)
    if service == "prometheus":
        return compose(settings, "kill", "-s", "HUP", "prometheus")
    if service == "alertmanager":  # its entrypoint fills the secrets in again, then SIGHUP
        return compose(settings, "exec", "-T", "alertmanager", "sh",
                       "/etc/alertmanager/entrypoint.sh", "reload")
    return compose(settings, "restart", service)


# --- recording releases, restoring them -----------------------------------------


def record_script(settings: Settings, release: str, managed: Iterable[str],
                  images: Mapping[str, tuple[str, str]]) -> str:
    """Keep this release (files + image tags), make it current, prune old releases."""
    tags = lines(f"{image_id} {release_tag(settings, service, release)}"
                 for service, (_ref, image_id) in sorted(images.items()))
    return RECORD.command(state_dir(settings), settings.root, release,
                          int(settings.deploy.keep_releases),
                          f"{settings.compose_project}-release/", images_text(images),
                          lines(relative(settings, managed)), tags)


def restore_script(settings: Settings, tar: str, managed_now: Iterable[str],
                   images: Mapping[str, tuple[str, str]]) -> str:
    """Put back a snapshot's files (removing managed files it did not have) and image tags."""
    tags = lines(f"{image_id} {ref}" for _service, (ref, image_id) in sorted(images.items()))
    return RESTORE.command(settings.root, tar, lines(relative(settings, managed_now)), tags)
