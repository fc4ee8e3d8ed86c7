"""`inv` and `fab` expose the same collection, documented for users."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def task_names(tool: str) -> list[str]:
    proc = subprocess.run([tool, "-r", str(ROOT), "--list", "--list-format", "json"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)

    def walk(coll, prefix=""):
        for t in coll["tasks"]:
            yield prefix + t["name"], t["help"]
        for sub in coll["collections"]:
            yield from walk(sub, prefix + sub["name"] + ".")

    return sorted(walk(data))


def test_inv_and_fab_list_the_same_tasks():
    inv, fab = task_names("inv"), task_names("fab")
    assert inv == fab
    names = [n for n, _ in inv]
    assert "render" in names


def test_every_task_has_help_text():
    for name, help_text in task_names("inv"):
        assert help_text and len(help_text) > 20, name


def test_namespaces_are_the_documented_ones():
    allowed = {"provision", "ssl", "deploy", "backup", "restore", "health", "monitoring",
               "sandbox", "app"}
    for name, _ in task_names("inv"):
        if "." in name:
            assert name.split(".")[0] in allowed, name
