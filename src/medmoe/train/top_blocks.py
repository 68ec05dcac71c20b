"""Adapters on the top N decoder blocks, trained over cached activations of the frozen lower blocks.

With adapters (PEFT LoRA or LoRA-MoE) only on the last n_top of a decoder's L blocks, the lower
L - n_top blocks are frozen and adapter-free, so what they return for a training example never
changes. It is computed once per example (one no-grad forward of the lower blocks) and stored; every
step then runs only the top blocks, the final norm and the LM head at the completion positions:

    h = lower_activations(model, input_ids, attention_mask, n_top)      # (B, T, D): the states entering block L - n_top
    loss, n = top_blocks_loss(model, h, attention_mask, labels, n_top)  # = completion_loss(model, input_ids, ...)

How the blocks run: both calls run the Hugging Face decoder's own forward (`lm.model(...)`). Inside
`only_blocks(lm, keep)` the blocks not in `keep` are replaced, in the layer list and only for the
duration of the `with`, by a module that returns its input, so:
- every block that runs sits at its ORIGINAL index: the forward picks each block's attention mask and
  rotary table by `config.layer_types[i]` with i the position in the list (Gemma-3's sliding and
  global layers, Qwen2's optional sliding window), and each attention module keeps the sliding
  window it was built with;
- the masks, position ids and rotary embeddings are the model's own;
- no parameter is renamed: outside the `with` the model is the full model, so checkpoints and saved
  adapters name the full model's modules and load onto it unchanged.
`inputs_embeds=h` skips exactly the embedding module: Llama, Qwen2/3 and SmolLM2 embed with a plain
nn.Embedding, and Gemma-3 multiplies by sqrt(D) inside its embedding module
(Gemma3TextScaledWordEmbedding.forward), so the cached h, taken after the embedding, already holds it.
For the lower pass the final norm is replaced by nn.Identity as well, so the decoder returns the states
entering block L - n_top.

Scoring (evaluation over the same cache): `last_position_logits(model, h, attention_mask, n_top)` gives the
next-token logits (B, V) at each row's last real position, running the top blocks, the final norm and the LM
head there only; medmoe.train.top_blocks_scoring turns them into `medmoe eval`'s option scores.

The cache (`ActivationCache`, in the run folder's `top_blocks_cache/`, or a folder the caller names, which
several runs at the same settings then share, e.g. a LoRA-MoE and a PEFT LoRA run): per example its (T_i, D)
states without padding (T_i its own length), 64 examples per safetensors file, written atomically,
with `manifest.json` (format, the key below, the files and their sizes) rewritten after each file, so
a run killed while building resumes building where it stopped and a resumed run reads it instead of
computing it again. The key is everything the states depend on: n_top, the block count, model type,
width and dtype, the storage dtype, a fingerprint of the embedding's and lower blocks' weights
(shape, dtype and a strided sample of each tensor) and the SHA-256 of every example's token ids;
a cache with another key is refused. The fingerprint skips the top blocks and the final norm, so it does
not depend on the adapters placed there: the bare base, PEFT LoRA and LoRA-MoE on the top blocks give one
key. A process building the cache holds a lock on the folder (`.lock`); another one waits, then reads what
the first wrote. Nothing is pickled. Size: sum(T_i) x D x bytes per value.
Micro-batches read their rows lazily (one safetensors tensor per example) and right-pad them as
data.collate does; padding positions repeat the row's last real state (finite values; no real position
attends to them and LoRA-MoE's routing statistics leave them out, as with the full model).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medmoe.errors import MedmoeError
from medmoe.loramoe import LoraMoeModel
from medmoe.paths import atomic_write_file, atomic_write_json
from medmoe.train.data import collate
from medmoe.train.loss import body_and_head, completion_loss, hf_model
from medmoe.train.run_folder import read_cache_manifest

# Decoder-only HF model types whose forward was checked to loop over `model.layers` by list position
# (layer_types[i]) and to take inputs_embeds as the first block's input: the ones this module supports.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")
CACHE_FOLDER = "top_blocks_cache"
CACHE_FORMAT = "medmoe-top-blocks-cache/1"
CACHE_MANIFEST = "manifest.json"
EXAMPLES_PER_FILE = 64
STORAGE_DTYPES = ("model", "bfloat16")  # "model": the states as the lower blocks return them (exact)


class _PassThrough(nn.Module):
    """Stands in for a decoder block that is not run: returns the hidden states it is given."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


