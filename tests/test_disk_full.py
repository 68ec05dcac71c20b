"""A full disk while medmoe writes: one clear line that names the file, and nothing already there lost."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from safetensors.torch import save_file

from medmoe import cli
from medmoe.paths import DiskFull, atomic_dir, atomic_write_file, atomic_write_json

# what safetensors raises when the device fills (it is not an OSError)
SAFETENSORS_FULL = 'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'


class SafetensorError(Exception):
    """Stands in for safetensors_rust.SafetensorError, which Python code cannot raise itself."""


def fill_device(path: str) -> None:
    with open(path, "wb") as f:
        f.write(b"partial")
    raise SafetensorError(SAFETENSORS_FULL)


def test_a_full_disk_during_an_atomic_write_keeps_the_old_file_and_names_the_new_one(tmp_path):
    target = tmp_path / "step-10.safetensors"
    save_file({"w": torch.ones(2)}, str(target))
    before = target.read_bytes()
    with pytest.raises(DiskFull) as caught:
        atomic_write_file(target, fill_device)
    assert caught.value.errno == errno.ENOSPC
    assert str(target) in str(caught.value) and "unchanged" in str(caught.value) and "MiB free" in str(caught.value)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-10.safetensors"]  # no temporary file left behind


def test_an_oserror_enospc_inside_an_atomic_folder_is_a_disk_full_error(tmp_path):
    target = tmp_path / "adapter"
    with pytest.raises(DiskFull, match="adapter: no space left"):
        with atomic_dir(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert not target.exists() and list(tmp_path.iterdir()) == []


def test_other_write_errors_pass_through_unchanged(tmp_path):
    def broken(path: str) -> None:
        raise ValueError("not a tensor")

    with pytest.raises(ValueError, match="not a tensor"):
        atomic_write_file(tmp_path / "x.json", broken)
    atomic_write_json(tmp_path / "x.json", {"ok": True})
    assert json.loads((tmp_path / "x.json").read_text()) == {"ok": True}


@pytest.mark.parametrize("error", ["disk_full", "oserror", "safetensors"])
def test_the_cli_prints_one_line_and_exits_2(monkeypatch, capsys, tmp_path, error):
    if error == "oserror":
        raised: BaseException = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "rows.jsonl"))
    elif error == "safetensors":
        raised = SafetensorError(SAFETENSORS_FULL)
    else:
        raised = DiskFull(tmp_path / "rows.jsonl")

    def app() -> None:
        raise raised

    monkeypatch.setattr(cli, "app", app)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "error:" in err and "no space left on the device" in err and "Traceback" not in err
    if error != "safetensors":
        assert "rows.jsonl" in err
