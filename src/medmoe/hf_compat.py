"""The one place that knows how the installed transformers names a model's cache.

transformers 5.24 renamed the cache argument and output field of every model from `past_key_values`
to `cache` (the old name still works, with a deprecation warning on each run). medmoe passes and reads
caches only through these two helpers, so it runs warning-free on the pinned release and on the
newest one pyproject allows.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def cache_kwarg() -> str:
    """'cache' on transformers >= 5.24, 'past_key_values' before (read from a stock model's forward)."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def with_cache(cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand `cache` to a model's forward: `model(ids, **with_cache(c))`."""
    return {cache_kwarg(): cache}


def output_cache(outputs: Any) -> Any:
    """The cache a model returned (None when it returned none)."""
    name = cache_kwarg()
    return outputs[name] if name in outputs.keys() else None
