"""Build a Mamba(-hybrid) LM from a Llama-family Transformer ("The Mamba in the Llama", Wang et al. 2024).

The student is the teacher's own `LlamaForCausalLM` (tokenizer, embeddings, MLPs, norms and LM head
copied) in which the self-attention of each chosen layer is replaced by an `AttentionMamba` mixer
initialised from that attention's weights; a few layers may keep attention, and a shallow student
keeps only a subset of the layers.

Linear attention is the selective SSM with B = key, C = query, x = value and no decay. Per query head
h (H heads of width P, with GQA kv head g(h) = h // (H / H_kv)) and state h_t in R^{P x P}:

    x_t[h, :]  = W_V[g(h)] u_t                   (value, repeated to every query head of its group)
    B_t[h, :]  = W_K[g(h)] u_t                   (key)      -> N = P state entries per channel
    C_t[h, :]  = W_Q[h] u_t / sqrt(P)            (query, softmax temperature folded in)
    delta_t    = softplus(W_dt2 W_dt1 u_t + b)   (new: the selective step size, per channel)
    h_t        = exp(delta_t A) h_{t-1} + delta_t B_t x_t ,   y_t = C_t h_t + D x_t
    out_t      = W_O y_t                         (output projection)

with d_inner = H * P channels and B, C in H groups. New parameters: A = -1 everywhere (every key
dimension decays alike; dt sets the time scale, 10 to 1,000 tokens at init), D = 0 (attention has no
skip), a width-K causal conv on x initialised to the identity. RoPE is dropped (the scan is ordered).
No output gate. Distillation (`medmoe distill`) then trains everything against the teacher.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from medmoe.errors import ModelError
from medmoe.paths import atomic_write_file
from medmoe.mamba import cpu_kernel
from medmoe.mamba.block import LayerState
from medmoe.mamba.scan import selective_scan

SPEC_FILE = "medmoe_hybrid.json"


@dataclass
class HybridSpec:
    """What was built: which teacher layers survive, which keep attention, the mixers' shapes."""

    teacher: str
    layers: list[int]                       # teacher layer indices kept, in order
    attention_layers: list[int] = field(default_factory=list)  # subset of `layers` that keep attention
    d_conv: int = 4
    dt_rank: int | None = None
    version: int = 1

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


