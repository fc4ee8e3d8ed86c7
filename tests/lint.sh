#!/usr/bin/env bash
# Linters run before the tests (by .ci/run, through the README's test command):
# ruff on the Python, shellcheck on every shell script: the server scripts we
# ship and the rig's (install, setup, the test images' entrypoints).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check --quiet .
find fabfile files tests -name '*.sh' -print0 \
  | xargs -0 shellcheck -S warning
echo "lint: ruff and shellcheck clean"
