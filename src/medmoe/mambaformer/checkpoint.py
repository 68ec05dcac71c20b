"""The router checkpoint: a folder with
  gate.safetensors      the gate's weights and normaliser buffers
  features.safetensors  the frozen feature tables (projected embeddings, rarity, vocab flags, lexicon hashes)
  router.json           tau, latency models, lexicon path, feature/gate/loss/train configs, provenance
Every file is written atomically (temporary file in the same folder, then os.replace).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors, save as save_tensors

from medmoe.errors import ModelError
from medmoe.mambaformer.features import FeatureConfig, GateFeaturizer
from medmoe.mambaformer.gate import GateConfig, TokenGate, torch_threads
from medmoe.mambaformer.latency import LatencyModel
from medmoe.paths import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1


@dataclass
class RouterCheckpoint:
    gate: TokenGate
    featurizer: GateFeaturizer
    tau: float
    latency_models: dict[str, LatencyModel] = field(default_factory=dict)
    lexicon_path: str | None = None
    info: dict = field(default_factory=dict)   # loss/train configs, tokenizer and embedding source, calibration

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.gate.state_dict().items()}
        atomic_write_bytes(directory / "gate.safetensors", save_tensors(state))
        atomic_write_bytes(directory / "features.safetensors", save_tensors(self.featurizer.tensors()))
        meta = {
            "format_version": FORMAT_VERSION, "tau": self.tau,
            "latency_models": {name: m.to_dict() for name, m in self.latency_models.items()},
            "lexicon_path": self.lexicon_path, "feature_config": self.featurizer.config.to_dict(),
            "gate_config": self.gate.config.to_dict(), **self.info,
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
                             "write it again with `medmoe run` or `medmoe train router`") from None

    @classmethod
    def _from_files(cls, meta_file: Path, gate_file: Path, features_file: Path) -> RouterCheckpoint:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ModelError(f"router checkpoint {meta_file.parent}: format version {meta.get('format_version')}, "
                             f"this medmoe reads {FORMAT_VERSION}")
        gate = TokenGate(GateConfig.from_dict(meta["gate_config"]))
        gate.load_state_dict(load_tensors(gate_file.read_bytes()))
        gate.eval()
        featurizer = GateFeaturizer.from_tensors(load_tensors(features_file.read_bytes()),
                                                 FeatureConfig.from_dict(meta["feature_config"]))
        models = {name: LatencyModel.from_dict(d) for name, d in meta.get("latency_models", {}).items()}
        known = {"format_version", "tau", "latency_models", "lexicon_path", "feature_config", "gate_config"}
        return cls(gate, featurizer, float(meta["tau"]), models, meta.get("lexicon_path"),
                   {k: v for k, v in meta.items() if k not in known})

    @torch.no_grad()
    def route(self, ids: torch.Tensor, mask: torch.Tensor | None = None,
              threads: int | None = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Hard inference: (p_M (B,), decisions (B,) bool, True = E_M) for a padded batch of token ids.
        threads: torch intra-op threads for the gate (1 by default; None keeps the current setting)."""
        with torch_threads(threads or torch.get_num_threads()):
            out = self.gate(self.featurizer(ids, mask))
        return out.p_mamba, out.p_mamba > self.tau

    def explain(self, ids: torch.Tensor, mask: torch.Tensor | None = None, top_tokens: int = 5) -> list[dict]:
        """Per query: p_M, the expert chosen at tau, token scores, top tokens and feature attributions."""
        return self.gate.explain(self.featurizer(ids, mask), tau=self.tau, top_tokens=top_tokens)
