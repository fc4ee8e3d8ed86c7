"""Figures on the shape of fabfile/: the longest functions, and shell living in Python strings.

    python bench/code_shape.py [--top N] [DIR]

Not a benchmark of speed: the numbers issue 11 asked for, measured the same way
before and after a change.

* A function's length is its source lines (``def`` to its last line, nested
  functions included), read with ``ast``.
* A "shell line in a Python string" is a physical source line of a string
  literal (docstrings excluded) whose text looks like shell: a pipe or ``&&``,
  ``$var`` or ``$(...)``, a redirection, or a command word at its start
  (``if``, ``then``, ``fi``, ``done``, ``set -``, ``docker``, ``printf``...).
  Files ending in ``.sh`` are not counted: they are the point.
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import sys
import tokenize
from pathlib import Path

SHELL = re.compile(
    r"(\|\||&&|\s\|\s|\$\(|\$\{|\$[A-Za-z_?#@!]|\s[12]?>>?\s?[/&\"$a-z]|<<|"
    r"(^|[\s'\"(])(if|then|fi|else|done|do|for|while|case|esac|set -|exit|trap|local|"
    r"printf|echo|mktemp|docker|flock|test -|\[ |mv|rm -|chmod|chown|cat|gzip|zstd|"
    r"sha256sum|sudo|curl|tar|mkdir -p|sync|install -)(\s|;|$))"
)


def functions(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, start, node.end_lineno - node.lineno + 1


def docstring_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(
                    getattr(body[0], "value", None), ast.Constant) and isinstance(
                    body[0].value.value, str):
                lines.update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def shell_lines(source: str, skip: set[int]) -> int:
    counted: set[int] = set()
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    for tok in tokens:
        kind = tok.type
        if kind not in (tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)):
            continue
        for offset, line in enumerate(tok.string.splitlines()):
            row = tok.start[0] + offset
            if row not in skip and SHELL.search(line):
                counted.add(row)
    return len(counted)


def measure(root: Path):
    funcs, shell = [], {}
    for path in sorted(root.rglob("*.py")):
        source = path.read_text()
        tree = ast.parse(source)
        rel = path.relative_to(root.parent)
        for name, line, length in functions(tree):
            funcs.append((length, f"{rel}:{line} {name}"))
        shell[str(rel)] = shell_lines(source, docstring_lines(tree))
    return sorted(funcs, reverse=True), shell


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", default=str(Path(__file__).parent.parent / "fabfile"))
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args(argv)
    funcs, shell = measure(Path(args.dir))
    print(f"longest functions in {args.dir}:")
    for length, where in funcs[: args.top]:
        print(f"  {length:4d} lines  {where}")
    print(f"shell lines in Python strings: {sum(shell.values())}")
    for rel, n in sorted(shell.items(), key=lambda kv: -kv[1]):
        if n:
            print(f"  {n:4d}  {rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
