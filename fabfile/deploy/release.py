"""Releases on the server: the pure half of ``deploy`` -- server state, plan, containers.

Everything deploy keeps on the server lives under ``{root}/.deploy``::

    lock                   flock(1) target; held by one long-lived SSH command
    lock.owner             who holds it, since when (informational)
    attempt, attempts/<id>/files.tar, images    the rollback snapshot of a deploy
    releases/<id>/files.tar, images    one directory per successful deploy
    current                id of the release that is live
    deploy.log             one line per deploy / rollback

A release's ``images`` file holds ``service ref image-id`` lines. Its image
IDs are also tagged ``<project>-release/<service>:<id>`` so that
``docker image prune`` keeps them until the release itself is pruned.

No I/O here: :mod:`.scripts` builds the commands whose output these parse,
:mod:`.runner` runs them through :class:`~fabfile.host.Host`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..config import SERVICES, Settings
from ..shell import sections

# Services replaced with a second container beside the old one.
ROLLING = ("backend", "frontend")
_RELEASE_ID = re.compile(r"^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$")
# Attempts whose snapshot is kept (besides the one a deploy rolls back to).
KEEP_ATTEMPTS = 5


def state_dir(settings: Settings) -> str:
    return f"{settings.root}/.deploy"


def attempt_dir(settings: Settings, attempt: str) -> str:
    return f"{state_dir(settings)}/attempts/{attempt}"


def relative(settings: Settings, paths: Iterable[str]) -> list[str]:
    """Paths under the stack root, relative to it (for tar -C root)."""
    root = settings.root + "/"
    return sorted(p[len(root):] for p in paths if p.startswith(root))


def release_tag(settings: Settings, service: str, release: str) -> str:
    """The tag that keeps a release's image from being pruned."""
    return f"{settings.compose_project}-release/{service}:{release}"


def image_refs(settings: Settings) -> dict[str, str]:
    """{service: image reference} as the rendered compose file names them."""
    return {s: settings.image(s) for s in SERVICES}


# --- what deploy reads when it takes the lock (scripts.state_command) ------------

@dataclass
class ServerState:
    """What the lock/probe command reported."""

    busy: str | None = None  # holder line when another deploy holds the lock
    hashes: dict[str, str] = field(default_factory=dict)  # rel path -> sha256
    current: str = ""
    releases: list[str] = field(default_factory=list)
    unset: list[str] = field(default_factory=list)
    base: str = ""  # the attempt whose snapshot a failed deploy returns to
    base_interrupted: bool = False
    base_images: dict[str, tuple[str, str]] = field(default_factory=dict)


def parse_state(text: str) -> ServerState:
    sec = sections(text)
    state = ServerState()
    if "busy" in sec:
        busy = re.sub(r" pid \d+( \d+)?$", "", " ".join(sec["busy"]).strip())
        state.busy = busy or "another deploy (owner unknown)"
    for line in sec.get("hashes", []):
        digest, _, name = line.partition("  ")
        if name:
            state.hashes[name] = digest
    cur = sec.get("current", [])
    state.current = cur[0].strip() if cur else ""
    state.releases = sorted(r.strip() for r in sec.get("releases", [])
                            if _RELEASE_ID.match(r.strip()))
    state.unset = sorted(set(sec.get("unset", [])))
    base = " ".join(sec.get("base", [])).split()
    if base:
        state.base = base[0]
        state.base_interrupted = base[1:] == ["interrupted"]
    state.base_images = parse_images("\n".join(sec.get("base-images", [])))
    return state



# --- containers and the plan: what converging to the wanted state takes ---


@dataclass
class Container:
    id: str
    name: str
    service: str
    config_hash: str
    image_id: str
    ref: str
    state: str
    health: str
    created: str = ""

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def short(self) -> str:
        return self.name.lstrip("/")


def parse_containers(lines: Iterable[str]) -> list[Container]:
    out = []
    for line in lines:
        parts = line.strip().split("|")
        if len(parts) != 9:
            continue
        out.append(Container(*parts))
    return out


@dataclass
class Plan:
    """Which services need work to reach the wanted hashes and images."""

    wanted_hash: dict[str, str]
    wanted_image: dict[str, str]  # service -> image id (or "missing")
    refs: dict[str, str]
    containers: list[Container]
    rolling: list[str] = field(default_factory=list)  # replace beside the old one
    recreate: list[str] = field(default_factory=list)  # plain compose up

    def of(self, service: str) -> list[Container]:
        return [c for c in self.containers if c.service == service]

    def is_current(self, c: Container) -> bool:
        return (c.config_hash == self.wanted_hash.get(c.service)
                and c.image_id == self.wanted_image.get(c.service) and c.running)

    def good(self, service: str) -> list[Container]:
        return [c for c in self.of(service) if self.is_current(c)]

    def stale(self, service: str) -> list[Container]:
        return [c for c in self.of(service) if not self.is_current(c)]

    def ok(self, service: str) -> bool:
        return len(self.of(service)) == 1 and len(self.good(service)) == 1

    @property
    def unchanged(self) -> bool:
        return not self.rolling and not self.recreate

    def running_images(self) -> dict[str, tuple[str, str]]:
        """{service: (ref, image id)} of what runs now (the rollback target)."""
        out: dict[str, tuple[str, str]] = {}
        for c in sorted(self.containers, key=lambda c: c.created):
            if c.running and c.service:
                out.setdefault(c.service, (c.ref, c.image_id))
        return out


def parse_plan(text: str, refs: Mapping[str, str], nginx: str = "nginx") -> Plan:
    sec = sections(text)
    wanted_hash = {}
    for line in sec.get("hashes", []):
        name, _, digest = line.strip().partition(" ")
        if digest:
            wanted_hash[name] = digest.strip()
    ids = {}
    for line in sec.get("images", []):
        ref, _, image_id = line.strip().rpartition(" ")
        ids[ref] = image_id
    wanted_image = {s: ids.get(r, "missing") for s, r in refs.items()}
    plan = Plan(wanted_hash, wanted_image, dict(refs),
                parse_containers(sec.get("containers", [])))
    missing = sorted(s for s, i in wanted_image.items() if i == "missing")
    if missing:
        from ..errors import OpsError

        raise OpsError(f"image of {', '.join(missing)} is not on the server after the pull "
                       f"({', '.join(refs[s] for s in missing)}); check the image names and "
                       "the registry")
    nginx_up = any(c.running for c in plan.of(nginx))
    for service in SERVICES:
        if plan.ok(service):
            continue
        # A rolling replace needs something serving now and nginx in front.
        if service in ROLLING and nginx_up and any(c.running for c in plan.of(service)):
            plan.rolling.append(service)
        else:
            plan.recreate.append(service)
    return plan



# --- images of a release, services that reload ----------------------------------


def images_text(images: Mapping[str, tuple[str, str]]) -> str:
    return "".join(f"{s} {ref} {i}\n" for s, (ref, i) in sorted(images.items()))


def parse_images(text: str) -> dict[str, tuple[str, str]]:
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3:
            out[parts[0]] = (parts[1], parts[2])
    return out


# Which service reads which managed files (bind mounts compose cannot see change).
RELOADS = {
    "nginx": ("docker/nginx/",),
    "prometheus": ("monitoring/prometheus/",),
    "grafana": ("monitoring/grafana/",),
    "alertmanager": ("monitoring/alertmanager/",),
}


def reloads_for(changed_rel: Iterable[str]) -> list[str]:
    """Services to reload because a file they mount changed."""
    changed = list(changed_rel)
    return [svc for svc, prefixes in RELOADS.items()
            if any(p.startswith(prefixes) for p in changed)]
