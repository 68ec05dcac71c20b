"""No code runs from a file placed in a run folder: training checkpoints are safetensors + JSON, an
older pickle checkpoint (`step-N.pt`) is refused unread, and a forged file under the new names is a
clear error naming it. Plus the round trip of everything an exact resume needs."""

from __future__ import annotations

import json
import os
import pickle
import random

import numpy as np
import pytest
import torch

from loramoe_tiny_models import CharTokenizer, arithmetic_examples, tiny_model
from medmoe.errors import ModelError
from medmoe.train import checkpoint as ckpt_mod
from medmoe.train.finetune import FinetuneConfig, finetune

MOE = {"num_experts": 2, "top_k": 1, "rank": 2, "router_dim": 4, "contrastive_tokens": 8, "queue_size": 16}


class CreatesMarker:
    """Unpickling this makes a folder at `marker`: what a planted checkpoint could do instead of os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _payload(marker) -> bytes:
    return pickle.dumps({"model": CreatesMarker(marker)})


def test_the_payload_does_run_code_when_unpickled(tmp_path):
    """The planted files below are real attacks: unpickling one creates its marker."""
    pickle.loads(_payload(tmp_path / "proof"))
    assert (tmp_path / "proof").is_dir()


def _cfg(tmp_path, **kw):
    base = dict(method="loramoe", output=str(tmp_path / "run"), steps=2, batch_size=2, grad_accum=1, lr=5e-3,
                warmup_steps=1, eval_examples=0, save_every=1, progress=False, loramoe=MOE, seed=1)
    return FinetuneConfig(**{**base, **kw})


def _run(cfg):
    model, _ = tiny_model("llama")
    return finetune(cfg, model, CharTokenizer(), train_examples=arithmetic_examples(12))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A genuine finished run folder (settings, checkpoints step-1 and step-2, adapter)."""
    tmp = tmp_path_factory.mktemp("genuine")
    _run(_cfg(tmp))
    return tmp


def _copy_run(src, dst):
    import shutil

    shutil.copytree(src / "run", dst / "run")
    return dst / "run" / "checkpoints"


def _plant_pt(ckpt_dir, marker):
    torch.save({"model": CreatesMarker(marker)}, ckpt_dir / "step-99.pt")  # what older medmoe wrote: a pickle
    return "step-99.pt"


def _plant_pickle_as_safetensors(ckpt_dir, marker):
    tensors = ckpt_dir / "step-99.safetensors"
    tensors.write_bytes(_payload(marker))
    manifest = json.loads((ckpt_dir / "step-2.json").read_text())
    manifest.update(step=99, tensors=tensors.name, tensors_bytes=tensors.stat().st_size)
    (ckpt_dir / "step-99.json").write_text(json.dumps(manifest))
    return "step-99.safetensors"


def _plant_garbage_json(ckpt_dir, marker):
    (ckpt_dir / "step-99.safetensors").write_bytes(_payload(marker))
    (ckpt_dir / "step-99.json").write_bytes(b"\x80\x04garbage{{")
    return "step-99.json"


def _plant_wrong_fields_json(ckpt_dir, marker):
    (ckpt_dir / "step-99.safetensors").write_bytes(_payload(marker))
    (ckpt_dir / "step-99.json").write_text(json.dumps({"step": "99", "tensors": ["x"]}))
    return "step-99.json"


@pytest.mark.parametrize("plant", [_plant_pt, _plant_pickle_as_safetensors, _plant_garbage_json, _plant_wrong_fields_json])
def test_a_planted_checkpoint_never_runs_and_is_named(tmp_path, finished_run, plant):
    ckpt_dir = _copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    name = plant(ckpt_dir, marker)
    with pytest.raises(ModelError) as caught:
        _run(_cfg(tmp_path))  # the resume path: newest checkpoint in --output
    assert not marker.exists()
    assert name in str(caught.value)
    if name.endswith(".pt"):
        assert "older medmoe" in str(caught.value) and "not loaded" in str(caught.value)


def test_a_tensor_file_without_its_manifest_is_never_picked(tmp_path, finished_run):
    """The manifest is written last: a kill between the two files leaves a tensor file that is ignored."""
    ckpt_dir = _copy_run(finished_run, tmp_path)
    (ckpt_dir / "step-99.safetensors").write_bytes(_payload(tmp_path / "pwned"))
    assert [p.name for p in ckpt_mod.list_checkpoints(ckpt_dir)] == ["step-1.json", "step-2.json"]
    result = _run(_cfg(tmp_path))
    assert result["start_step"] == 2 and result["losses"] == {} and not (tmp_path / "pwned").exists()


def test_every_torch_load_in_src_is_weights_only():
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src" / "medmoe"
    calls = [(p, line) for p in src.rglob("*.py") for line in p.read_text().splitlines() if "torch.load(" in line]
    assert all("weights_only=True" in line for _, line in calls), calls
    assert not [p for p in src.rglob("*.py") if "weights_only=False" in p.read_text()]


def _trained_linear(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.9))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


def test_round_trip_restores_tensors_optimizer_scheduler_and_every_rng(tmp_path):
    model, opt, sched = _trained_linear()
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    path = ckpt_mod.save_checkpoint(tmp_path, 7, model, opt, sched, extra={"note": "x"})
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))

    fresh = torch.nn.Linear(3, 2)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1, betas=(0.8, 0.9))
    fresh_sched = torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0 / (s + 1))
    info = ckpt_mod.load_checkpoint(path, fresh, fresh_opt, fresh_sched)
    assert info == {"step": 7, "extra": {"note": "x"}}
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert torch.equal(fresh.weight, model.weight) and torch.equal(fresh.bias, model.bias)
    assert fresh_opt.param_groups[0]["betas"] == (0.8, 0.9) and fresh_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    for p, q in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][key], fresh_opt.state[q][key]), key
    assert fresh_sched.state_dict() == sched.state_dict()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-7.json", "step-7.safetensors"]


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    model, opt, sched = _trained_linear()
    path = ckpt_mod.save_checkpoint(tmp_path, 1, model, opt, sched)
    other = torch.nn.Linear(3, 4)
    other_opt = torch.optim.AdamW(other.parameters())
    with pytest.raises(ModelError, match=r"step-1\.json.*shapes differ.*weight \(2, 3\) vs \(4, 3\)"):
        ckpt_mod.load_checkpoint(path, other, other_opt, torch.optim.lr_scheduler.LambdaLR(other_opt, lambda s: 1.0))


def test_a_replaced_tensor_file_is_refused(tmp_path):
    model, opt, sched = _trained_linear()
    path = ckpt_mod.save_checkpoint(tmp_path, 1, model, opt, sched)
    (tmp_path / "step-1.safetensors").write_bytes(b"short")
    with pytest.raises(ModelError, match=r"step-1\.safetensors: 5 bytes, its manifest says"):
        ckpt_mod.load_checkpoint(path, model, opt, sched)


def test_distill_pointer_must_name_a_checkpoint_folder_inside_the_run(tmp_path):
    from medmoe.mamba.distill import latest_checkpoint

    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(ModelError, match=r"latest\.json:1: invalid JSON"):
        latest_checkpoint(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "../elsewhere", "step": 1}))
    with pytest.raises(ModelError, match=r"latest\.json: field 'checkpoint' must name a ckpt-<step> folder"):
        latest_checkpoint(tmp_path)
    (tmp_path / "ckpt-000001").mkdir()
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "ckpt-000001", "step": 1}))
    assert latest_checkpoint(tmp_path) == tmp_path / "ckpt-000001"
