#!/usr/bin/env bash
# The GPU paths end to end on one CUDA GPU, in under 10 minutes (issue 19): eval in bfloat16 and float32,
# LoRA-MoE fine-tuning in bfloat16 with a resume, PEFT LoRA in float16 (GradScaler) with activation
# checkpointing, a 1-process accelerate launch, a short Mamba distillation, the main job, and the server.
#
#   bash scripts/gpu_check.sh [OUT]          # OUT: where the runs go (default runs/gpu_check); prints a summary
#   GPU_CHECK_DRY=1 bash scripts/gpu_check.sh # print the commands only (what tests/test_gpu_check.py checks)
#
# Runs in the current environment: a Python with medmoe and a CUDA build of torch (`pip install medmoe[all]`
# with torch from pytorch.org's CUDA index; scripts/setup.sh installs the CPU build). PYTHON picks the
# interpreter (default: .venv/bin/python if there, else python3). Exits 3 when torch sees no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DRY=${GPU_CHECK_DRY:-0}
MEDMOE="$PY -m medmoe"
PORT=${GPU_CHECK_PORT:-8765}

step() {  # step NAME COMMAND...: run it (timed), or print it in dry mode
  local name=$1; shift
  if [ "$DRY" = 1 ]; then echo "$*"; return 0; fi
  echo "== $name: $*"
  local start=$SECONDS
  "$@"
  echo "== $name: ok in $((SECONDS - start)) s"
}

if [ "$DRY" != 1 ]; then
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "gpu_check: torch sees no CUDA GPU (torch $("$PY" -c 'import torch; print(torch.__version__)')); install a CUDA build of torch" >&2
    exit 3
  fi
  "$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'gpu_check: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, bf16 {torch.cuda.is_bf16_supported()}')"
  mkdir -p "$OUT"
fi

FT="finetune --model smollm2-135m --data pubmedqa --limit 200 --batch-size 8 --eval-examples 16 --device cuda"
step eval-bf16 $MEDMOE eval --model smollm2-135m --benchmarks pubmedqa --limit 200 --device cuda --dtype bfloat16 --output "$OUT/eval-bf16"
step eval-fp32 $MEDMOE eval --model smollm2-135m --benchmarks pubmedqa --limit 200 --device cuda --dtype float32 --output "$OUT/eval-fp32"
step loramoe-bf16 $MEDMOE $FT --method loramoe --dtype bfloat16 --steps 30 --save-every 10 --eval-every 10 -o "$OUT/ft-loramoe"
step loramoe-resume $MEDMOE $FT --method loramoe --dtype bfloat16 --steps 40 --save-every 10 --eval-every 10 -o "$OUT/ft-loramoe"
step lora-fp16-checkpointing $MEDMOE $FT --method lora --dtype float16 --gradient-checkpointing --steps 20 --eval-every 10 -o "$OUT/ft-lora"
step accelerate-1proc "$PY" -m accelerate.commands.launch --config_file recipes/accelerate/ddp.yaml --num_processes 1 -m medmoe \
  $FT --method loramoe --dtype bfloat16 --steps 10 --eval-every 5 -o "$OUT/ft-accelerate"
step distill $MEDMOE mambaformer distill --size shallow --minutes 1 --device cuda --dtype bfloat16 --output "$OUT/mamba"
step main-job $MEDMOE run --data pubmedqa --mamba "$OUT/mamba" --device cuda --dtype auto --train-limit 50 --dev-limit 20 \
  --test-limit 50 --output "$OUT/run"

serve_check() {  # the server on the GPU: one chat completion, then stop it
  $MEDMOE serve --model smollm2-135m --device cuda --dtype bfloat16 --port "$PORT" > "$OUT/serve.log" 2>&1 &
  local pid=$!
  trap 'kill $pid 2>/dev/null || true' RETURN
  "$PY" - "$PORT" <<'EOF'
import json, sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
for _ in range(240):
    try:
        urllib.request.urlopen(base + "/healthz", timeout=2)
        break
    except OSError:
        time.sleep(0.5)
else:
    sys.exit("gpu_check: the server did not come up in 120 s (see serve.log)")
body = json.dumps({"model": "smollm2-135m", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "What vitamin deficiency causes scurvy?"}]}).encode()
req = urllib.request.Request(base + "/v1/chat/completions", body, {"Content-Type": "application/json"})
reply = json.load(urllib.request.urlopen(req, timeout=60))
print("gpu_check: served:", reply["choices"][0]["message"]["content"][:80].replace("\n", " "), "| usage", reply["usage"])
EOF
}
if [ "$DRY" = 1 ]; then echo "$MEDMOE serve --model smollm2-135m --device cuda --dtype bfloat16 --port $PORT"; else step serve serve_check; fi

if [ "$DRY" != 1 ]; then
  "$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("eval-bf16", "eval-fp32"):
    for bench, summary in json.loads((out / name / "summary.json").read_text())["benchmarks"].items():
        print(f"gpu_check: {name} {bench}: accuracy {summary.get('accuracy')}")
for run in ("ft-loramoe", "ft-lora", "ft-accelerate"):
    log = out / run / "train_log.jsonl"
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    print(f"gpu_check: {run}: {len(losses)} logged steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else f"gpu_check: {run}: no log")
print("gpu_check: all steps ran")
EOF
fi
