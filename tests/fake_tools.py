"""Fake server tools for running the .sh scripts for real in the fast tier.

``fake_path(tmp_path, docker="...", curl="...")`` writes each body as an
executable bash script into ``tmp_path/bin`` (with ``set -u``; ``$*`` is what it
was called with) and returns an environment with that directory first on PATH.
Every call is appended to ``bin/calls`` as ``NAME ARGS...`` (newlines as ``\\n``)
so a test can say what ran.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def fake_path(tmp_path: Path, **tools: str) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, body in tools.items():
        tool = bin_dir / name.replace("_", "-")
        tool.write_text("#!/usr/bin/env bash\nset -u\n"
                        f'call="{tool.name} $*"; echo "${{call//$\'\\n\'/\\\\n}}" '
                        f'>> {str(bin_dir / "calls")!r}\n' + body + "\n")
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LC_ALL": "C"}


def calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "bin" / "calls"
    return path.read_text().splitlines() if path.exists() else []


def run(command: str, env: dict[str, str], timeout: float = 60,
        merged: bool = False) -> subprocess.CompletedProcess:
    """``command`` as a Host would run it (``bash -c``), with ``env``; ``merged``:
    stderr into stdout, as the health probes capture it."""
    return subprocess.run(["bash", "-c", command], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT if merged else subprocess.PIPE, text=True,
                          timeout=timeout)
