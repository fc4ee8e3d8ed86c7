"""UTC time, written the two ways the project writes it.

* :func:`iso` - ``2026-11-30T00:45:06Z``: logs, manifests, the lock file.
* :func:`stamp` - ``20261130T004506Z``: names (release ids, backup files).
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    return datetime.now(UTC)


def iso(ts: datetime | None = None) -> str:
    return (ts or utc_now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def stamp(ts: datetime | None = None) -> str:
    return (ts or utc_now()).astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def parse_iso(text: str) -> datetime:
    """``iso()``'s text (or any ISO 8601 with an offset or ``Z``) as an aware datetime."""
    ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return ts if ts.tzinfo else ts.replace(tzinfo=UTC)
