"""The router checkpoint: a folder with
  gate.safetensors      the gate's weights and normaliser buffers
  features.safetensors  the frozen feature tables (projected embeddings, rarity, vocab flags, lexicon hashes)
  router.json           format_version (2), tau (the one threshold), gate_ms (the gate's own measured
                        cost per query), experts (the sources of E_T and E_M), latency models, lexicon
                        path, feature/gate configs, heads (role -> head folder, relative), and provenance
                        (loss/train configs, calibration, ...)
  heads/<role>/         each expert's option head, when the run answered through heads (`medmoe run
                        --answers heads`): a head folder (models/head.py); the served router answers
                        option questions of the head's format through it, as the gate was trained
Every file is written atomically (temporary file in the same folder, then os.replace).

Format 1 (before issue 18) is read too: its gate_config's second copy of tau is ignored, gate_ms is
unknown (None), and the experts come from `config.transformer` / `config.mamba` (`medmoe run`) or
`model` (`medmoe mambaformer gate train`, which named only E_T).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from medmoe.data.record import Record
from medmoe.errors import ModelError
from medmoe.mambaformer.features import FeatureConfig, GateFeatures, GateFeaturizer
from medmoe.mambaformer.gate import GateConfig, TokenGate, torch_threads
from medmoe.mambaformer.latency import LatencyModel
from medmoe.mambaformer.queries import query_features
from medmoe.models.head import HeadConfig, OptionHead, load_head, save_head
from medmoe.paths import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 2
READS = (1, 2)
ROLES = ("transformer", "mamba")
HEADS = "heads"  # the folder of the experts' option heads, inside the checkpoint


def experts_from_info(info: dict) -> dict[str, str | None]:
    """The expert sources a format-1 router.json implies: `config` (`medmoe run`) names both, `model`
    (`medmoe mambaformer gate train`) only E_T."""
    config = info.get("config")
    if isinstance(config, dict) and (config.get("transformer") or config.get("mamba")):
        return {role: config.get(role) or None for role in ROLES}
    return {"transformer": info.get("model") or None, "mamba": None}


@dataclass
class RouterCheckpoint:
    gate: TokenGate
    featurizer: GateFeaturizer
    tau: float                                 # the one inference threshold: E_M iff p_M > tau
    latency_models: dict[str, LatencyModel] = field(default_factory=dict)
    lexicon_path: str | None = None
    info: dict = field(default_factory=dict)   # provenance: loss/train configs, dataset, calibration, ...
    experts: dict[str, str | None] = field(default_factory=dict)  # role -> source (bundled name, hub id, folder)
    gate_ms: float | None = None               # the gate's measured cost per query (latency.gate_cost_ms)
    heads: dict[str, tuple[OptionHead, HeadConfig]] = field(default_factory=dict)  # role -> its option head

    def __post_init__(self) -> None:
        implied = experts_from_info(self.info)
        self.experts = {role: self.experts.get(role) or implied.get(role) for role in ROLES}

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.gate.state_dict().items()}
        atomic_write_bytes(directory / "gate.safetensors", save_tensors(state))
        atomic_write_bytes(directory / "features.safetensors", save_tensors(self.featurizer.tensors()))
        for role, (head, config) in self.heads.items():
            save_head(head, config, directory / HEADS / role)
        for stale in (directory / HEADS).glob("*") if (directory / HEADS).is_dir() else ():
            if stale.name not in self.heads:  # a head of an earlier run in this folder that this one has not
                shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        meta = {
            **self.info, "format_version": FORMAT_VERSION, "tau": self.tau, "gate_ms": self.gate_ms,
            "experts": dict(self.experts),
            "latency_models": {name: m.to_dict() for name, m in self.latency_models.items()},
            "lexicon_path": self.lexicon_path, "feature_config": self.featurizer.config.to_dict(),
            "gate_config": self.gate.config.to_dict(),
            "heads": {role: f"{HEADS}/{role}" for role in self.heads},
        }
        atomic_write_text(directory / "router.json", json.dumps(meta, indent=1) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> RouterCheckpoint:
        directory = Path(directory)
        files = [directory / n for n in ("router.json", "gate.safetensors", "features.safetensors")]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise ModelError(f"router checkpoint {directory}: missing {', '.join(missing)}")
        try:
            return cls._from_files(*files)
        except ModelError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, RuntimeError, SafetensorError) as exc:  # JSONDecodeError is a ValueError
            raise ModelError(f"router checkpoint {directory}: unreadable or corrupt ({type(exc).__name__}: {exc}); "
                             "write it again with `medmoe run` or `medmoe mambaformer gate train`") from None

    @classmethod
    def _from_files(cls, meta_file: Path, gate_file: Path, features_file: Path) -> RouterCheckpoint:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format_version") not in READS:
            raise ModelError(f"router checkpoint {meta_file.parent}: format version {meta.get('format_version')}, "
                             f"this medmoe reads {', '.join(map(str, READS))}")
        gate = TokenGate(GateConfig.from_dict(meta["gate_config"]))
        gate.load_state_dict(load_tensors(gate_file.read_bytes()))
        gate.eval()
        featurizer = GateFeaturizer.from_tensors(load_tensors(features_file.read_bytes()),
                                                 FeatureConfig.from_dict(meta["feature_config"]))
        models = {name: LatencyModel.from_dict(d) for name, d in meta.get("latency_models", {}).items()}
        known = {"format_version", "tau", "gate_ms", "experts", "latency_models", "lexicon_path", "feature_config",
                 "gate_config", "heads"}
        heads = {}
        for role, relative in (meta.get("heads") or {}).items():
            if role not in ROLES or Path(relative).is_absolute() or ".." in Path(relative).parts:
                raise ModelError(f"{meta_file}: heads.{role} = {relative!r} is not a head folder inside the checkpoint")
            heads[role] = load_head(meta_file.parent / relative)  # a ModelError naming the file when broken
        experts = meta.get("experts") or {}
        gate_ms = meta.get("gate_ms")
        return cls(gate, featurizer, float(meta["tau"]), models, meta.get("lexicon_path"),
                   {k: v for k, v in meta.items() if k not in known},
                   {role: experts.get(role) for role in ROLES}, None if gate_ms is None else float(gate_ms), heads)

    # ---- inference ------------------------------------------------------------------------------
    def features(self, tokenizer: Any, records: Sequence[Record]) -> GateFeatures:
        """The gate's features of the records' queries (`queries.query_features`, this checkpoint's
        truncation); `tokenizer`: E_T's."""
        return query_features(self.featurizer, tokenizer, records)

    @torch.no_grad()
    def route_features(self, features: GateFeatures, threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard inference: (p_M (B,), decisions (B,) bool, True = E_M) at this checkpoint's tau.
        threads: torch intra-op threads for the gate (1 by default; None keeps the current setting)."""
        with torch_threads(threads or torch.get_num_threads()):
            out = self.gate(features)
        return out.p_mamba, out.p_mamba > self.tau

    def route(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
              threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """`route_features` for a padded batch of token ids (B, T) (and its mask (B, T))."""
        with torch_threads(threads or torch.get_num_threads()):
            features = self.featurizer(ids, mask)
        return self.route_features(features, threads)

    def explain_features(self, features: GateFeatures, top_tokens: int = 5) -> list[dict]:
        """Per query: p_M, the expert chosen at tau, token scores, top tokens and feature attributions."""
        return self.gate.explain(features, tau=self.tau, top_tokens=top_tokens)

    def explain(self, ids: torch.Tensor, mask: torch.Tensor | None = None, top_tokens: int = 5) -> list[dict]:
        """`explain_features` for a padded batch of token ids."""
        return self.explain_features(self.featurizer(ids, mask), top_tokens)
