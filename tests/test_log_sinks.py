"""Training logs besides train_log.jsonl (medmoe.train.log_sinks): TensorBoard's scalars equal the JSONL
log's (read back with TensorBoard's own EventAccumulator), a resume shows each step once there too,
wandb gets the same numbers (a stand-in module records the calls), and a sink whose package is
missing is one clear error before anything is loaded."""

from __future__ import annotations

import json
import sys
import types

import pytest

from loramoe_tiny_models import Killed, kill_at, run_tiny_finetune, tiny_model, train_log
from medmoe.errors import MedmoeError
from medmoe.train.finetune import FinetuneConfig
from medmoe.train.log_sinks import WANDB_ID_FILE, MetricSinks, parse_report_to, scalars

MOE = {"num_experts": 4, "top_k": 2, "rank": 2, "router_dim": 4, "dropout": 0.1, "contrastive_tokens": 8, "queue_size": 16}



def _cfg(tmp_path, **kw):
    base = dict(method="loramoe", output=str(tmp_path / "run"), steps=4, batch_size=2, lr=5e-3, warmup_steps=1,
                eval_every=2, eval_examples=4, save_every=2, progress=False, loramoe=MOE, seed=2)
    return FinetuneConfig(**{**base, **kw})





def _tensorboard_scalars(folder):
    """{tag: [(step, value)]} as TensorBoard reads the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _expected(log):
    """{tag: [(step, value)]} from the JSONL records."""
    out: dict[str, list] = {}
    for record in log:
        for tag, value in scalars(record).items():
            out.setdefault(tag, []).append((record["step"], value))
    return out


def _assert_same(tb, expected):
    assert sorted(tb) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in tb[tag]] == [s for s, _ in points], tag
        assert [v for _, v in tb[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag  # float32 events


def test_tensorboard_scalars_equal_the_jsonl_log(tmp_path):
    pytest.importorskip("tensorboard")
    run_tiny_finetune(_cfg(tmp_path, report_to="tensorboard"))
    log, tb = train_log(tmp_path / "run"), _tensorboard_scalars(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert [v for _, v in tb["train/loss"]] == pytest.approx([r["loss"] for r in log], rel=1e-6)
    assert tb["eval/loss"] == [(2, pytest.approx(log[1]["eval_loss"], rel=1e-6)), (4, pytest.approx(log[3]["eval_loss"], rel=1e-6))]
    assert any(tag.startswith("train/aux/") for tag in tb)  # the LoRA-MoE auxiliary terms
    _assert_same(tb, _expected(log))
    settings = json.loads((tmp_path / "run" / "finetune_config.json").read_text())
    assert "report_to" not in settings  # not a training setting


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    with pytest.raises(Killed):
        run_tiny_finetune(_cfg(tmp_path, report_to=["tensorboard"]), on_step=kill_at(3))  # checkpoint at 2, step 3 logged
    assert [s for s, _ in _tensorboard_scalars(tmp_path / "run")["train/loss"]] == [1, 2, 3]
    run_tiny_finetune(_cfg(tmp_path, report_to="jsonl, tensorboard"))  # another spelling of the sinks resumes the same run
    log = train_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    _assert_same(_tensorboard_scalars(tmp_path / "run"), _expected(log))


class FakeWandb(types.ModuleType):
    """A stand-in `wandb` module: records init's arguments, and each run's log and finish calls."""

    def __init__(self):
        super().__init__("wandb")
        self.runs = []

    def init(self, **kwargs):
        run = types.SimpleNamespace(kwargs=kwargs, logged=[], finished=False)
        run.log = lambda values, step: run.logged.append((step, values))
        run.finish = lambda: setattr(run, "finished", True)
        self.runs.append(run)
        return run


def test_wandb_gets_the_jsonl_numbers_and_a_resume_continues_its_run(tmp_path, monkeypatch):
    tiny_model("llama")  # transformers and accelerate imported first: they look for a real wandb when imported
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_PROJECT", "medmoe-test")
    with pytest.raises(Killed):
        run_tiny_finetune(_cfg(tmp_path, report_to="wandb"), on_step=kill_at(3))
    run_tiny_finetune(_cfg(tmp_path, report_to="wandb"))
    first, second = fake.runs
    run_id = (tmp_path / "run" / WANDB_ID_FILE).read_text().strip()
    for run in (first, second):
        assert run.kwargs["id"] == run_id and run.kwargs["resume"] == "allow" and run.kwargs["project"] == "medmoe-test"
        assert "report_to" not in run.kwargs["config"] and run.kwargs["config"]["steps"] == 4
    assert not first.finished and second.finished  # the killed run never reached the end
    log = {r["step"]: r for r in train_log(tmp_path / "run")}
    assert [s for s, _ in first.logged] == [1, 2, 3] and [s for s, _ in second.logged] == [3, 4]
    for step, values in second.logged:
        assert values == scalars(log[step])


def test_report_to_names_and_missing_packages(monkeypatch):
    assert parse_report_to(None) == ["jsonl"]
    assert parse_report_to("none") == ["jsonl"]
    monkeypatch.setenv("MEDMOE_REPORT_TO", "none,jsonl")
    assert FinetuneConfig().report_to == ["jsonl"]
    with pytest.raises(MedmoeError, match="unknown sink 'mlflow'"):
        parse_report_to("jsonl,mlflow")
    for sink in ("tensorboard", "wandb"):
        monkeypatch.setitem(sys.modules, sink, None)  # as if not installed: find_spec gives None
        with pytest.raises(MedmoeError, match=f"report_to {sink}: the `{sink}` package is not installed"):
            FinetuneConfig(report_to=sink)  # before any model is loaded
        monkeypatch.setenv("MEDMOE_REPORT_TO", sink)
        with pytest.raises(MedmoeError, match="is not installed"):
            FinetuneConfig()


def test_jsonl_only_writes_the_log_as_before(tmp_path):
    with MetricSinks(tmp_path / "train_log.jsonl") as sinks:
        sinks.write({"step": 1, "loss": 0.5, "lr": 1e-3, "epoch": 0.1, "aux": {"balance": 0.25}})
    assert (tmp_path / "train_log.jsonl").read_text() == '{"step": 1, "loss": 0.5, "lr": 0.001, "epoch": 0.1, "aux": {"balance": 0.25}}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train_log.jsonl"]
    assert scalars({"step": 1, "loss": 0.5, "eval_loss": 0.7, "aux": {"balance": 0.25}, "note": "x"}) == {
        "train/loss": 0.5, "eval/loss": 0.7, "train/aux/balance": 0.25}
