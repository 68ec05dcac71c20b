"""What is wrong with a model's files, said plainly: run only after a load failed, to replace the
loader's own message ("incomplete metadata, file not fully covered", "cannot reshape array of size
18214336 into shape (49152,612)") with one that names the file and the damage.

Checks read headers only (a few bytes to a few megabytes), never the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

SAFETENSORS_HEADER_BYTES = 8  # a little-endian u64: the length of the JSON header that follows
GGUF_MAGIC = b"GGUF"


def safetensors_problem(path: str | Path) -> str | None:
    """Why a .safetensors file cannot be read (truncated, corrupt header), or None if it looks whole.

    Layout: 8 bytes N, N bytes of JSON {name: {dtype, shape, data_offsets: [begin, end]}}, then the
    tensor bytes; a whole file ends exactly where its last tensor does."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(SAFETENSORS_HEADER_BYTES)
        if len(head) < SAFETENSORS_HEADER_BYTES:
            return f"{path}: truncated: {size} bytes, not even the 8-byte header length of a safetensors file"
        n = int.from_bytes(head, "little")
        if n > size - SAFETENSORS_HEADER_BYTES:
            return f"{path}: truncated or not a safetensors file: {size:,} bytes, but its header alone claims {n:,}"
        try:
            header = json.loads(handle.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            return f"{path}: corrupt: its header is not the JSON tensor table of a safetensors file"
    expected = SAFETENSORS_HEADER_BYTES + n + end
    if size < expected:
        return f"{path}: truncated: {size:,} bytes of the {expected:,} its header describes (an interrupted copy or download?)"
    if size > expected:
        return f"{path}: corrupt: {size - expected:,} bytes after its last tensor"
    return None


def gguf_problem(path: str | Path) -> str | None:
    """Why a .gguf file cannot be read (not GGUF, truncated or corrupt), or None if it parses."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        return f"{path}: not a GGUF file (it starts with {magic!r}, not {GGUF_MAGIC!r})"
    try:
        from gguf import GGUFReader

        GGUFReader(path)  # parses the header and maps every tensor: a short file fails here
    except ImportError:
        return None
    except Exception as exc:  # noqa: BLE001 - whatever the reader trips on, the file is damaged
        return f"{path}: truncated or corrupt GGUF file ({size:,} bytes; reading it fails: {exc})"
    return None


def folder_problem(folder: str | Path) -> str | None:
    """Why a local folder is not a loadable model: no config.json (with a hint of what it is instead),
    or a damaged .safetensors file; None if neither."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    if not (folder / "config.json").is_file():
        return f"no config.json in {folder}, so it is not a model folder{_missing_config_hint(folder)}"
    for weights in sorted(folder.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            return problem
    return None


def _missing_config_hint(folder: Path) -> str:
    """What the folder holds instead: an adapter, a run folder with a model inside, or its files."""
    if (folder / "loramoe_config.json").is_file() or (folder / "adapter_config.json").is_file():
        return " (it holds an adapter: give it as --adapter, with its base model as --model)"
    inner = sorted(p.parent.name for p in folder.glob("*/config.json"))
    if inner:
        return f" (did you mean {folder / inner[0]}?)"
    files = sorted(p.name for p in folder.iterdir())
    return f" (it holds {', '.join(files[:6]) + (', ...' if len(files) > 6 else '') if files else 'nothing'})"
