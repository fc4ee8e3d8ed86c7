#!/usr/bin/env bash
# Linters run before the tests (by .ci/run, through the README's test command):
# ruff on the Python, shellcheck on the shell scripts we ship and run
# (the test images' own entrypoints, built into images, are left to their recipes).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --quiet .
find fabfile files tests/rig tests/install-deps.sh tests/lint.sh -name '*.sh' -print0 \
  | xargs -0 shellcheck -S warning
echo "lint: ruff and shellcheck clean"
