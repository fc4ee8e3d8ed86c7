"""Entry point for ``inv``: the same task collection ``fab`` loads from fabfile/."""

from fabfile import ns  # noqa: F401
