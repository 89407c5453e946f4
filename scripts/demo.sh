#!/usr/bin/env bash
# The demo on a fresh machine: install crmsync in .venv, then `crmsync demo` (no service needed).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv 2>/dev/null || { apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null && python3 -m venv .venv; }
. .venv/bin/activate
pip install -q --disable-pip-version-check -e .
exec crmsync demo "$@"
