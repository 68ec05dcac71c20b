#!/usr/bin/env bash
# The test suite: set up (once), then pytest (arguments pass through, e.g. -m "not real_model").
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
