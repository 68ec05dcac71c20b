"""Building medmoe's C++ CPU kernels: compiled on first use with torch's C++ extension loader.

One loader for every kernel (the Mamba scan in mamba/cpu_kernel.py, the sparse LoRA-MoE experts in
loramoe/sparse_kernel.py). Building needs a C++ compiler (g++) and ninja (the `kernels` extra); torch
caches the build in $TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions), one folder per kernel
version and Python environment. When the build fails, `build` logs why once and returns None, and the
caller uses its PyTorch fallback. Each kernel has an environment switch (e.g. MEDMOE_MAMBA_CPU_KERNEL=0)
to disable it.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time

log = logging.getLogger(__name__)

CFLAGS = ["-O3", "-ffast-math", "-march=native", "-fopenmp"]


def extension_name(stem: str) -> str:
    """`stem` plus a hash of this Python environment: torch's build command names the environment's
    include paths, so two virtualenvs sharing one build folder would otherwise rebuild on every switch."""
    return f"{stem}_{hashlib.sha256(sys.prefix.encode()).hexdigest()[:8]}"


@functools.cache
def build(stem: str, source: str, disable_env: str, fallback: str):
    """The compiled module of C++ `source` (with PYBIND11_MODULE), or None when `disable_env` is "0"
    or the build fails (logged once, naming `fallback`, what the caller uses instead)."""
    if os.environ.get(disable_env, "1") == "0":
        return None
    name = extension_name(stem)
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        folder = _get_build_directory(name, verbose=False)
        if not os.path.exists(os.path.join(folder, f"{name}.so")):  # say why the first call pauses
            log.warning("medmoe: compiling the C++ kernel %s (first use only, under a minute; cached in %s)", stem, folder)
        _remove_stale_build_lock(folder)
        return load_inline(name=name, cpp_sources=[source], functions=None, verbose=False,
                           extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"])
    except Exception as exc:  # no compiler, no ninja, or a build error: fall back, say so once
        log.warning("medmoe: C++ kernel %s unavailable (%s%s); using %s", stem,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__, _ninja_hint(), fallback)
        return None


def _ninja_hint() -> str:
    """Where to get ninja when torch cannot find it (it is the optional `kernels` extra)."""
    try:
        from torch.utils.cpp_extension import is_ninja_available

        return "" if is_ninja_available() else "; the kernels extra installs ninja: pip install 'medmoe[kernels]'"
    except Exception:
        return ""


def _remove_stale_build_lock(folder: str, max_age_s: float = 600.0) -> None:
    """A build killed mid-way leaves torch's build lock in `folder`, and every later process then waits
    on it forever. A build takes well under a minute, so a lock older than max_age_s is stale: remove it."""
    lock = os.path.join(folder, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > max_age_s:
            os.remove(lock)
            log.warning("medmoe: removed a stale build lock %s (a kernel build was interrupted)", lock)
    except FileNotFoundError:
        pass
