"""Server settings: one dataclass, read from YAML (`medmoe serve --config`), overridable by flags.

The routed MambaFormer system is served from a router checkpoint folder (`router: DIR`, `medmoe serve
--router DIR`); otherwise the answerer is built by a factory named in the config ("module:callable",
called with the config), by default one causal LM (`model`), so a LoRA-MoE model or any other system
drops in without changing the server. `router` excludes the single-model settings (`model`, `adapter`,
`model_label`, `heads`, `answerer`, `engine`, `dtype`, `device`): the router names its own experts, and each
is loaded with torch in the dtype its router was calibrated with (`medmoe.mambaformer.answerer.served_placement`).

`engine` runs the single model (docs/serving.md, "Engines: torch and llama.cpp"): `torch` (the default)
loads it with transformers through `answerer`'s factory; `llama.cpp` runs its GGUF file quantized on CPU
(`LLAMACPP_FACTORY`, medmoe.answer.llamacpp), without adapters, head folders, a dtype, a GPU or a
custom answerer (`heads: bundled`, the default, serves no heads there); `vllm` (for GPU servers) is not
implemented yet.

`dtype` / `device` place the single model (`medmoe.models.placement`): float32 by default, as before
these settings (the bundled heads were fitted on bfloat16 features and are served on float32 ones,
docs/heads.md); device auto: cuda when torch sees a GPU, else cpu. A Mamba hybrid on CPU stays float32.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from medmoe.errors import MedmoeError
from medmoe.models.placement import parse_device, parse_dtype

DEFAULT_FACTORY = "medmoe.serve.answerers:load_causal_lm_answerer"
LLAMACPP_FACTORY = "medmoe.serve.answerers:load_llamacpp_answerer"  # serves `engine: llama.cpp`
ENGINES = ("torch", "llama.cpp", "vllm")
ROUTED_FACTORY = "medmoe.mambaformer.answerer:load_routed_answerer"  # serves `router`
# Where the main job writes its router: `medmoe run` with its default --output (runs/mambaformer, relative
# to the working directory) for its first dataset (pubmedqa); `medmoe ask` reads it by default too.
# `medmoe serve` without --model, --router, --answerer or --config serves it when it is there.
MAIN_JOB_ROUTER = Path("runs/mambaformer/pubmedqa/router")
ROUTER_FILES = ("router.json", "gate.safetensors", "features.safetensors")  # a router checkpoint folder holds these
PLACEMENT_SETTINGS = ("dtype", "device")  # the single model's; the router places its experts itself
SINGLE_MODEL_SETTINGS = ("model", "adapter", "model_label", "heads", "answerer", "engine", *PLACEMENT_SETTINGS)  # what `router` excludes


@dataclass
class ServeConfig:
    # what answers
    model: str = "smollm2-135m"  # bundled name, hub id or local path (any medmoe artifact), for the default factory
    adapter: str | None = None  # a `medmoe finetune` adapter folder (LoRA-MoE or PEFT LoRA) applied to `model`
    model_label: str | None = None  # name reported as the expert [default: model]
    heads: list[str] | str = "bundled"  # option heads (docs/heads.md): "bundled" (medmoe's for `model`), "none", or head folders
    answerer: str = DEFAULT_FACTORY  # "module:callable", called as factory(config) -> Answerer
    engine: str = "torch"  # what runs the single model: torch | llama.cpp (its GGUF, quantized, on CPU) | vllm (not yet)
    answerer_options: dict[str, Any] = field(default_factory=dict)  # free-form, for custom factories (and `router`'s transformer/mamba)
    router: str | None = None  # a router checkpoint folder: serve the routed MambaFormer system (excludes model, adapter, heads, answerer)
    dtype: str = "float32"  # the single model's: auto | float32 | bfloat16 | float16 (bf16, fp32 ...); a hybrid on CPU stays float32
    device: str = "auto"  # the single model's: auto (cuda when torch sees a GPU, else cpu) | cpu | cuda | cuda:N | mps
    threads: int | None = None  # CPU threads: torch's [default: torch's choice], llama.cpp's [default: os.cpu_count()]
    # where
    host: str = "127.0.0.1"
    port: int = 8000
    # micro-batching and overload
    max_batch_size: int = 16  # requests answered in one forward pass
    max_wait_ms: float = 10.0  # how long the oldest request waits for a batch to fill
    max_queue: int = 128  # queued requests beyond this get 503 + Retry-After
    request_timeout_s: float = 30.0  # a request not answered by then gets 504
    # input safety
    max_body_bytes: int = 65536  # larger bodies get 413
    max_question_chars: int = 4000
    max_context_chars: int = 20000
    max_options: int = 26
    max_option_chars: int = 1000
    max_input_tokens: int = 1024  # prompt tokens; longer contexts are cut (docs/serving.md)
    max_new_tokens: int = 64  # generation limit for open questions and chat

    def __post_init__(self) -> None:
        positive = ["port", "max_batch_size", "max_queue", "request_timeout_s", "max_body_bytes",
                    "max_question_chars", "max_context_chars", "max_options", "max_option_chars",
                    "max_input_tokens", "max_new_tokens"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise MedmoeError(f"server config: {name} must be positive, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise MedmoeError(f"server config: max_wait_ms must be >= 0, got {self.max_wait_ms}")
        try:
            self.dtype, self.device = parse_dtype(self.dtype), parse_device(self.device)
        except MedmoeError as exc:
            raise MedmoeError(f"server config: {exc}") from None
        if ":" not in self.answerer:
            raise MedmoeError(f"server config: answerer must be 'module:callable', got '{self.answerer}'")
        check_engine(self)
        if self.router is not None:
            if not str(self.router).strip():
                raise MedmoeError("server config: router must name a router checkpoint folder, got an empty string")
            defaults = ServeConfig.__dataclass_fields__
            changed = [name for name in SINGLE_MODEL_SETTINGS if getattr(self, name) != defaults[name].default]
            if changed:
                refuse_router_with(changed)

    @classmethod
    def from_yaml(cls, path: Path, **overrides: Any) -> ServeConfig:
        import yaml

        path = Path(path)
        if not path.exists():
            raise MedmoeError(f"server config {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise MedmoeError(f"server config {path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise MedmoeError(f"server config {path}: expected a mapping of settings, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path), **overrides)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config", **overrides: Any) -> ServeConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MedmoeError(f"server config {source}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        merged = {**data, **{k: v for k, v in overrides.items() if v is not None}}
        if merged.get("router") is not None:
            given = [name for name in SINGLE_MODEL_SETTINGS if merged.get(name) is not None]
            if given:
                refuse_router_with(given, source)
        try:
            return cls(**merged)
        except TypeError as exc:
            raise MedmoeError(f"server config {source}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_engine(config: ServeConfig) -> None:
    """A MedmoeError for an unknown engine, for vllm (not implemented), and for llama.cpp with a setting
    it cannot honour (the router's case is refuse_router_with's)."""
    engine = config.engine
    if engine not in ENGINES:
        raise MedmoeError(f"server config: engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "vllm":
        raise MedmoeError("server config: engine vllm is for GPU servers and is not implemented yet; "
                          "use engine torch (any device) or llama.cpp (CPU)")
    if engine != "llama.cpp" or config.router is not None:
        return
    refused = []
    if config.adapter is not None:
        refused.append(f"adapter {config.adapter} (llama.cpp runs the GGUF as it is; adapters are applied by the torch engine)")
    if config.heads not in ("bundled", "none"):
        refused.append("heads: head folders (option heads read the torch model's hidden states; llama.cpp answers by "
                       "the model's own option likelihoods, as heads: none)")
    if config.dtype != "float32":
        refused.append(f"dtype {config.dtype} (a GGUF runs quantized as it is stored; dtype is the torch engine's)")
    if config.device not in ("auto", "cpu"):
        refused.append(f"device {config.device} (this engine runs on CPU; a GPU: engine torch)")
    if config.answerer != DEFAULT_FACTORY:
        refused.append(f"answerer {config.answerer} (the engine chooses the single model's factory; a custom "
                       "answerer runs its own models)")
    if refused:
        raise MedmoeError("server config: engine llama.cpp cannot be used with " + "; ".join(refused))


def refuse_router_with(settings: list[str], source: str = "config") -> None:
    """`router` together with single-model settings: a clear error naming both."""
    names = ", ".join(settings)
    placed = [name for name in settings if name in PLACEMENT_SETTINGS]
    why = (f" (the router loads each expert in the dtype its router was calibrated with, router.json; "
           f"{' and '.join(placed)} place the single model only)" if placed else "")
    if "engine" in settings:
        why += (" (the routed system loads its experts with torch, as its router was calibrated; llama.cpp or "
                "another engine as its Transformer expert is not wired in)")
    raise MedmoeError(f"server config {source}: router and {names} cannot be used together: router serves the routed "
                      f"MambaFormer system, whose two experts its router.json names; {names} set up a single model{why}. "
                      "Give one or the other (the experts of a router can be completed with answerer_options "
                      "transformer / mamba)")


def is_router_dir(path: str | Path) -> bool:
    """Whether `path` is a router checkpoint folder (router.json, gate.safetensors, features.safetensors)."""
    return all((Path(path) / name).is_file() for name in ROUTER_FILES)


def main_job_router(cwd: str | Path | None = None) -> Path | None:
    """The main job's router (MAIN_JOB_ROUTER, relative to `cwd` [the working directory]) if it is there."""
    path = Path(cwd or ".") / MAIN_JOB_ROUTER
    return path if is_router_dir(path) else None


def build_answerer(config: ServeConfig) -> Any:
    """The routed system for `config.router`, the llama.cpp factory for `engine: llama.cpp`; otherwise import
    the configured factory and call it with the config."""
    factory_name = (ROUTED_FACTORY if config.router is not None
                    else LLAMACPP_FACTORY if config.engine == "llama.cpp" else config.answerer)
    module_name, _, attr = factory_name.partition(":")
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise MedmoeError(f"server config: cannot import answerer factory '{factory_name}': {exc}") from None
    answerer = factory(config)
    if not callable(getattr(answerer, "answer_batch", None)):
        raise MedmoeError(f"answerer factory '{factory_name}' returned {type(answerer).__name__}, which has no answer_batch(records)")
    return answerer
