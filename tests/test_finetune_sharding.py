"""`medmoe finetune --fsdp` on CPU, two gloo processes: the frozen base is sharded across the ranks (each holds
half of every block's weights), the adapters stay whole, and the run computes what the data-parallel run
computes, bit for bit: the same losses, held-out losses and trained weights; killed and resumed, with or
without --fsdp, it equals the uninterrupted run (train/sharding.py)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loramoe_tiny_models import CharTokenizer, Killed, arithmetic_examples, kill_at, tiny_model
from medmoe.errors import MedmoeError
from medmoe.train.finetune import FinetuneConfig, finetune
from medmoe.train.sharding import accelerate_fsdp_note, fsdp_requested
from test_finetune_placement import MOE, _free_port, _trained


def _cfg(root: Path, name: str, method: str, fsdp: bool) -> FinetuneConfig:
    return FinetuneConfig(method=method, output=str(root / name), steps=4, batch_size=2, lr=5e-3, warmup_steps=1,
                          eval_every=2, eval_examples=4, save_every=2, progress=False, loramoe=MOE, seed=2, fsdp=fsdp,
                          lora_rank=4)


def _worker(rank: int, world: int, port: int, root: str, method: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root_path = Path(root)

    def run(name: str, fsdp: bool, on_step=None) -> dict:
        return finetune(_cfg(root_path, name, method, fsdp), tiny_model("llama")[0], CharTokenizer(),
                        train_examples=arithmetic_examples(), rank=rank, world=world, on_step=on_step)

    def killed(name: str, fsdp: bool) -> None:
        try:
            run(name, fsdp, on_step=kill_at(3))
        except Killed:
            pass

    try:
        replicated, sharded = run("ddp", False), run("fsdp", True)
        frozen = {n: p for n, p in sharded["model"].named_parameters() if not p.requires_grad and "layers.0." in n}
        out = {"ddp": replicated["losses"], "fsdp": sharded["losses"], "ddp_eval": replicated["eval"],
               "fsdp_eval": sharded["eval"],
               "weights_equal": all(torch.equal(w, _trained(sharded["model"])[n]) for n, w in _trained(replicated["model"]).items()),
               "trainable_plain": all(type(p) is torch.nn.Parameter for p in sharded["model"].parameters() if p.requires_grad),
               "frozen_local_rows": {n: [int(p.to_local().shape[0]) if hasattr(p, "to_local") else -1, int(p.shape[0])]
                                     for n, p in frozen.items()}}
        killed("fsdp-resumed", True)
        out["fsdp_resumed"] = run("fsdp-resumed", True)["losses"]
        killed("ddp-then-fsdp", False)
        out["ddp_then_fsdp"] = run("ddp-then-fsdp", True)["losses"]
        (root_path / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("method", ["loramoe", "lora"])
def test_two_sharded_ranks_compute_what_the_data_parallel_run_computes(tmp_path, method):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), method), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["fsdp_eval"] == ranks[0]["ddp_eval"] and len(ranks[0]["ddp_eval"]) == 2  # rank 0 logs it
    assert ranks[1]["ddp_eval"] == {} and ranks[1]["fsdp_eval"] == ranks[0]["fsdp_eval"]  # sharded: every rank runs it
    for rank, out in enumerate(ranks):
        assert out["fsdp"] == out["ddp"] and len(out["ddp"]) == 4, rank  # bit for bit
        assert out["weights_equal"] and out["trainable_plain"], rank
        assert out["frozen_local_rows"] and all(local * 2 == whole for local, whole in out["frozen_local_rows"].values()), rank
        assert {int(k): v for k, v in out["fsdp_resumed"].items()} == {3: out["ddp"]["3"], 4: out["ddp"]["4"]}, rank
        assert {int(k): v for k, v in out["ddp_then_fsdp"].items()} == {3: out["ddp"]["3"], 4: out["ddp"]["4"]}, rank
    adapter = tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
    log = [json.loads(line) for line in (tmp_path / "fsdp" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4] and [r["step"] for r in log if "eval_loss" in r] == [2, 4]


def test_fsdp_refuses_full_fine_tuning_and_top_blocks(tmp_path):
    with pytest.raises(MedmoeError, match="--method full trains every weight"):
        finetune(FinetuneConfig(method="full", output=str(tmp_path / "a"), steps=1, fsdp=True, progress=False),
                 tiny_model("llama")[0], CharTokenizer(), train_examples=arithmetic_examples())
    assert not (tmp_path / "a").exists()


def test_accelerate_fsdp_config_turns_it_on_and_names_what_is_not_read(monkeypatch):
    assert not fsdp_requested(False) and fsdp_requested(True)
    assert accelerate_fsdp_note() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "false")
    assert fsdp_requested(False) and accelerate_fsdp_note() is None
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    assert "FSDP_OFFLOAD_PARAMS are not read" in (accelerate_fsdp_note() or "")


def test_accelerate_launch_with_the_fsdp_recipe_equals_the_data_parallel_recipe(tmp_path):
    import subprocess
    import sys

    from safetensors.torch import load_file

    from test_finetune_placement import ROOT
    from test_loramoe_cli import _save_tiny_base

    _save_tiny_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.prompt.split("Question: ")[1].split("\n")[0], "answer": ex.completion.strip()})
                              for ex in arithmetic_examples(16)) + "\n")
    recipes = ROOT / "recipes" / "accelerate"
    cpu_fsdp = tmp_path / "cpu_fsdp.yaml"  # the shipped recipe on two CPU processes
    cpu_fsdp.write_text((recipes / "fsdp.yaml").read_text().replace("use_cpu: false", "use_cpu: true"))
    common = ["-m", "medmoe", "finetune", "--model", str(tmp_path / "base"), "--data", str(data), "--steps", "2",
              "--batch-size", "2", "--experts", "4", "--rank", "2", "--eval-examples", "0", "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    for name, config in (("fsdp", cpu_fsdp), ("ddp", recipes / "cpu_ddp.yaml")):
        launched = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                                   str(config), *common, "--output", str(tmp_path / name)], capture_output=True, text=True,
                                  env=env, timeout=600)
        assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
        assert "2 process(es)" in launched.stdout
        assert ("not read" in launched.stderr) is False  # the shipped recipe asks for nothing medmoe ignores
    sharded, replicated = (load_file(str(tmp_path / n / "adapter" / "adapter_model.safetensors")) for n in ("fsdp", "ddp"))
    assert sharded.keys() == replicated.keys() and all(torch.equal(sharded[k], replicated[k]) for k in sharded)
