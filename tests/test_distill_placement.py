"""`medmoe mambaformer distill --device/--dtype` on CPU: the teacher's forward under bfloat16 autocast with the
student's float32 weights, the placement recorded, a missing GPU refused before anything loads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.errors import ModelError
from medmoe.mamba.distill import DistillConfig, distill, teacher_autocast
from medmoe.mamba.transfer import build_hybrid


def _teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def test_bfloat16_autocast_of_the_teacher_keeps_a_float32_student(tmp_path):
    teacher = _teacher()
    blocks = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(1))
    kls: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    for dtype, seen in kls.items():
        torch.manual_seed(0)
        student, spec = build_hybrid(teacher, layers=[0, 2])
        cfg = DistillConfig(batch_size=4, lr=1e-3, max_steps=2, save_every=100, device="cpu", dtype=dtype)
        result = distill(teacher, student, spec, blocks, tmp_path / dtype, cfg, on_step=lambda _, kl, __, seen=seen: seen.append(kl))
        assert {p.dtype for p in result["student"].parameters()} == {torch.float32}
        state = json.loads((tmp_path / dtype / "ckpt-000002" / "trainer_state.json").read_text())
        assert state["config"]["device"] == "cpu" and state["config"]["dtype"] == dtype
    first = {dtype: seen[0] for dtype, seen in kls.items()}  # unrounded (history rounds to 5 decimals)
    assert first["bfloat16"] != first["float32"] and first["bfloat16"] == pytest.approx(first["float32"], abs=0.05)


def test_teacher_autocast_wants_a_resolved_dtype():
    teacher, ids = _teacher(), torch.randint(0, 50, (2, 8))
    with torch.no_grad(), teacher_autocast(torch.device("cpu"), "bfloat16"):
        assert teacher(input_ids=ids).logits.dtype == torch.bfloat16
    with torch.no_grad(), teacher_autocast(torch.device("cpu"), "float32"):
        assert teacher(input_ids=ids).logits.dtype == torch.float32
    with pytest.raises(ModelError, match="resolve .auto. first"):
        teacher_autocast(torch.device("cpu"), "auto")


def test_cli_refuses_a_bad_value_and_a_missing_gpu(tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["mambaformer", "distill", "-o", str(tmp_path / "d"), "--dtype", "fp8"],
                                terminal_width=300)
    assert result.exit_code == 2 and "--dtype" in result.output
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = CliRunner().invoke(app, ["mambaformer", "distill", "-o", str(tmp_path / "d"), "--device", "cuda",
                                      "--model", str(tmp_path / "no-teacher")])
    assert result.exit_code != 0 and "torch sees 0 CUDA GPUs" in str(result.exception)
    assert not (tmp_path / "d").exists()  # refused before the teacher loads
