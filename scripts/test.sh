#!/usr/bin/env bash
# The one test command: install crmsync, bring up the services, lint, type-check, test.
# Extra arguments go to pytest (e.g. scripts/test.sh -k reader).
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
. .venv/bin/activate
pip install -q --disable-pip-version-check -e ".[dev]"
bash scripts/services.sh

ruff check
mypy
python -m pytest "$@"