class AttentionMamba(nn.Module):
    """Drop-in replacement of a Llama attention module: same call signature, returns (output, None)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, d_conv: int = 4,
                 dt_rank: int | None = None, bias: bool = False):
        super().__init__()
        if heads % kv_heads:
            raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
        self.heads, self.kv_heads, self.head_dim, self.d_conv = heads, kv_heads, head_dim, d_conv
        self.d_inner = heads * head_dim
        self.dt_rank = dt_rank or math.ceil(hidden / 16)
        self.x_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)      # from V
        self.B_proj = nn.Linear(hidden, kv_heads * head_dim, bias=bias)      # from K
        self.C_proj = nn.Linear(hidden, heads * head_dim, bias=bias)         # from Q
        self.out_proj = nn.Linear(heads * head_dim, hidden, bias=bias)       # from O
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1)
        self.dt_in = nn.Linear(hidden, self.dt_rank, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.zeros(self.d_inner, head_dim))       # A = -exp(0) = -1
        self.D = nn.Parameter(torch.zeros(self.d_inner))
        self.scan_backend = "auto"
        self.fused = True         # fused CPU inference kernels when they apply (cpu_kernel.use_fused)
        self.layer_idx = 0        # position in the student's decoder, set by _apply_spec
        self.is_recurrent = True  # tells the harness not to reuse cropped caches (PrefixCache)
        self._init_new_parameters()

    @torch.no_grad()
    def _init_new_parameters(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        self.conv1d.weight.zero_()
        self.conv1d.weight[:, 0, -1] = 1.0                                   # identity: x_t passes through
        self.conv1d.bias.zero_()
        nn.init.uniform_(self.dt_in.weight, -self.dt_rank ** -0.5, self.dt_rank ** -0.5)
        nn.init.uniform_(self.dt_proj.weight, -1e-3, 1e-3)                   # dt starts input-independent
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))           # softplus^{-1}(dt)

    @classmethod
    def from_attention(cls, attn: nn.Module, config) -> "AttentionMamba":
        heads, kv = config.num_attention_heads, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        mixer = cls(config.hidden_size, heads, kv, head_dim, bias=attn.q_proj.bias is not None)
        with torch.no_grad():
            for ours, theirs, scale in ((mixer.x_proj, attn.v_proj, 1.0), (mixer.B_proj, attn.k_proj, 1.0),
                                        (mixer.C_proj, attn.q_proj, head_dim ** -0.5), (mixer.out_proj, attn.o_proj, 1.0)):
                ours.weight.copy_(theirs.weight * scale)
                if theirs.bias is not None:
                    ours.bias.copy_(theirs.bias * scale)
        return mixer.to(attn.q_proj.weight.dtype)

    def _per_head(self, t: torch.Tensor) -> torch.Tensor:
        """(b, l, H_kv * P) -> (b, l, H, P): each kv head repeated for the query heads that share it."""
        b, l, _ = t.shape
        return t.view(b, l, self.kv_heads, 1, self.head_dim).expand(
            b, l, self.kv_heads, self.heads // self.kv_heads, self.head_dim).reshape(b, l, self.heads, self.head_dim)

    def forward(self, hidden_states: torch.Tensor, attention_mask=None, past_key_values=None, **kwargs):
        """hidden (b, l, D) -> ((b, l, D), None), like the attention it replaces.

        With a Hugging Face cache (`past_key_values`, e.g. during `generate`) the mixer keeps its
        recurrent state there (`RecurrentStates`) and continues from it: decoding costs the same at
        every position. Left padding (read from the 4D attention mask) is exact: padded positions
        get u = 0, so the state stays zero until the first real token."""
        b, l, _ = hidden_states.shape
        K = self.d_conv
        state = RecurrentStates.of(past_key_values, self.layer_idx, b)
        x = self._per_head(self.x_proj(hidden_states)).reshape(b, l, self.d_inner)   # (b, l, d)
        keep = key_padding(attention_mask, l)                                         # (b, l) or None
        if keep is not None:
            x = x * keep[..., None]
        fused = cpu_kernel.use_fused(self, hidden_states)
        history = state.conv if state is not None else x.new_zeros(b, K - 1, self.d_inner)
        if fused:  # conv + bias + mask in one kernel pass, straight from x and the state
            u = cpu_kernel.causal_conv(x, self.conv1d.weight, self.conv1d.bias, history, keep, silu=False)
        else:
            conv_in = torch.cat([history, x], dim=1)                                  # (b, K-1+l, d)
            u = F.conv1d(conv_in.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                         groups=self.d_inner).transpose(1, 2)                         # (b, l, d)
            if keep is not None:
                u = u * keep[..., None]
        B = self._per_head(self.B_proj(hidden_states))                               # (b, l, H, P)
        C = self.C_proj(hidden_states).view(b, l, self.heads, self.head_dim)         # (b, l, H, P)
        A = -torch.exp(self.A_log.float())                                           # (d, P)
        h0 = None if state is None else state.ssm
        if fused:  # softplus(dt + bias) inside the scan kernel
            dt = F.linear(self.dt_in(hidden_states), self.dt_proj.weight)            # (b, l, d), no bias
            y, h = cpu_kernel.scan_gated(u, dt, self.dt_proj.bias, A, B, C, self.D, None, h0)
        else:
            delta = F.softplus(self.dt_proj(self.dt_in(hidden_states)))              # (b, l, d)
            y, h = selective_scan(u, delta, A, B, C, self.D, h0=h0, backend=self.scan_backend)
        if past_key_values is not None:
            conv_tail = torch.cat([history, x[:, -(K - 1):]], dim=1)[:, -(K - 1):]     # last K-1 conv inputs
            RecurrentStates.store(past_key_values, self.layer_idx, conv_tail, h, hidden_states)
        return self.out_proj(y), None


def key_padding(attention_mask, length: int) -> torch.Tensor | None:
    """(b, l) 1.0 at real tokens, 0.0 at padding, from the 4D mask HF gives attention layers.

    A real token always attends to itself and a padded one never does, so the diagonal of the last
    `length` key columns is the padding mask. None when there is no mask (no padding)."""
    if attention_mask is None or attention_mask.dim() != 4:
        return None
    m = attention_mask[:, 0, -length:, -length:].diagonal(dim1=-2, dim2=-1)         # (b, l)
    keep = m if m.dtype == torch.bool else m == 0                                   # float masks: 0 = attend
    return keep.to(torch.float32) if not keep.all() else None


class RecurrentStates:
    """The mixers' recurrent state, kept on a Hugging Face cache object next to its key/value layers.

    Per mixer layer: the last K-1 conv inputs (b, K-1, d) and the SSM state (b, d, P) (N = P here).
    Each mixer also appends a (b, 1, l, 1) placeholder to its cache layer so that the cache's
    sequence length (which `generate` and the kept attention layers read) counts its tokens.
    Cropping a cache (prefix reuse) cannot rewind a recurrent state: mixers say `is_recurrent`."""

    ATTRIBUTE = "medmoe_recurrent_states"

    @classmethod
    def of(cls, cache, layer_idx: int, batch: int):
        states = getattr(cache, cls.ATTRIBUTE, None) if cache is not None else None
        if not states or layer_idx not in states:
            return None
        state = states[layer_idx]
        if state.ssm.shape[0] != batch:  # a cache repeated for k continuations (batch_repeat_interleave)
            if state.ssm.shape[0] != 1:
                raise ModelError(f"recurrent state has batch {state.ssm.shape[0]}, the input {batch}")
            state = LayerState(conv=state.conv.expand(batch, -1, -1), ssm=state.ssm.expand(batch, -1, -1).contiguous())
        return state

    @classmethod
    def store(cls, cache, layer_idx: int, conv: torch.Tensor, ssm: torch.Tensor, like: torch.Tensor) -> None:
        states = getattr(cache, cls.ATTRIBUTE, None)
        if states is None:
            states = {}
            setattr(cache, cls.ATTRIBUTE, states)
        states[layer_idx] = LayerState(conv=conv.detach(), ssm=ssm.detach())
        if hasattr(cache, "update"):
            placeholder = like.new_zeros(like.shape[0], 1, like.shape[1], 1)
            cache.update(placeholder, placeholder, layer_idx)


def _decoder(model) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner.layers[0], "self_attn"):
        raise ModelError(f"{type(model).__name__}: transfer needs a Llama-family causal LM (model.layers[i].self_attn)")
    return inner


def build_hybrid(teacher, layers: list[int] | None = None, attention_layers: list[int] = (),
                 teacher_name: str = "teacher") -> tuple[nn.Module, HybridSpec]:
    """A student copy of `teacher` keeping teacher layers `layers` (default all), attention replaced by
    AttentionMamba except in `attention_layers` (teacher indices). The teacher is not modified."""
    n = len(_decoder(teacher).layers)
    layers = list(range(n)) if layers is None else sorted(set(layers))
    bad = [i for i in list(layers) + list(attention_layers) if not 0 <= i < n]
    if bad or not layers:
        raise ModelError(f"layer indices {bad or layers} out of range: the teacher has {n} layers (0..{n - 1})")
    if set(attention_layers) - set(layers):
        raise ModelError(f"attention layers {sorted(set(attention_layers) - set(layers))} are not among the kept layers")
    spec = HybridSpec(teacher=teacher_name, layers=layers, attention_layers=sorted(attention_layers))
    student = copy.deepcopy(teacher)
    _apply_spec(student, spec, source_layers=_decoder(teacher).layers)
    student.hybrid_spec = spec  # lets a fine-tuning run save it back as a hybrid
    return student, spec


def _apply_spec(student, spec: HybridSpec, source_layers=None) -> None:
    """Cut `student` to spec.layers and swap attention for mixers (initialised from source_layers)."""
    inner = _decoder(student)
    if source_layers is not None:
        inner.layers = nn.ModuleList(inner.layers[i] for i in spec.layers)
    for new_idx, (layer, old_idx) in enumerate(zip(inner.layers, spec.layers)):
        if old_idx in spec.attention_layers:
            layer.self_attn.layer_idx = new_idx
            continue
        attn = source_layers[old_idx].self_attn if source_layers is not None else layer.self_attn
        layer.self_attn = AttentionMamba.from_attention(attn, student.config)
        layer.self_attn.layer_idx = new_idx
    student.config.num_hidden_layers = len(spec.layers)
    if getattr(student.config, "layer_types", None):
        student.config.layer_types = [student.config.layer_types[i] for i in spec.layers] \
            if source_layers is not None else student.config.layer_types


def save_hybrid(student, spec: HybridSpec, folder: str | Path, tokenizer=None) -> Path:
    """config.json (the teacher's architecture, cut to the kept layers) + model.safetensors +
    medmoe_hybrid.json (+ tokenizer files), each written atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in student.state_dict().items()}
    if getattr(student.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    atomic_write_file(folder / "model.safetensors", lambda p: save_file(state, p, metadata={"format": "pt"}))
    atomic_write_file(folder / "config.json", lambda p: Path(p).write_text(student.config.to_json_string()))
    atomic_write_file(folder / SPEC_FILE, lambda p: Path(p).write_text(spec.to_json()))
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


def load_hybrid(folder: str | Path):
    """(student, tokenizer or None, spec) from a folder written by `save_hybrid`."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    if not (folder / SPEC_FILE).exists():
        raise ModelError(f"{folder}: not a medmoe Mamba hybrid ({SPEC_FILE} is missing)")
    spec = HybridSpec(**json.loads((folder / SPEC_FILE).read_text()))
    config = AutoConfig.from_pretrained(folder)
    student = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    positions = HybridSpec(spec.teacher, list(range(len(spec.layers))),
                           [spec.layers.index(i) for i in spec.attention_layers])
    _apply_spec(student, positions)
    state = load_file(str(folder / "model.safetensors"))
    missing, unexpected = student.load_state_dict(state, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"{folder}: weights do not match (missing {missing[:5]}, unexpected {unexpected[:5]})")
    if getattr(config, "tie_word_embeddings", False):
        student.tie_weights()
    student.hybrid_spec = spec
    tokenizer = None
    if (folder / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    return student.eval(), tokenizer, spec


def evenly_spaced(n_teacher: int, n_keep: int) -> list[int]:
    """n_keep layer indices spread over 0..n_teacher-1, always including the first and the last."""
    if not 1 <= n_keep <= n_teacher:
        raise ModelError(f"cannot keep {n_keep} of {n_teacher} layers")
    if n_keep == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_keep - 1)) for i in range(n_keep)})
