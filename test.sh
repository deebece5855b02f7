#!/usr/bin/env bash
# The test command from the README: sets up .venv (once) and runs the whole suite, lint and
# type checks. Long fault-injection rounds and benchmarks have their own commands (README).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
.venv/bin/python -m ruff check agent tests bench
.venv/bin/python -m mypy
exec .venv/bin/python -m pytest -q -m "not full and not arm and not package" "$@"
