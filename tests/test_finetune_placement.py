"""`medmoe finetune` on a device and in a precision, on CPU: bfloat16 / float16 autocast with float32 weights,
gradient checkpointing (the same loss and gradients), per-rank RNG and queues in checkpoints (two gloo processes
killed and resumed equal the uninterrupted run, step for step), and `accelerate launch` with two processes equal
to one process at the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import typer
from safetensors.torch import load_file
from typer.testing import CliRunner

from loramoe_tiny_models import CharTokenizer, Killed, arithmetic_examples, kill_at, run_tiny_finetune, tiny_model, train_log
from medmoe.errors import MedmoeError
from medmoe.train.finetune import FinetuneConfig, finetune, prepare_model

ROOT = Path(__file__).resolve().parents[1]
# dropout, token sub-sampling and the queue on: every random stream and per-rank state matters
MOE = {"num_experts": 4, "top_k": 2, "rank": 2, "router_dim": 4, "dropout": 0.1, "contrastive_tokens": 8, "queue_size": 16}


def _cfg(tmp_path, name="run", **kw) -> FinetuneConfig:
    base = dict(method="loramoe", output=str(tmp_path / name), steps=3, batch_size=2, grad_accum=1, lr=5e-3,
                warmup_steps=1, eval_every=3, eval_examples=4, save_every=2, progress=False, loramoe=MOE, seed=2)
    return FinetuneConfig(**{**base, **kw})


def _trained(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- precision ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method, dtype", [("loramoe", "bfloat16"), ("lora", "bfloat16"), ("full", "bfloat16"),
                                           ("loramoe", "float16")])
def test_mixed_precision_trains_float32_weights_under_autocast_and_records_its_dtype(tmp_path, method, dtype):
    reference = run_tiny_finetune(_cfg(tmp_path, "fp32", method=method, dtype="float32"))
    result = run_tiny_finetune(_cfg(tmp_path, "mixed", method=method, dtype=dtype))
    assert result["precision"].dtype == dtype and result["precision"].device == "cpu"
    assert {p.dtype for p in result["model"].parameters()} == {torch.float32}  # master weights, frozen or trained
    first, expected = result["losses"][1], reference["losses"][1]  # the same weights: only the forward's precision differs
    assert first != expected and abs(first - expected) < 0.02
    assert all(torch.isfinite(torch.tensor(v)) for v in [*result["losses"].values(), *result["eval"].values()])
    assert json.loads((tmp_path / "mixed" / "finetune_config.json").read_text())["dtype"] == dtype
    assert (tmp_path / "mixed" / ("model" if method == "full" else "adapter")).is_dir()


def test_float16_checkpoints_its_loss_scale_and_resumes_exactly(tmp_path):
    whole = run_tiny_finetune(_cfg(tmp_path, "whole", dtype="float16", steps=4))
    with pytest.raises(Killed):
        run_tiny_finetune(_cfg(tmp_path, "killed", dtype="float16", steps=4), on_step=kill_at(3))
    manifest = json.loads((tmp_path / "killed" / "checkpoints" / "step-2.json").read_text())
    assert set(manifest["extra"]["grad_scaler"]) >= {"scale", "_growth_tracker"}
    resumed = run_tiny_finetune(_cfg(tmp_path, "killed", dtype="float16", steps=4))
    assert resumed["start_step"] == 2 and resumed["losses"] == {3: whole["losses"][3], 4: whole["losses"][4]}
    untimed = [{k: v for k, v in row.items() if k != "seconds"} for row in train_log(tmp_path / "whole")]
    assert [{k: v for k, v in row.items() if k != "seconds"} for row in train_log(tmp_path / "killed")] == untimed
    # the first step overflowed at the initial scale 2^16 and was skipped; a resume that forgot the scale would skip again
    assert untimed[0]["skipped"] and [row["grad_scale"] for row in untimed] == [32768.0] * 4
    for name, weight in _trained(whole["model"]).items():
        assert torch.equal(weight, _trained(resumed["model"])[name]), name


def test_dtype_is_a_setting_of_the_run_and_device_and_checkpointing_are_not(tmp_path):
    run_tiny_finetune(_cfg(tmp_path, steps=2))
    recorded = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert not {"dtype", "device", "gradient_checkpointing"} & set(recorded)  # a float32 folder reads as older ones do
    with pytest.raises(MedmoeError, match=r"dtype: '\(not set\)' -> 'bfloat16'"):
        run_tiny_finetune(_cfg(tmp_path, steps=2, dtype="bf16"))
    again = run_tiny_finetune(_cfg(tmp_path, steps=2, device="cpu", gradient_checkpointing=True))
    assert again["already_finished"] and again["losses"] == {}


def test_auto_trains_float32_on_cpu_and_each_rank_takes_its_own_gpu(monkeypatch):
    from medmoe.train import precision

    assert precision.training_dtype("auto", "cpu") == "float32" and precision.training_dtype("bf16", "cpu") == "bfloat16"
    assert precision.training_device("cpu", world=2) == "cpu"
    monkeypatch.setattr(precision, "resolve_device", lambda device: "cuda" if device == "auto" else device)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert precision.training_device("auto", world=2) == "cuda:1" and precision.training_device("cuda", world=1) == "cuda"
    with pytest.raises(MedmoeError, match=r"--device cuda:0: under torchrun.*cuda:LOCAL_RANK"):
        precision.training_device("cuda:0", world=2)
    monkeypatch.setenv("LOCAL_RANK", "2")
    with pytest.raises(MedmoeError, match="LOCAL_RANK 2: this machine has 2 CUDA GPU"):
        precision.training_device("cuda", world=2)


@pytest.mark.parametrize("device, backend, gpu", [("cpu", "gloo", None), ("cuda", "nccl", 1)])
def test_the_process_group_backend_follows_the_device(monkeypatch, device, backend, gpu):
    from medmoe.train import distributed

    calls: dict = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.update(backend=backend))
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.update(gpu=index))
    distributed.init_from_env(device)
    assert calls == {"backend": backend, **({"gpu": gpu} if gpu is not None else {})}


# ---- gradient checkpointing -----------------------------------------------------------------------------


def _loss_and_gradients(method: str, checkpointing: bool, steps: int = 2):
    """Two SGD steps of the tiny Llama (dropout, sub-sampling and queue pushes in between): each step's
    loss and gradients, and how often block 0's MLP ran (twice a step when recomputed)."""
    from loramoe_tiny_models import model_inputs
    from medmoe.train.activation_checkpointing import enable_activation_checkpointing
    from medmoe.train.loss import completion_loss, hf_model

    model = prepare_model(tiny_model("llama")[0], FinetuneConfig(method=method, loramoe=MOE, lora_rank=2, lora_dropout=0.1))
    if checkpointing:
        enable_activation_checkpointing(model)
    calls = []
    mlp = hf_model(model).model.layers[0].mlp
    forward = mlp.forward

    def counted(*args, **kwargs):  # not a forward hook: HF's recompute does not fire those
        calls.append(1)
        return forward(*args, **kwargs)
    mlp.forward = counted
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    torch.manual_seed(4)
    out = []
    for step in range(steps):
        batch = model_inputs("causal", batch=2, length=12, seed=step + 1)
        loss, _ = completion_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        loss.backward()
        out.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        optimizer.step()
        optimizer.zero_grad()
    queues = {n: b.clone() for n, b in model.named_buffers() if ".queue." in n}
    return out, queues, len(calls)