def _decoder(model: Any) -> tuple[nn.Module, nn.ModuleList]:
    lm = hf_model(model)
    model_type = getattr(getattr(lm, "config", None), "model_type", None)
    inner = getattr(lm, "model", None)
    layers = getattr(inner, "layers", None)
    if model_type not in SUPPORTED_MODEL_TYPES or not isinstance(layers, nn.ModuleList) or \
            not isinstance(getattr(inner, "norm", None), nn.Module) or getattr(lm, "hybrid_spec", None) is not None:
        raise MedmoeError(f"--top-blocks: {type(lm).__name__} (model type {model_type!r}) is not supported; it needs a "
                          f"decoder-only Hugging Face model with model.layers and model.norm, one of "
                          f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama, SmolLM2, Qwen2/3, Gemma-3). Train without --top-blocks")
    assert isinstance(inner, nn.Module)
    return inner, layers


def decoder_blocks(model: Any, n_top: int) -> tuple[nn.Module, nn.ModuleList]:
    """(decoder, its block list) of a supported decoder-only HF model (bare or wrapped); refuses others
    and an n_top outside 1..L-1 (n_top = L leaves nothing to cache)."""
    lm = hf_model(model)
    inner, layers = _decoder(lm)
    if not 1 <= n_top < len(layers):
        raise MedmoeError(f"--top-blocks {n_top}: {type(lm).__name__} has {len(layers)} decoder blocks; give 1..{len(layers) - 1}")
    return inner, layers


def top_block_indices(model: Any, n_top: int) -> range:
    _, layers = decoder_blocks(model, n_top)
    return range(len(layers) - n_top, len(layers))


def top_block_linears(model: Any, target_modules: str | list[str], n_top: int) -> list[str]:
    """Full names of the linears of the last n_top blocks that `target_modules` selects ("all-linear"
    or leaf names / dotted suffixes, matched as LoRA-MoE and PEFT match them): the adapters' targets.
    Full names select these modules, and only these, in PEFT and LoRA-MoE alike, on this model and on
    any fresh copy of it, so a saved adapter loads onto the full model unchanged."""
    from medmoe.loramoe.model import find_target_linears

    lm = hf_model(model)
    _, layers = decoder_blocks(lm, n_top)
    path = next(name for name, module in lm.named_modules() if module is layers)  # "model.layers"
    prefixes = tuple(f"{path}.{i}." for i in top_block_indices(lm, n_top))
    names = [n for n in find_target_linears(lm, target_modules) if n.startswith(prefixes)]
    if not names:
        raise MedmoeError(f"--top-blocks {n_top}: no linear of the last {n_top} blocks matches --target-modules {target_modules!r}")
    return names


@contextmanager
def only_blocks(model: Any, keep: range, final_norm: bool = True) -> Iterator[nn.Module]:
    """Within the block, the decoder runs only the blocks in `keep` (each at its own index; the
    others return their input) and, with final_norm False, returns its states without the final norm.
    Yields the decoder; the block list and the norm are restored on exit, whatever happens."""
    inner, layers = _decoder(model)
    saved, norm = list(layers), inner.norm
    skip = _PassThrough()
    try:
        for i in range(len(layers)):
            if i not in keep:
                layers[i] = skip
        if not final_norm:
            inner.norm = nn.Identity()
        yield inner
    finally:
        for i, block in enumerate(saved):
            layers[i] = block
        inner.norm = norm


@torch.no_grad()
def lower_activations(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, n_top: int) -> torch.Tensor:
    """(B, T, D): the hidden states entering block L - n_top (the output of the lower L - n_top blocks,
    after the embedding, before any final norm), in the model's dtype, no gradient. Runs in eval mode
    (no dropout; the model's mode is restored).
    input_ids, attention_mask: (B, T), right-padded as data.collate makes them."""
    lm = hf_model(model)
    _, layers = decoder_blocks(lm, n_top)
    was_training = lm.training
    lm.eval()
    try:
        with only_blocks(lm, range(0, len(layers) - n_top), final_norm=False) as inner:
            return inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    finally:
        lm.train(was_training)


