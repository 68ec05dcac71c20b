#!/usr/bin/env bash
# The test suite: set up (once), then pytest (arguments pass through, e.g. -m "not real_model").
#   bash scripts/test.sh [pytest args]            in .venv, from requirements.lock (what CI tests)
#   bash scripts/test.sh --latest [pytest args]   in .venv-latest, the newest releases pyproject allows
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--latest" ]; then
  shift
  bash scripts/setup.sh --latest
  exec .venv-latest/bin/python -m pytest "$@"
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