@pytest.mark.parametrize("method", ["loramoe", "lora", "full"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(method):
    plain, plain_queues, plain_calls = _loss_and_gradients(method, checkpointing=False)
    recomputed, queues, calls = _loss_and_gradients(method, checkpointing=True)
    assert (plain_calls, calls) == (2, 4)  # block 0 ran again in each backward
    for (loss, grads), (loss_ckpt, grads_ckpt) in zip(plain, recomputed):
        assert abs(loss - loss_ckpt) <= 1e-5
        assert grads.keys() == grads_ckpt.keys() and grads
        for name, grad in grads.items():
            assert torch.allclose(grad, grads_ckpt[name], atol=1e-5, rtol=0), name
    assert queues.keys() == plain_queues.keys()
    for name, queue in plain_queues.items():  # each batch pushed once, not again by the recompute
        assert torch.equal(queue, queues[name]), name


def test_a_checkpointed_run_trains_the_same_weights(tmp_path):
    plain = run_tiny_finetune(_cfg(tmp_path, "plain"))
    recomputed = run_tiny_finetune(_cfg(tmp_path, "recomputed", gradient_checkpointing=True))
    assert plain["losses"] == pytest.approx(recomputed["losses"], abs=1e-5)
    for name, weight in _trained(plain["model"]).items():
        assert torch.allclose(weight, _trained(recomputed["model"])[name], atol=1e-5, rtol=0), name


# ---- per-rank state: two gloo processes, killed and resumed -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, root: str) -> None:
    """Per rank: an uninterrupted run, a run killed after step 3 (checkpoint at 2) then resumed, and the
    same kill resumed from a checkpoint stripped of its per-rank state (as written before it existed)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    root_path = Path(root)

    def run(name: str, on_step=None) -> dict:
        cfg = _cfg(root_path, name, steps=4, eval_examples=0)
        return finetune(cfg, tiny_model("llama")[0], CharTokenizer(), train_examples=arithmetic_examples(),
                        rank=rank, world=world, on_step=on_step)

    def killed(name: str) -> dict:
        steps: dict = {}
        try:
            run(name, on_step=lambda done, loss: (steps.update({done: loss}), kill_at(3)(done, loss)))
        except Killed:
            pass
        return steps

    try:
        whole = run("whole")
        out: dict = {"whole": whole["losses"], "before_kill": killed("resumed")}
        resumed = run("resumed")
        out["resumed"], weights = resumed["losses"], _trained(resumed["model"])
        out["weights_equal"] = all(torch.equal(w, weights[n]) for n, w in _trained(whole["model"]).items())
        killed("legacy")
        if rank == 0:  # the manifest as medmoe wrote it before per-rank state
            manifest = root_path / "legacy" / "checkpoints" / "step-2.json"
            data = json.loads(manifest.read_text())
            data.pop("ranks")
            manifest.write_text(json.dumps(data))
        dist.barrier()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out["legacy"] = run("legacy")["losses"]
        out["warnings"] = [str(w.message) for w in caught if "per-rank" in str(w.message)]
        (root_path / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.destroy_process_group()


def test_two_ranks_killed_and_resumed_equal_the_uninterrupted_run(tmp_path):
    mp.spawn(_rank_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for rank, out in enumerate(ranks):
        whole = {int(k): v for k, v in out["whole"].items()}
        assert {int(k): v for k, v in out["before_kill"].items()} == {s: whole[s] for s in (1, 2, 3)}, rank
        assert {int(k): v for k, v in out["resumed"].items()} == {3: whole[3], 4: whole[4]}, rank  # bit for bit
        assert out["weights_equal"], rank
    assert ranks[0]["whole"] != ranks[1]["whole"]  # the ranks saw different batches
    checkpoints = tmp_path / "resumed" / "checkpoints"
    manifest = json.loads((checkpoints / "step-4.json").read_text())
    assert [entry["rank"] for entry in manifest["ranks"]] == [1]
    assert sorted(p.name for p in checkpoints.iterdir()) == [f"step-{n}.{kind}" for n in (2, 4)
                                                             for kind in ("json", "rank-1.safetensors", "safetensors")]

    # without its own state (an older checkpoint), rank 1 resumes with rank 0's streams and queues, as before, and says so
    # (rank 0's step 3 is still its own; from step 4 on the all-reduced update carries rank 1's difference to both)
    legacy = [{int(k): v for k, v in out["legacy"].items()} for out in ranks]
    assert legacy[0][3] == ranks[0]["resumed"]["3"] and legacy[1][3] != ranks[1]["resumed"]["3"]
    assert ranks[0]["warnings"] == [] and len(ranks[1]["warnings"]) == 1 and "rank 0's RNG" in ranks[1]["warnings"][0]


# ---- accelerate launch ----------------------------------------------------------------------------------


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def test_accelerate_launch_with_two_processes_equals_one_process(tmp_path):
    from medmoe.cli.finetune import register
    from test_loramoe_cli import _save_tiny_base

    _save_tiny_base(tmp_path / "base")
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.prompt.split("Question: ")[1].split("\n")[0], "answer": ex.completion.strip()})
                              for ex in arithmetic_examples(16)) + "\n")
    # queue off, every token an anchor: the aux losses are per rank (docs/loramoe.md, "Data parallelism")
    common = ["--model", str(tmp_path / "base"), "--data", str(data), "--steps", "3", "--batch-size", "2", "--lr", "0.01",
              "--experts", "4", "--rank", "2", "--eval-examples", "0", "--queue-size", "0", "--contrastive-tokens", "0",
              "--device", "cpu", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    launched = subprocess.run([sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
                               str(ROOT / "recipes" / "accelerate" / "cpu_ddp.yaml"), "-m", "medmoe", "finetune", *common,
                               "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600)
    assert launched.returncode == 0, launched.stdout[-3000:] + launched.stderr[-3000:]
    assert "2 process(es)" in launched.stdout and "started ONE process" not in launched.stderr

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    single = CliRunner().invoke(app, ["finetune", *common, "--grad-accum", "2", "--output", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    two, one = _adapter(tmp_path / "two"), _adapter(tmp_path / "one")
    assert two.keys() == one.keys() and len(one) > 0
    for name, weight in one.items():
        assert torch.allclose(two[name], weight, atol=1e-6, rtol=0), name
    assert sum(float(w.abs().sum()) for n, w in one.items() if "lora_B" in n) > 0  # trained (B starts at zero)
