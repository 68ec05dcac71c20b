"""`--dtype` / `--device`: the one parser (medmoe.models.placement), what `auto` resolves to, and `medmoe run`'s options."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.errors import ModelError
from medmoe.models import placement

runner = CliRunner()


@pytest.mark.parametrize(("text", "name"), [("auto", "auto"), ("float32", "float32"), ("bf16", "bfloat16"),
                                            ("torch.bfloat16", "bfloat16"), ("FP16", "float16"), ("half", "float16")])
def test_dtype_names_and_aliases_parse(text, name):
    assert placement.parse_dtype(text) == name


@pytest.mark.parametrize("text", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_devices_parse(text):
    assert placement.parse_device(text) == text


def test_a_bad_dtype_or_device_names_the_choices():
    with pytest.raises(ModelError, match=r"dtype 'int8': choose one of auto, float32, bfloat16, float16"):
        placement.parse_dtype("int8")
    with pytest.raises(ModelError, match=r"device 'tpu': choose auto, cpu, cuda, cuda:N"):
        placement.parse_device("tpu")
    with pytest.raises(ModelError, match="device 'cuda:x'"):
        placement.parse_device("cuda:x")


def test_auto_device_is_cpu_without_a_gpu_and_an_absent_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert placement.resolve_device("auto") == "cpu"
    assert placement.resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="device cuda:1: torch sees 0 CUDA GPUs"):
        placement.resolve_device("cuda:1")


def test_auto_dtype_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch):
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: True)
    assert placement.resolve_dtype("auto", "cpu") == "bfloat16"
    monkeypatch.setattr(placement, "cpu_has_native_bf16", lambda: False)
    assert placement.resolve_dtype("auto", "cpu") == "float32"
    assert placement.resolve_dtype("auto", "mps") == "float32"
    assert placement.resolve_dtype("float16", "cpu") == "float16"  # asked for: given
    assert placement.torch_dtype("bfloat16") is torch.bfloat16
    with pytest.raises(ModelError, match="must be resolved first"):
        placement.torch_dtype("auto")


def test_cpu_probe_answers_a_bool():
    assert isinstance(placement.cpu_has_native_bf16(), bool)


@pytest.mark.parametrize(("flag", "value", "words"), [("--dtype", "int8", "choose one of auto, float32"),
                                                      ("--device", "tpu", "choose auto, cpu, cuda")])
def test_run_refuses_a_bad_value_before_loading_anything(flag, value, words):
    result = runner.invoke(app, ["run", flag, value], terminal_width=300)
    assert result.exit_code == 2
    assert flag in result.output and words in result.output


def test_run_passes_the_normalised_options_to_the_pipeline(monkeypatch, tmp_path):
    import medmoe.cli.mambaformer as cli
    import medmoe.mambaformer.experiments.pipeline as pipeline

    seen = []
    monkeypatch.setattr(pipeline, "run_pipeline", lambda cfg, log: seen.append(cfg) or {})
    monkeypatch.setattr(cli, "print_summary", lambda dataset, report: None)
    mamba = tmp_path / "em"
    mamba.mkdir()
    result = runner.invoke(app, ["run", "--data", "dental", "--mamba", str(mamba), "--dtype", "bf16", "--device", "cpu",
                                 "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert [(cfg.dtype, cfg.device) for cfg in seen] == [("bfloat16", "cpu")]
    result = runner.invoke(app, ["run", "--data", "dental", "--mamba", str(mamba), "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert (seen[-1].dtype, seen[-1].device) == ("auto", "auto")  # resolved where the experts load
    # the default skips the big baseline (a first run within 15 minutes) and says which flag adds it
    assert seen[-1].big is None and "--big gemma3-270m adds" in " ".join(result.output.split())


def test_run_help_documents_both_options():
    result = runner.invoke(app, ["run", "--help"], terminal_width=300)
    assert "--dtype" in result.output and "--device" in result.output