def top_blocks_loss(model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, n_top: int,
                    *, with_aux: bool = True) -> tuple[torch.Tensor, int]:
    """completion_loss (loss.py) of the full model, computed from `states` (B, T, D), the lower blocks'
    output (lower_activations), through the top n_top blocks, the final norm and the LM head at the
    completion positions only. attention_mask, labels: (B, T) as for completion_loss.
    Refuses a model with trainable parameters in the lower blocks (the cache would go stale)."""
    _, layers = decoder_blocks(model, n_top)
    lower = [name for i in range(len(layers) - n_top) for name, p in layers[i].named_parameters() if p.requires_grad]
    if lower:
        raise MedmoeError(f"--top-blocks {n_top}: the lower blocks have trainable parameters (e.g. {lower[0]}); "
                          "adapters go on the top blocks only")
    with only_blocks(model, range(len(layers) - n_top, len(layers))):
        return completion_loss(model, None, attention_mask, labels, with_aux=with_aux, inputs_embeds=states)


def last_position_logits(model: nn.Module, states: torch.Tensor, attention_mask: torch.Tensor, n_top: int) -> torch.Tensor:
    """(B, V): the full model's next-token logits at each row's last real position (the logits after a
    prompt), computed from `states` (B, T, D), the lower blocks' output (lower_activations or a cache),
    through the top n_top blocks with whatever adapter sits on them, the final norm, and the LM head at
    that position only (Gemma's final-logit soft-capping applied). attention_mask: (B, T), right-padded.
    Refuses a model with adapter weights in the lower blocks (the cached states would not be its own).
    Gradients follow torch's mode: callers that only score run it under torch.inference_mode()."""
    _, layers = decoder_blocks(model, n_top)
    lower = [name for i in range(len(layers) - n_top) for name, _ in layers[i].named_parameters() if "lora_" in name]
    if lower:
        raise MedmoeError(f"--top-blocks {n_top}: the lower blocks hold adapter weights (e.g. {lower[0]}); scoring over "
                          "cached lower-block states needs adapters on the top blocks only")
    split = body_and_head(model)
    if split is None:
        raise MedmoeError(f"--top-blocks {n_top}: {type(hf_model(model)).__name__} cannot be split into decoder and LM head")
    body, head = split
    rows = torch.arange(states.shape[0], device=states.device)  # (B,)
    last = attention_mask.sum(dim=1) - 1                       # (B,): each row's last real position
    routing = model.routing(attention_mask) if isinstance(model, LoraMoeModel) else nullcontext()
    with only_blocks(model, range(len(layers) - n_top, len(layers))), routing:
        hidden = body(inputs_embeds=states, attention_mask=attention_mask, use_cache=False).last_hidden_state  # (B, T, D)
        logits = head(hidden[rows, last])                      # (B, D) -> (B, V)
    cap = getattr(hf_model(model).config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap is not None else logits


# ---- the cache ----------------------------------------------------------------------------------------

def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _fingerprint(inner: nn.Module, top: range) -> str:
    """SHA-256 over name, shape, dtype and 1024 strided values of every parameter and buffer of the
    decoder outside the top blocks and the final norm (what the cached states depend on)."""
    digest = hashlib.sha256()
    skip = tuple(f"layers.{i}." for i in top) + ("norm.",)
    for name, t in [*inner.named_parameters(), *inner.named_buffers()]:
        if name.startswith(skip):
            continue
        flat = t.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 1024)][:1024].to(torch.float32).cpu().numpy()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + sample.tobytes())
    return digest.hexdigest()


def cache_key(model: Any, features: list[dict], n_top: int, storage: str) -> dict[str, Any]:
    """What the cached states depend on; a cache whose manifest holds another key is refused."""
    lm = hf_model(model)
    inner, layers = decoder_blocks(lm, n_top)
    tokens = hashlib.sha256()
    for f in features:
        tokens.update(json.dumps(f["input_ids"]).encode() + b"\n")
    dtype = next(inner.parameters()).dtype
    return {"n_top": n_top, "blocks": len(layers), "model_type": lm.config.model_type, "hidden_size": int(lm.config.hidden_size),
            "model_dtype": _dtype_name(dtype), "storage_dtype": _dtype_name(dtype) if storage == "model" else storage,
            "weights_sha256": _fingerprint(inner, top_block_indices(lm, n_top)),
            "examples": len(features), "tokens": sum(len(f["input_ids"]) for f in features), "token_ids_sha256": tokens.hexdigest()}


