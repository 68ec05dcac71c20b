"""Routing analytics: per-layer expert load, and which experts specialise on which subjects.

    profile = routing_profile(model, tokenizer, {"anatomy": texts_a, "virology": texts_v})
    plot_routing(profile, "reports/routing.png")
    groups = record_groups({"cmmlu-med": records}, by="subject", per_group=50)

For each group of texts (a subject, a dataset), the share of (token, slot) assignments each expert
receives in each layer; specialisation of expert i on group s is its share in s divided by its mean
share over groups (1 = no preference).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medmoe.errors import require
from medmoe.loramoe.model import LoraMoeModel


@dataclass
class RoutingProfile:
    groups: list[str]
    layers: list[str]
    load: np.ndarray  # (groups, layers, E): share of assignments per expert; each row sums to 1
    tokens: list[int]  # tokens routed per group

    def overall_load(self) -> np.ndarray:
        """(layers, E) share over all groups, weighted by tokens."""
        weights = np.asarray(self.tokens, dtype=float)[:, None, None]
        return (self.load * weights).sum(0) / max(weights.sum(), 1.0)

    def specialisation(self) -> np.ndarray:
        """(groups, E): mean over layers of share in group / mean share over groups."""
        mean = self.load.mean(axis=0, keepdims=True)
        return (self.load / np.clip(mean, 1e-12, None)).mean(axis=1)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "layers": self.layers, "tokens": self.tokens, "load": self.load.round(5).tolist(),
                "specialisation": self.specialisation().round(4).tolist()}


def record_text(record) -> str:
    """What the model reads of a record, for routing statistics: question, options, then context."""
    options = " ".join(f"{letter}. {text}" for letter, text in zip(record.letters, record.options))
    return " ".join(part for part in (record.question, options, record.context or "") if part)


def record_groups(datasets: dict, by: str = "dataset", per_group: int = 0) -> dict[str, list[str]]:
    """Texts of the records of each dataset ({name: records}), grouped by dataset name or by a
    metadata field such as CMMLU's "subject"; the first `per_group` texts of each group (0 = all)."""
    groups: dict[str, list[str]] = {}
    for name, records in datasets.items():
        for record in records:
            key = name if by == "dataset" else record.metadata.get(by)
            if key is None:
                raise ValueError(f"record {record.id} has no metadata field '{by}' to group by")
            texts = groups.setdefault(str(key), [])
            if not per_group or len(texts) < per_group:
                texts.append(record_text(record))
    return dict(sorted(groups.items()))


@torch.no_grad()
def routing_profile(model: LoraMoeModel, tokenizer, groups: dict[str, list[str]], batch_size: int = 8, max_length: int = 256) -> RoutingProfile:
    """Run every group's texts through the model and collect expert load per layer (padding excluded)."""
    model.eval()
    layers = list(model.moe_layers())
    loads, tokens = [], []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for texts in groups.values():
        with model.track_routing():
            n = 0
            for start in range(0, len(texts), batch_size):
                enc = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_length] for t in texts[start : start + batch_size]]
                width = max(len(e) for e in enc)
                ids = torch.full((len(enc), width), pad, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, e in enumerate(enc):
                    ids[row, : len(e)] = torch.tensor(e)
                    mask[row, : len(e)] = 1
                model(input_ids=ids, attention_mask=mask)
                n += int(mask.sum())
            counts = np.array([model.expert_load()[name] for name in layers], dtype=float)  # (layers, E)
        loads.append(counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None))
        tokens.append(n)
    return RoutingProfile(list(groups), layers, np.stack(loads), tokens)


def plot_routing(profile: RoutingProfile, path: str | Path) -> Path:
    """Two heatmaps: expert load per layer (all groups), and expert specialisation per group."""
    matplotlib = require("matplotlib", "plots", "the routing heatmaps")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_spec) = plt.subplots(1, 2, figsize=(13, min(12, max(4, 0.04 * len(profile.layers) + 3))))
    im = ax_load.imshow(profile.overall_load(), aspect="auto", cmap="viridis")
    ax_load.set(title="Expert load per layer (share of assignments)", xlabel="expert", ylabel="layer")
    step = max(1, len(profile.layers) // 30)
    ax_load.set_yticks(range(0, len(profile.layers), step), [profile.layers[i] for i in range(0, len(profile.layers), step)], fontsize=5)
    fig.colorbar(im, ax=ax_load)
    spec = profile.specialisation()
    im2 = ax_spec.imshow(spec, aspect="auto", cmap="coolwarm", vmin=max(0.0, 2 - spec.max()), vmax=max(spec.max(), 1.01))
    ax_spec.set(title="Specialisation (share / mean share over groups)", xlabel="expert")
    ax_spec.set_yticks(range(len(profile.groups)), profile.groups, fontsize=7)
    fig.colorbar(im2, ax=ax_spec)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
