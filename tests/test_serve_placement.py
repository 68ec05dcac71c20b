"""`medmoe serve --dtype/--device` and the YAML keys dtype/device: parsed, refused with --router, and the
dtype reaches the single model the default factory loads."""

from __future__ import annotations

import pytest
import torch
import typer
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.cli.serve import serve_settings
from medmoe.errors import MedmoeError
from medmoe.serve.answerers import load_causal_lm_answerer
from medmoe.serve.config import ServeConfig
from tiny_lm import tiny_llama, tiny_tokenizer


def test_yaml_keys_are_parsed_and_default_to_float32_auto(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("dtype: bf16\ndevice: CPU\n")
    settings = ServeConfig.from_yaml(path)
    assert (settings.dtype, settings.device) == ("bfloat16", "cpu")
    assert (ServeConfig().dtype, ServeConfig().device) == ("float32", "auto")
    assert ServeConfig.from_yaml(path, dtype="fp16").dtype == "float16"  # a flag overrides the file
    path.write_text("dtype: fp8\n")
    with pytest.raises(MedmoeError, match="server config: dtype 'fp8'"):
        ServeConfig.from_yaml(path)
    path.write_text("router: runs/x/router\ndevice: cpu\n")
    with pytest.raises(MedmoeError, match="router and device cannot be used together.*calibrated with"):
        ServeConfig.from_yaml(path)


def test_flags_parse_and_are_refused_with_router(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--dtype", "fp8"], terminal_width=300)
    assert result.exit_code == 2 and "--dtype" in result.output and "fp8" in result.output
    result = CliRunner().invoke(app, ["serve", "--device", "gpu"], terminal_width=300)
    assert result.exit_code == 2 and "--device" in result.output
    with pytest.raises(typer.BadParameter, match="--router and --dtype cannot be used together"):
        serve_settings(None, None, None, None, None, str(tmp_path / "router"), dtype="bfloat16")
    settings, why = serve_settings(None, None, None, None, None, None, dtype="bfloat16", device="cpu")
    assert settings.router is None and (settings.dtype, settings.device) == ("bfloat16", "cpu")
    assert "(bfloat16, device cpu)" in why


@pytest.mark.parametrize("dtype, expected", [("bfloat16", torch.bfloat16), ("float32", torch.float32)])
def test_the_dtype_reaches_the_served_model(tmp_path, dtype, expected):
    tiny_llama().save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    answerer = load_causal_lm_answerer(ServeConfig(model=str(tmp_path / "m"), heads="none", dtype=dtype, device="cpu"))
    assert {p.dtype for p in answerer.model.parameters()} == {expected}
    assert next(answerer.model.parameters()).device.type == "cpu"
