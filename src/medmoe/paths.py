"""Where medmoe keeps its cache, and atomic writes (one place for both)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def medmoe_home() -> Path:
    """The cache root: $MEDMOE_HOME, else $XDG_CACHE_HOME/medmoe, else ~/.cache/medmoe."""
    if os.environ.get("MEDMOE_HOME"):
        return Path(os.environ["MEDMOE_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medmoe"


class DiskFull(OSError):
    """The device filled up while medmoe wrote `path`. Every write goes to a temporary name first and is
    renamed when complete, so the file or folder that was there is unchanged and nothing already done is
    lost; the message says so, with the space left there. The CLI prints it as one line (exit 2)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        existing = next((p for p in (self.path, *self.path.parents) if p.exists()), Path("/"))
        free_mib = shutil.disk_usage(existing).free / 2**20
        self.message = (f"{self.path}: no space left on the device while writing it ({free_mib:,.0f} MiB free there now). "
                        "What was there before is unchanged (medmoe writes to a temporary name and renames), and resumable "
                        "runs keep every step already saved: free some space, or write elsewhere (--output, $MEDMOE_HOME), "
                        "and run the command again")
        super().__init__(errno.ENOSPC, self.message, str(self.path))

    def __str__(self) -> str:
        return self.message


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the device filling up: an OSError ENOSPC, or a writer's own error for it (safetensors
    raises `SafetensorError: ... IoError(Os { code: 28, kind: StorageFull, ... })`, not an OSError)."""
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    text = str(exc)
    return "StorageFull" in text or "No space left on device" in text or "code: 28," in text


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; on success it replaces `target` in one rename.

    A crash or an exception inside the block leaves `target` as it was (absent or complete).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            yield tmp
        except Exception as exc:
            if is_disk_full(exc) and not isinstance(exc, DiskFull):
                raise DiskFull(target) from exc
            raise
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_file(path: Path, write: Callable[[str], Any]) -> None:
    """Call `write(temporary_path)` (e.g. safetensors' save_file, torch.save), then rename the result
    onto `path`: readers see the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    os.close(fd)
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except Exception as exc:
            if is_disk_full(exc) and not isinstance(exc, DiskFull):
                raise DiskFull(path) from exc
            raise
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write_file(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
