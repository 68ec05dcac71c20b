"""How long loading a bundled model takes: the first pull (dequantize GGUF) vs later loads (cache).

Runs each load in a fresh subprocess (a cold Python, as a user's command would be), with a fresh
MEDMOE_HOME for the first pull. Usage: python benchmarks/model_load.py [--model smollm2-135m] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report

LOAD = (
    "import time, torch; torch.set_num_threads(2); t = time.perf_counter();"
    "from medmoe.models import load_causal_lm; m, tok = load_causal_lm('{model}');"
    "m(torch.tensor([[1, 2, 3]]));"  # first forward: weights really read
    "print(time.perf_counter() - t)"
)


def timed(model: str, home: str) -> float:
    out = subprocess.run([sys.executable, "-c", LOAD.format(model=model)], capture_output=True, text=True,
                         env={**__import__("os").environ, "MEDMOE_HOME": home, "TRANSFORMERS_VERBOSITY": "error"}, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        first = timed(args.model, home)
        later = [timed(args.model, home) for _ in range(args.repeats)]
    body = (
        "| load | seconds |\n| --- | --- |\n"
        f"| first (pull: dequantize GGUF, save safetensors, load, one forward) | {first:.1f} |\n"
        f"| later (cached safetensors, load, one forward), median of {args.repeats} | {statistics.median(later):.1f} |\n"
        f"\nEach load runs in a new Python process and includes importing torch and transformers.\n"
    )
    write_report(f"model_load_{args.model}", f"Loading {args.model}", body,
                 {"model": args.model, "first_s": first, "later_s": later, "later_median_s": statistics.median(later)})
    print(body)


if __name__ == "__main__":
    main()