def cache_bytes(key: dict[str, Any]) -> int:
    """sum(T_i) x D x bytes per value: the cache's size on disk (plus small headers)."""
    return key["tokens"] * key["hidden_size"] * getattr(torch, key["storage_dtype"]).itemsize


@contextmanager
def _build_lock(folder: Path, progress: bool) -> Iterator[None]:
    """An exclusive lock on `folder`/.lock for the block (made if missing): one process builds a cache at
    a time; a second one waits here and then finds the files the first wrote."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(f"top-blocks cache {folder}: another process is building it; waiting", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class ActivationCache:
    """The lower blocks' states of a list of examples (features of data.tokenize_examples, or any dicts
    with "input_ids" and "labels"), on disk.

    build_or_open(folder, model, features, n_top, pad_id) computes what is missing and returns the
    cache; open(folder, model, features, n_top) returns a complete one and computes nothing;
    states(indices, width) -> (B, width, D) right-padded rows for feature indices `indices`.
    After build_or_open, `computed` is the number of examples this call computed, `seconds` its wall time."""

    def __init__(self, folder: Path, manifest: dict[str, Any], lengths: list[int]):
        self.folder, self.manifest, self.lengths = Path(folder), manifest, lengths
        self.per_file = int(manifest["examples_per_file"])
        self.dtype = getattr(torch, manifest["key"]["model_dtype"])
        self.computed, self.seconds = 0, 0.0

    @classmethod
    def build_or_open(cls, folder: str | Path, model: Any, features: list[dict], n_top: int, pad_id: int, *,
                      storage: str = "model", batch_size: int = 4, progress: bool = False,
                      lower: Any = None, otherwise: str = "use a new --output") -> ActivationCache:
        """Open the cache in `folder`, computing the files it lacks (none, when a previous run built it).
        batch_size: examples per no-grad forward (sorted by length within a file, so little padding).
        progress: print the size and a progress bar. lower: the function that computes the states
        (lower_activations; tests count its calls). otherwise: what to do instead of deleting a cache
        made with another key (the refusal's last words)."""
        if storage not in STORAGE_DTYPES:
            raise MedmoeError(f"--top-blocks-cache-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {storage!r}")
        folder = Path(folder)
        key = cache_key(model, features, n_top, storage)
        started = time.perf_counter()
        with _build_lock(folder, progress):  # another process building it: wait, then read what it wrote
            cache = cls._build(folder, key, model, features, n_top, pad_id, storage, batch_size, progress,
                               lower or lower_activations, otherwise)
        cache.seconds = time.perf_counter() - started
        return cache

    @classmethod
    def open(cls, folder: str | Path, model: Any, features: list[dict], n_top: int, *, storage: str = "model",
             otherwise: str = "use a new --output") -> ActivationCache:
        """The complete cache of these features in `folder` (its key checked against `model`: the lower
        blocks' weights, dtype, n_top, the token ids); a MedmoeError when there is none, it is
        incomplete, or it was made otherwise. Computes nothing."""
        folder = Path(folder)
        path = folder / CACHE_MANIFEST
        if not path.is_file():
            raise MedmoeError(f"{folder}: no top-blocks cache here (no {CACHE_MANIFEST}); build it first")
        manifest = cls._read_manifest(path, cache_key(model, features, n_top, storage), otherwise)
        if not manifest["complete"]:
            have = sum(int(f["count"]) for f in manifest["files"])
            raise MedmoeError(f"{path}: the top-blocks cache is incomplete ({have:,} of {len(features):,} examples); "
                              "finish building it first")
        return cls(folder, manifest, [len(f["input_ids"]) for f in features])

    @classmethod
    def _build(cls, folder: Path, key: dict[str, Any], model: Any, features: list[dict], n_top: int, pad_id: int,
               storage: str, batch_size: int, progress: bool, lower: Any, otherwise: str) -> ActivationCache:
        path = folder / CACHE_MANIFEST
        manifest: dict[str, Any] = cls._read_manifest(path, key, otherwise) if path.exists() else \
            {"format": CACHE_FORMAT, "key": key, "examples_per_file": EXAMPLES_PER_FILE, "files": [], "complete": False}
        per_file = int(manifest["examples_per_file"])
        done = {int(f["first"]) for f in manifest["files"]}
        todo = [first for first in range(0, len(features), per_file) if first not in done]
        if progress:
            missing = sum(min(per_file, len(features) - first) for first in todo)
            state = "complete" if not todo else (f"building: one no-grad forward of the lower {key['blocks'] - n_top} blocks "
                                                 f"per example, {missing:,} examples to go")
            print(f"top-blocks cache {folder}: {key['examples']:,} examples, {key['tokens']:,} tokens x {key['hidden_size']} x "
                  f"{key['storage_dtype']} = {cache_bytes(key) / 1e9:.2f} GB ({state})", flush=True)
        steps: Any = todo
        if progress and todo:
            from tqdm.auto import tqdm

            steps = tqdm(todo, desc="top-blocks cache", unit="file", dynamic_ncols=True)
        store = getattr(torch, key["storage_dtype"])
        computed = 0
        for first in steps:
            order = sorted(range(first, min(first + per_file, len(features))), key=lambda i: len(features[i]["input_ids"]))
            tensors = {}
            for start in range(0, len(order), batch_size):
                group = order[start:start + batch_size]
                batch = collate([features[i] for i in group], pad_id)
                states = lower(model, batch["input_ids"], batch["attention_mask"], n_top)  # (b, T, D)
                for row, i in enumerate(group):
                    tensors[str(i)] = states[row, : len(features[i]["input_ids"])].to(store).clone()  # (T_i, D)
            name = f"chunk-{first // per_file:05d}.safetensors"
            cls._write(folder / name, tensors)
            manifest["files"].append({"name": name, "first": first, "count": len(order), "bytes": (folder / name).stat().st_size})
            manifest["files"].sort(key=lambda f: f["first"])
            atomic_write_json(path, manifest)  # after the file: a listed file is always whole
            computed += len(order)
        if not manifest["complete"]:
            manifest["complete"] = True
            atomic_write_json(path, manifest)
        cache = cls(folder, manifest, [len(f["input_ids"]) for f in features])
        cache.computed = computed
        return cache

    @staticmethod
    def _write(path: Path, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        atomic_write_file(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt", "cache": CACHE_FORMAT}))

    @staticmethod
    def _read_manifest(path: Path, key: dict[str, Any], otherwise: str) -> dict[str, Any]:
        return read_cache_manifest(path, CACHE_FORMAT, key, "top-blocks cache", "other settings, model or data", otherwise)

    def example(self, i: int) -> torch.Tensor:
        """(T_i, D): example i's states, in the model's dtype."""
        from safetensors import safe_open

        path = self.folder / f"chunk-{i // self.per_file:05d}.safetensors"
        try:
            with safe_open(str(path), framework="pt") as f:
                t = f.get_tensor(str(i))
        except Exception as exc:  # safetensors' SafetensorError, OSError
            raise MedmoeError(f"{path}: cannot read example {i} of the top-blocks cache ({type(exc).__name__}: {exc}); "
                              f"delete {self.folder} to build it again") from exc
        if t.shape[0] != self.lengths[i]:
            raise MedmoeError(f"{path}: example {i} has {t.shape[0]} cached positions, {self.lengths[i]} tokens; "
                              f"delete {self.folder} to build it again")
        return t.to(self.dtype)

    def states(self, indices: list[int], width: int) -> torch.Tensor:
        """(B, width, D): the rows of examples `indices`, right-padded to `width` (data.collate's width)
        by repeating each row's last real state."""
        rows = [self.example(i) for i in indices]
        out = torch.empty(len(rows), width, rows[0].shape[1], dtype=self.dtype)
        for r, t in enumerate(rows):
            out[r, : t.shape[0]] = t
            out[r, t.shape[0]:] = t[-1]
        return out
