"""Why the gate centres the embedding table: mean cosine of random token pairs, raw vs centred vs projected.

    PYTHONPATH=src python benchmarks/embedding_centring.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_report


def main() -> None:
    from medmoe.mambaformer.features import FeatureConfig, principal_components
    from medmoe.models import load_causal_lm

    model, _ = load_causal_lm("smollm2-135m")
    w = model.get_input_embeddings().weight.detach().double()                    # (V, D)
    g = torch.Generator().manual_seed(0)
    pairs = 20_000
    i, j = torch.randint(0, w.shape[0], (pairs,), generator=g), torch.randint(0, w.shape[0], (pairs,), generator=g)
    k = FeatureConfig().embed_dim
    tables = {"raw": w, "centred": w - w.mean(0), f"centred + top-{k} principal components": principal_components(w, k).double()}
    cos = {name: F.cosine_similarity(t[i], t[j]).mean().item() for name, t in tables.items()}
    ratio = (w.mean(0).norm() / w.norm(dim=1).mean()).item()
    rows = ["| table | mean cosine of random token pairs |", "| --- | ---: |"]
    rows += [f"| {name} | {value:.4f} |" for name, value in cos.items()]
    body = "\n".join([f"SmolLM2-135M input embeddings ({w.shape[0]} x {w.shape[1]}), {pairs:,} random pairs (seed 0).",
                      f"Norm of the mean row / mean row norm: {ratio:.3f}.", "", *rows])
    path = write_report("embedding_centring", "Embedding centring for the gate's complexity feature", body,
                        {"pairs": pairs, "mean_cosine": cos, "mean_norm_ratio": ratio})
    print(path.read_text())


if __name__ == "__main__":
    main()
