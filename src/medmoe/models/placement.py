"""Where a model runs and in what precision: the one parser of `--dtype` and `--device`, and what `auto` means.

    parse_dtype("bf16" | "bfloat16" | "auto" | ...)  -> "bfloat16" | ... | "auto"   (ModelError otherwise)
    parse_device("cuda:1" | "auto" | ...)            -> "cuda:1" | ... | "auto"
    resolve_device("auto")                           -> "cuda" when torch sees a GPU, else "cpu"
    resolve_dtype("auto", device)                    -> "bfloat16" where the hardware computes it
                                                        natively, else "float32"
    torch_dtype("bfloat16")                          -> torch.bfloat16

`auto` dtype: bfloat16 on a CUDA GPU that supports it and on a CPU with AVX512-BF16 or AMX-BF16
instructions (torch.cpu.get_capabilities); float32 elsewhere (older CPUs emulate bfloat16 matmuls,
which is slower than float32; float16 on CPU is slower still, and Gemma 3 overflows in it, so `auto`
never picks it). Measured on this project's 2-core AVX512-BF16 CPU (reports/expert_dtype.md): bfloat16
scores 20 PubMedQA questions in 0.69x SmolLM2-135M's and 0.77x Gemma-3-270M's float32 time, with the
same answers to all 20 (docs/mambaformer.md, "Main job budget"). A model whose fast kernel exists in
one dtype only (the Mamba hybrid's fused CPU scan is float32) is kept in that dtype by its loader (`medmoe.mambaformer.experts.load_expert`).
"""

from __future__ import annotations

import re
from typing import Any

from medmoe.errors import ModelError

DTYPES = ("auto", "float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}
DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def parse_dtype(text: str) -> str:
    """One of DTYPES (aliases fp32, bf16, fp16, half and a "torch." prefix accepted), else a ModelError."""
    name = str(text).strip().lower().removeprefix("torch.")
    name = DTYPE_ALIASES.get(name, name)
    if name not in DTYPES:
        raise ModelError(f"dtype {text!r}: choose one of {', '.join(DTYPES)}")
    return name


def parse_device(text: str) -> str:
    """auto, cpu, mps, cuda or cuda:N, else a ModelError."""
    name = str(text).strip().lower()
    if not DEVICE_PATTERN.fullmatch(name):
        raise ModelError(f"device {text!r}: choose auto, cpu, cuda, cuda:N (a GPU's index) or mps")
    return name


def resolve_device(device: str) -> str:
    """The device to load on: `auto` is cuda when torch sees a GPU, else cpu; an explicit GPU that is
    not there is a ModelError (a silent fallback would time the wrong machine)."""
    import torch

    device = parse_device(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= count:
            raise ModelError(f"device {device}: torch sees {count} CUDA GPU{'s' if count != 1 else ''} on this machine"
                             f" (torch {torch.__version__}); use --device cpu or auto")
    if device == "mps" and not torch.backends.mps.is_available():
        raise ModelError("device mps: torch has no Apple GPU (MPS) on this machine; use --device cpu or auto")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 matmuls in hardware (AVX512-BF16 or AMX-BF16), per torch."""
    import torch

    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.6; older: the private probes
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


def resolve_dtype(dtype: str, device: str) -> str:
    """The dtype name to load in on `device` (a resolved one): `auto` as the module docstring says."""
    import torch

    dtype = parse_dtype(dtype)
    if dtype != "auto":
        return dtype
    kind = device.split(":")[0]
    if kind == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if kind == "cpu":
        return "bfloat16" if cpu_has_native_bf16() else "float32"
    return "float32"


def torch_dtype(name: str) -> Any:
    """torch.float32 / torch.bfloat16 / torch.float16 for a resolved dtype name."""
    import torch

    name = parse_dtype(name)
    if name == "auto":
        raise ModelError("dtype 'auto' must be resolved first (resolve_dtype) before it names a torch dtype")
    return getattr(torch, name)


def load_dtype(dtype: str, device: str, hybrid: bool) -> str:
    """The dtype a model loads in on a resolved `device`: `dtype` resolved (auto -> bfloat16 or float32),
    except a Mamba hybrid on CPU, which stays float32 (its fused kernels' only dtype)."""
    if hybrid and device == "cpu":
        parse_dtype(dtype)  # still refuse a bad name
        return "float32"
    return resolve_dtype(dtype, device)
