"""``deploy --dry-run`` as a plan: file diffs, then per service what would happen.

Read-only. The server reports its containers (image reference, image ID and
that image's repo digests) and asks the registry for the digest each image
reference has *now* (registry HTTP API, ``HEAD /v2/<repo>/manifests/<tag>``,
anonymous bearer token when the registry asks for one: nothing is pulled).
The verdict per service:

* ``replace beside the old`` - backend/frontend with a new image or config,
  started beside the running container (no downtime);
* ``recreate`` - other services with a new image or config (or nothing runs);
* ``reload`` - a file it mounts changed (nginx, Prometheus, Grafana);
* ``nothing``.

Then the backup deploy would take first. The commands deploy would run are printed only
with ``--verbose``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import yaml

from ..addresses import is_loopback, split_host_port
from ..config import SERVICES, Settings
from ..host import Host, sha256
from ..shell import script, sections
from ..stack import remote_files
from .release import ROLLING, parse_containers, parse_state, relative, reloads_for
from .scripts import INSPECT, probe_script

FACTS = script(__file__, "facts.sh")

ACCEPT = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
])


def split_ref(ref: str) -> tuple[str, str, str]:
    """``[registry/]repo[:tag]`` -> (registry host, repository, tag) as the registry API wants."""
    ref = ref.split("@", 1)[0]
    first, _, rest = ref.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "registry-1.docker.io", ref
        if "/" not in path:
            path = f"library/{path}"
    repo, _, tag = path.partition(":")
    return registry, repo, tag or "latest"


def registry_manifest_url(ref: str) -> str:
    """Where the registry answers the manifest of ``ref`` (plain HTTP on a loopback one)."""
    registry, repo, tag = split_ref(ref)
    scheme = "http" if is_loopback(split_host_port(registry)[0]) else "https"
    return f"{scheme}://{registry}/v2/{repo}/manifests/{tag}"


def facts_script(settings: Settings, refs: list[str]) -> str:
    """``facts.sh``: containers, their images' digests and the registry's digests,
    all in parallel (``@@image`` / ``@@remote`` lines)."""
    targets = "\n".join(f"{ref} {registry_manifest_url(ref)}" for ref in sorted(set(refs)))
    return FACTS.command(settings.compose_project, INSPECT, ACCEPT, targets)


@dataclass
class Row:
    service: str
    now: str  # current image (ref@digest) or "-"
    then: str  # what the registry has now for the wanted ref
    action: str
    why: str = ""


def compose_services(text: str) -> dict[str, object]:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError:
        return {}
    return dict(data.get("services") or {})


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12] if digest else "?"


def plan_rows(settings: Settings, fact_text: str, old_compose: str, new_compose: str,
              changed_rel: list[str]) -> list[Row]:
    """What deploy would do to each service (pure: from the facts gathered)."""
    containers = parse_containers(sections(fact_text).get("containers", []))
    repo_digests: dict[str, list[str]] = {}
    remote: dict[str, str] = {}
    for line in fact_text.splitlines():
        if line.startswith("@@image "):
            parts = line.split()
            repo_digests[parts[1]] = parts[2:]
        elif line.startswith("@@remote "):
            _, ref, digest = line.split(" ", 2)
            remote[ref] = digest.strip()
    old, new = compose_services(old_compose), compose_services(new_compose)
    reloads = reloads_for(changed_rel)
    nginx_up = any(c.running for c in containers if c.service == "nginx")
    rows = []
    for service in SERVICES:
        ref = settings.image(service)
        running = sorted((c for c in containers if c.service == service and c.running),
                         key=lambda c: c.created)
        want = remote.get(ref, "?")
        then = f"{ref}@{_short(want)}" if not want.startswith("?") else f"{ref} ({want[1:]})"
        if not running:
            rows.append(Row(service, "-", then, "create", "not running"))
            continue
        cur = running[-1]
        repo = ref.split("@")[0].rsplit(":", 1)[0] if ":" in ref.split("/")[-1] else ref
        have = [d.split("@", 1)[1] for d in repo_digests.get(cur.image_id, [])
                if "@" in d]
        have_repo = [d.split("@", 1)[1] for d in repo_digests.get(cur.image_id, [])
                     if d.split("@", 1)[0] == repo]
        now = f"{cur.ref}@{_short((have_repo or have or [''])[0])}"
        why = []
        if cur.ref != ref:
            why.append(f"image {cur.ref} -> {ref}")
        elif not want.startswith("?") and want not in have:
            why.append("a newer image in the registry")
        if old.get(service) != new.get(service):
            why.append("its compose definition changed")
        if why:
            action = "replace beside the old" if service in ROLLING and nginx_up \
                else "recreate"
        elif service in reloads:
            action, why = "reload", ["a file it mounts changed"]
        else:
            action = "nothing"
        rows.append(Row(service, now, then, action, "; ".join(why)))
    return rows


def format_plan(rows: list[Row]) -> str:
    table = [("SERVICE", "RUNNING NOW", "", "REGISTRY NOW", "WOULD")]
    table += [(r.service, r.now, "->", r.then, r.action + (f" ({r.why})" if r.why else ""))
              for r in rows]
    w = [max(len(r[i]) for r in table) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(r)).rstrip()
                     for r in table)


def file_diffs(host: Host, files: dict[str, bytes], known: dict[str, str]) -> list[str]:
    """Unified diffs of the files that would change (reading the server's copies)."""
    out = []
    for path, data in files.items():
        if known.get(path) == sha256(data):
            continue
        old = host.read_file(path, sudo=True) if path in known else b""
        out.append("".join(difflib.unified_diff(
            old.decode(errors="replace").splitlines(keepends=True),
            data.decode(errors="replace").splitlines(keepends=True),
            fromfile=f"{host.name}:{path}" if path in known else "/dev/null",
            tofile=f"{host.name}:{path} (new)")).rstrip("\n"))
    return out


def show_plan(host: Host, settings: Settings) -> list[Row]:
    """Print the plan of a deploy to ``host``; returns its rows. Changes nothing."""
    files = remote_files(settings)
    root = settings.root
    state = parse_state(host.check(probe_script(settings, list(files)), sudo=True).stdout)
    if state.busy:
        host.say(f"note: a deploy is running now: {state.busy}")
    if state.unset:
        host.say(f"note: {settings.env_file} lacks {', '.join(state.unset)}: a real deploy "
                 "would refuse; run provision first")
    known = {f"{root}/{rel}": digest for rel, digest in state.hashes.items()}
    changed = [p for p, data in files.items() if known.get(p) != sha256(data)]
    for diff in file_diffs(host, files, known):
        host.say(diff)
    compose_path = settings.compose_file
    old_compose = (host.read_file(compose_path, sudo=True).decode(errors="replace")
                   if compose_path in known else "")
    new_compose = files[compose_path].decode()
    refs = [settings.image(s) for s in SERVICES]
    r = host.check(facts_script(settings, refs), sudo=True, timeout=120)
    rows = plan_rows(settings, r.stdout, old_compose, new_compose,
                     relative(settings, changed))
    work = [x for x in rows if x.action != "nothing"]
    if not work and not changed:
        host.say(f"{host.name}: nothing would change (files, images and containers are "
                 "current)")
        return rows
    if changed:
        host.say(f"{len(changed)} file(s) would change: {', '.join(relative(settings, changed))}")
    host.say(format_plan(rows))
    if not work:
        host.say("no service would be touched (only files that no running service reads)")
    elif any(c.service == "postgres" and c.running for c in parse_containers(
            sections(r.stdout).get("containers", []))):
        host.say(f"backup first: backup.postgres (pre-deploy) into "
                 f"{settings.backup.dir}/postgres")
    else:
        host.say("backup first: none (PostgreSQL is not running yet)")
    return rows
