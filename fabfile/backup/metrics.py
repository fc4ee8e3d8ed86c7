"""The node-exporter textfile of each backup kind: ``maicivy_backup_*{kind=...}``.

Written after every backup run (success or failure), atomically; the success
fields move only when a run succeeded, so an alert sees how old the last good
backup is.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..config import Settings
from ..host import Host
from ..shell import q

METRICS = {
    "maicivy_backup_last_success_timestamp_seconds":
        "Unix time of the last verified backup (0: never).",
    "maicivy_backup_last_run_timestamp_seconds": "Unix time the last backup run ended.",
    "maicivy_backup_last_duration_seconds": "Duration of the last backup run.",
    "maicivy_backup_last_size_bytes": "Size of the last verified backup file.",
    "maicivy_backup_last_result": "1 if the last backup run succeeded, 0 if it failed.",
    "maicivy_backup_offsite_last_success_timestamp_seconds":
        "Unix time of the last verified off-site copy (0: never or not configured).",
}


def metrics_file(settings: Settings, kind: str) -> str:
    return f"{settings.backup.textfile_dir}/maicivy_backup_{kind}.prom"


def parse_metrics(text: str) -> dict[str, float]:
    """``{metric name: value}`` of a textfile written by :func:`metrics_text`."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metrics_text(kind: str, values: Mapping[str, float]) -> str:
    """Prometheus text format for node-exporter's textfile collector."""
    lines = []
    for name, help_text in METRICS.items():
        if name not in values:
            continue
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} gauge")
        value = values[name]
        text = str(int(value)) if float(value).is_integer() else f"{value:.3f}"
        lines.append(f'{name}{{kind="{kind}"}} {text}')
    return "\n".join(lines) + "\n"


def next_metrics(
    previous: Mapping[str, float],
    *,
    ok: bool,
    ended: float,
    duration: float,
    size: int | None,
    offsite_ok: bool | None = None,
) -> dict[str, float]:
    """The values after a run: success fields move only when the run succeeded."""
    values = {
        "maicivy_backup_last_success_timestamp_seconds":
            previous.get("maicivy_backup_last_success_timestamp_seconds", 0),
        "maicivy_backup_last_size_bytes": previous.get("maicivy_backup_last_size_bytes", 0),
        "maicivy_backup_offsite_last_success_timestamp_seconds":
            previous.get("maicivy_backup_offsite_last_success_timestamp_seconds", 0),
    }
    if ok:
        values["maicivy_backup_last_success_timestamp_seconds"] = round(ended)
        if size is not None:
            values["maicivy_backup_last_size_bytes"] = size
    if offsite_ok:
        values["maicivy_backup_offsite_last_success_timestamp_seconds"] = round(ended)
    values["maicivy_backup_last_run_timestamp_seconds"] = round(ended)
    values["maicivy_backup_last_duration_seconds"] = round(duration, 3)
    values["maicivy_backup_last_result"] = 1 if ok and offsite_ok is not False else 0
    return values


def write_metrics(host: Host, settings: Settings, kind: str, **run) -> dict[str, float]:
    """Update ``maicivy_backup_<kind>.prom`` atomically (temp file + rename)."""
    path = metrics_file(settings, kind)
    previous: dict[str, float] = {}
    r = host.check(f"cat {q(path)}", sudo=True)
    if r.ok:
        previous = parse_metrics(r.stdout)
    values = next_metrics(previous, **run)
    host.run(f"mkdir -p {q(settings.backup.textfile_dir)}", sudo=True)
    host.write_file(path, metrics_text(kind, values), mode=0o644, sudo=True)
    return values
