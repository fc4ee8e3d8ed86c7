"""Which backups to keep: a pure plan, computed only after a successful backup.

Rules, in this order of strength:

* only *verified* backups (a manifest saying so) count; a data file without
  a manifest is not a backup and is removed as "incomplete";
* a backup whose files no longer match its manifest (sha256 or size, re-checked
  before anything is deleted) is *bad*: it never counts, is kept aside and
  reported, never silently deleted;
* the newest ``min_keep`` verified backups are always kept (so the newest good
  one is never deleted);
* backups younger than ``retention_days`` are kept;
* optional tiers with restic's meaning: ``last`` keeps the n newest;
  ``daily``/``weekly``/``monthly`` keep the newest backup of each of the last
  n days/ISO weeks/months *that have a backup*.

Everything else is deleted, each with the reason it goes.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta


@dataclass(frozen=True)
class Backup:
    """One backup as the retention plan sees it."""

    name: str
    kind: str
    created: datetime
    verified: bool = True
    files: tuple[str, ...] = ()
    size: int = 0
    bad: str = ""  # why its files no longer match its manifest ("" = not known bad)


@dataclass
class Decision:
    backup: Backup
    keep: bool
    reasons: list[str] = field(default_factory=list)
    counted: bool = False  # kept by a rule that counts backups (min_keep, last, tiers)

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


TIERS = {
    "daily": lambda t: t.strftime("%Y-%m-%d"),
    "weekly": lambda t: f"{t.isocalendar()[0]:04d}-W{t.isocalendar()[1]:02d}",
    "monthly": lambda t: t.strftime("%Y-%m"),
}


def _keep(d: Decision, reason: str, counted: bool = False) -> None:
    d.keep = True
    d.counted = d.counted or counted
    d.reasons.append(reason)


def _newest_per_period(good: list[Backup], tier: str, n: int) -> Iterator[tuple[Backup, str]]:
    """The newest backup of each of the last ``n`` periods of ``tier`` that have one."""
    seen: list[str] = []
    for b in good:  # newest first: the first of each period is its newest
        p = TIERS[tier](b.created.astimezone(UTC))
        if p in seen:
            continue
        if len(seen) >= n:
            break
        seen.append(p)
        yield b, p


def plan(
    backups: Iterable[Backup],
    *,
    now: datetime,
    retention_days: int,
    min_keep: int,
    keep: Mapping[str, int] | None = None,
) -> list[Decision]:
    """Decide keep/delete for each backup (newest first), with reasons."""
    keep = dict(keep or {})
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    items = sorted(backups, key=lambda b: (b.created, b.name), reverse=True)
    decisions = {b.name: Decision(b, False) for b in items}
    good = [b for b in items if b.verified and not b.bad]

    for b in items:
        if not b.verified:
            decisions[b.name].reasons.append("incomplete (no manifest of a verified backup)")
        elif b.bad:
            _keep(decisions[b.name], f"BAD: {b.bad}; kept aside for inspection, not counted")
    for b in good[:min_keep]:
        _keep(decisions[b.name], f"one of the newest {min_keep} (min_keep)", counted=True)
    horizon = now - timedelta(days=retention_days)
    for b in good:
        if b.created >= horizon:
            _keep(decisions[b.name], f"younger than {retention_days} days")
    for b in good[: keep.get("last", 0)]:
        _keep(decisions[b.name], f"last {keep['last']}", counted=True)
    for tier in TIERS:
        for b, p in _newest_per_period(good, tier, keep.get(tier, 0)):
            _keep(decisions[b.name], f"{tier} {p}", counted=True)
    for b in good:
        if not decisions[b.name].keep:
            decisions[b.name].reasons.append(
                f"older than {retention_days} days and in no keep tier")
    return [decisions[b.name] for b in items]


def format_plan(decisions: Iterable[Decision]) -> list[str]:
    """Human lines: ``keep   NAME  (reasons)`` / ``delete NAME  (reasons)``."""
    lines = []
    for d in decisions:
        verb = "keep  " if d.keep else "delete"
        when = d.backup.created.astimezone(UTC).strftime("%Y-%m-%d %H:%M")
        lines.append(f"{verb} {d.backup.kind:<8} {d.backup.name:<34} {when}  ({d.reason})")
    return lines
