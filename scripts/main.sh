#!/usr/bin/env bash
# The main job on the embedded default: set up (once), then `medmoe run` (arguments pass through).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/medmoe run "$@"
