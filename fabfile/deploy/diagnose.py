"""What a failed container tells: the diagnoses printed by ``containers.sh``
(``diag``), parsed for the terminal and for one error line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Diagnosis:
    """What a failed container told: for the terminal (``lines``) and one line (``short``)."""

    name: str
    state: str = ""
    exit_code: str = ""
    oom: bool = False
    health: list[str] = field(default_factory=list)  # "time: exit N: output", oldest first
    logs: list[str] = field(default_factory=list)

    @property
    def lines(self) -> list[str]:
        out = [f"  {self.name}: state {self.state or '?'}"
               + (f", exit code {self.exit_code}" if self.state in ("exited", "dead") else "")
               + (", killed by the kernel (out of memory)" if self.oom else "")]
        if self.health:
            out.append("  last health checks:")
            out += [f"    {h}" for h in self.health]
        out.append(f"  last {len(self.logs)} log lines (docker logs --tail 30):"
                   if self.logs else "  no log output")
        out += [f"    {line}" for line in self.logs]
        return out

    @property
    def short(self) -> str:
        parts = []
        if self.oom:
            parts.append("out of memory (OOMKilled)")
        elif self.state in ("exited", "dead"):
            parts.append(f"exited with code {self.exit_code}")
        if self.health:
            parts.append(f"health check: {self.health[-1].split(': ', 1)[-1][:160]}")
        err = error_line(self.logs)
        if err:
            parts.append(f"log: {err[:200]}")
        return "; ".join(parts)


_ERRORISH = re.compile(r"(Traceback|Error\b|Exception\b|\w+Error:|panic:|FATAL|[Ff]atal|"
                       r"ERROR|[Ee]xception:)")


def error_line(logs: Iterable[str]) -> str:
    """The last log line that looks like an error (else the last line)."""
    logs = [ln for ln in logs if ln.strip()]
    for line in reversed(logs):
        if _ERRORISH.search(line) and not line.startswith("Traceback"):
            return line.strip()
    return logs[-1].strip() if logs else ""


def parse_diagnoses(text: str) -> list[Diagnosis]:
    """The :func:`diag_function` blocks of a command's output."""
    out: list[Diagnosis] = []
    current: Diagnosis | None = None
    where = ""
    for line in text.splitlines():
        if line.startswith("== diag"):
            current = Diagnosis(line[len("== diag"):].strip().lstrip("/") or "?")
            out.append(current)
            where = ""
            continue
        if current is None:
            continue
        if line.startswith("== exit"):
            parts = line[len("== exit"):].split()
            if len(parts) == 3:
                current.state, current.exit_code = parts[0], parts[1]
                current.oom = parts[2] == "true"
            continue
        if line.startswith("== health-log"):
            where = "health"
            continue
        if line.startswith("== logs"):
            where = "logs"
            continue
        if line.startswith("== end-diag"):
            current, where = None, ""
            continue
        if where == "health" and line.strip():
            try:
                entries = json.loads(line)
            except ValueError:
                continue
            for e in (entries or [])[-3:]:
                output = " ".join(str(e.get("Output", "")).split())[:300]
                when = str(e.get("End") or e.get("Start") or "")[11:19]
                current.health.append(f"{when}: exit {e.get('ExitCode')}: "
                                      f"{output or '(no output)'}")
        elif where == "logs" and line.startswith("| "):
            current.logs.append(line[2:])
        elif where == "logs" and line == "|":
            current.logs.append("")
    return out
