"""The option head: a target-specific output head over an expert's features, and its files.

For a question with K options (letters A.. ; PubMedQA's yes/no/maybe are A/B/C), the head scores

    logit_k = w_k . z  +  v . f_k  +  b_k                        k = 1..K

  z   (D,)    the expert's hidden state at one layer and pooling (last token or mean over the
              prompt), standardized: z = (h - mu) / sigma with mu, sigma from the training pool
  f_k (F,)    per-option features: the expert's own answer, s_k = log softmax_k(log p(letter_k |
              prompt)), then any retrieval features (heads/retrieval.py)
  W   (K, D)  rows w_k;  v (F,);  b (K,)

Absent options (a 4-option question in a 5-letter head) get logit -inf. Two special cases share
the code and the files:
  calibration  W = 0, v = (1, 0, ...): the expert's answer with a per-option bias b (fitted, or the
               contextual calibration b = -log p_cf from content-free prompts)
  zero-shot    W = 0, v = (1, 0, ...), b = 0

Files (a head folder): `medmoe_head.json` (HEAD_CONFIG: what the head reads and was trained on) and
`head.safetensors` (mu, sigma, W, v, b). The loader (models/loader.py) recognizes the folder by
HEAD_CONFIG; nothing is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmoe.errors import ModelError
from medmoe.file_checks import safetensors_problem
from medmoe.paths import atomic_dir, atomic_write_json

HEAD_CONFIG = "medmoe_head.json"
HEAD_WEIGHTS = "head.safetensors"
HEAD_FORMAT = 1
KINDS = ("zero-shot", "calibration", "contextual", "head")


@dataclass
class HeadConfig:
    """What a head reads (base model, layer, pooling, option features) and how it was made."""

    kind: str  # one of KINDS
    base: str  # the expert it reads: a bundled name, hub id or path (with adapter, if any)
    letters: int  # K
    option_features: list[str] = field(default_factory=lambda: ["lm_logprob"])
    layer: int | None = None  # hidden-state layer (0 = embeddings; negative from the last); None: no z
    pooling: str | None = None  # "last" or "mean"
    adapter: str | None = None
    dtype: str = "float32"  # the dtype the features were computed in
    retrieval: dict[str, Any] | None = None  # pool and encoder when option features use retrieval
    trained_on: dict[str, Any] = field(default_factory=dict)  # dataset pool, n, records key
    questions: str | None = None  # what it answers: "yesno/en", "choice/en", "choice/zh" (the pool's format)
    selection: dict[str, Any] = field(default_factory=dict)  # cross-validation: grid, scores, choice
    format: int = HEAD_FORMAT

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ModelError(f"unknown head kind {self.kind!r}; one of {', '.join(KINDS)}")
        if self.pooling is not None and self.pooling not in ("last", "mean"):
            raise ModelError(f"unknown pooling {self.pooling!r}; last or mean")
        if (self.layer is None) != (self.pooling is None):
            raise ModelError("a head reads hidden states with both a layer and a pooling, or neither")


class OptionHead(nn.Module):
    """logit_k = w_k . z + v . f_k + b_k (module docstring)."""

    def __init__(self, letters: int, width: int, option_features: int):
        super().__init__()
        self.mu: torch.Tensor
        self.sigma: torch.Tensor
        self.register_buffer("mu", torch.zeros(width))  # (D,)
        self.register_buffer("sigma", torch.ones(width))  # (D,)
        self.W = nn.Parameter(torch.zeros(letters, width))  # (K, D)
        self.v = nn.Parameter(torch.zeros(option_features))  # (F,)
        self.b = nn.Parameter(torch.zeros(letters))  # (K,)

    @property
    def letters(self) -> int:
        return int(self.b.shape[0])

    def forward(self, h: torch.Tensor | None, f: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Logits (N, K) from hidden states h (N, D) or None, option features f (N, K, F) and the
        option mask present (N, K) bool."""
        logits = f[:, : self.letters] @ self.v + self.b  # (N, K)
        if h is not None and self.W.shape[1]:
            z = (h - self.mu) / self.sigma  # (N, D)
            logits = logits + z @ self.W.T
        return logits.masked_fill(~present[:, : self.letters], float("-inf"))


def lm_option_feature(option_logprobs: torch.Tensor) -> torch.Tensor:
    """s (N, K, 1): log softmax over each record's present options of the LM's letter log-probs
    (N, K; -inf where absent, which stays 0 here and is masked by the head)."""
    s = torch.log_softmax(option_logprobs, dim=-1)
    return torch.nan_to_num(s, neginf=0.0).unsqueeze(-1)


def save_head(head: OptionHead, config: HeadConfig, folder: str | Path) -> Path:
    """Write the head folder atomically (HEAD_CONFIG + HEAD_WEIGHTS)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        tensors = {k: v.detach().float().contiguous() for k, v in head.state_dict().items()}
        save_file(tensors, str(tmp / HEAD_WEIGHTS))
        atomic_write_json(tmp / HEAD_CONFIG, asdict(config))
    return folder


def is_head_folder(path: str | Path) -> bool:
    return (Path(path) / HEAD_CONFIG).is_file()


def load_head(folder: str | Path) -> tuple[OptionHead, HeadConfig]:
    """(head in eval mode, its config); every problem is a ModelError naming the file."""
    from safetensors.torch import load_file

    folder = Path(folder)
    config_file, weights = folder / HEAD_CONFIG, folder / HEAD_WEIGHTS
    if not config_file.is_file():
        raise ModelError(f"{folder}: not a head folder (no {HEAD_CONFIG})")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"{config_file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict) or raw.get("format") != HEAD_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise ModelError(f"{config_file}: head format {found!r}, this medmoe reads format {HEAD_FORMAT}")
    try:
        config = HeadConfig(**raw)
    except (TypeError, ModelError) as exc:  # unknown or missing fields; a bad kind, layer without pooling
        raise ModelError(f"{config_file}: {exc}") from exc
    problem = safetensors_problem(weights) if weights.is_file() else f"{weights}: missing"
    if problem:
        raise ModelError(problem)
    state = load_file(str(weights))
    expected = {"mu", "sigma", "W", "v", "b"}
    if set(state) != expected:
        raise ModelError(f"{weights}: tensors {sorted(state)}, expected {sorted(expected)}")
    width = state["W"].shape[1] if state["W"].dim() == 2 else -1
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    want = {"mu": (width,), "sigma": (width,), "W": (config.letters, width), "v": (len(config.option_features),),
            "b": (config.letters,)}
    if width < 0 or shapes != want:
        raise ModelError(f"{weights}: shapes " + ", ".join(f"{k} {shapes[k]}" for k in ("W", "v", "b", "mu", "sigma"))
                         + f" do not match {HEAD_CONFIG} ({config.letters} letters, option features "
                         f"{config.option_features}) and each other")
    head = OptionHead(config.letters, width, len(config.option_features))
    head.load_state_dict(state)
    return head.eval(), config
