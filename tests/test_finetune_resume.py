"""Resume never mixes settings: a changed setting is refused (old -> new), a finished run is not
repeated, and the training log holds each step once however often a run is resumed."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from loramoe_tiny_models import Killed, arithmetic_examples, kill_at, run_tiny_finetune, train_log
from medmoe.errors import MedmoeError
from medmoe.train.finetune import FinetuneConfig

MOE = {"num_experts": 4, "top_k": 2, "rank": 2, "router_dim": 4, "dropout": 0.1, "contrastive_tokens": 8, "queue_size": 16}



def _cfg(tmp_path, name="run", **kw):
    base = dict(method="loramoe", output=str(tmp_path / name), steps=4, batch_size=2, grad_accum=1, lr=5e-3,
                warmup_steps=1, eval_every=2, eval_examples=4, save_every=2, progress=False, loramoe=MOE, seed=2)
    return FinetuneConfig(**{**base, **kw})





def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run, and a copy of its folder's files (to check that nothing is touched)."""
    tmp = tmp_path_factory.mktemp("finished")
    result = run_tiny_finetune(_cfg(tmp))
    return tmp, result, _snapshot(tmp / "run")


def _fresh_copy(finished, tmp_path):
    import shutil

    src, _, _ = finished
    shutil.copytree(src / "run", tmp_path / "run")
    return tmp_path / "run"


def test_rerunning_a_finished_run_trains_nothing_and_changes_nothing(tmp_path, finished):
    folder = _fresh_copy(finished, tmp_path)
    before = _snapshot(folder)
    steps_run = []
    result = run_tiny_finetune(_cfg(tmp_path), on_step=lambda step, loss: steps_run.append(step))
    assert steps_run == [] and result["losses"] == {} and result["already_finished"] and result["start_step"] == 4
    assert _snapshot(folder) == before
    assert [r["step"] for r in train_log(folder)] == [1, 2, 3, 4]


@pytest.mark.parametrize("change, message", [
    ({"lr": 1e-3}, "lr: 0.005 -> 0.001"),
    ({"steps": 6}, "steps: 4 -> 6"),
    ({"loramoe": {**MOE, "num_experts": 2}}, "loramoe.num_experts: 4 -> 2"),
    ({"method": "lora"}, "method: 'loramoe' -> 'lora'"),
])
def test_a_changed_setting_is_refused_and_the_folder_is_left_as_it_was(tmp_path, finished, change, message):
    folder = _fresh_copy(finished, tmp_path)
    before = _snapshot(folder)
    with pytest.raises(MedmoeError, match="finetune_config.json: this folder holds a run with other settings") as caught:
        run_tiny_finetune(_cfg(tmp_path, **change))
    assert message in str(caught.value) and "new --output" in str(caught.value)
    assert _snapshot(folder) == before  # config, log, checkpoints and adapter untouched


def test_changed_training_data_is_refused(tmp_path, finished):
    _fresh_copy(finished, tmp_path)
    with pytest.raises(MedmoeError, match=r"examples\.count: 16 -> 15; examples\.sha256"):
        run_tiny_finetune(_cfg(tmp_path), examples=arithmetic_examples(15))


def test_an_interrupted_run_resumed_logs_each_step_once_and_matches_an_uninterrupted_one(tmp_path, finished):
    _, straight, _ = finished
    with pytest.raises(Killed):
        run_tiny_finetune(_cfg(tmp_path), on_step=kill_at(3))  # checkpoint at 2, step 3 logged, then killed
    assert [r["step"] for r in train_log(tmp_path / "run")] == [1, 2, 3]
    # save and eval frequency may change on resume: neither changes what is trained
    resumed = run_tiny_finetune(_cfg(tmp_path, save_every=1, eval_every=4, progress=True))
    assert resumed["start_step"] == 2 and sorted(resumed["losses"]) == [3, 4]
    log = train_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    straight_log = train_log(finished[0] / "run")
    assert [(r["loss"], r["lr"]) for r in log] == [(r["loss"], r["lr"]) for r in straight_log]
    assert resumed["eval"][4] == straight["eval"][4]


def test_a_kill_after_the_last_checkpoint_only_writes_the_result(tmp_path):
    with pytest.raises(Killed):
        run_tiny_finetune(_cfg(tmp_path), on_step=kill_at(4))  # the step-4 checkpoint is written, the adapter is not
    assert not (tmp_path / "run" / "adapter").exists()
    steps_run = []
    result = run_tiny_finetune(_cfg(tmp_path), on_step=lambda step, loss: steps_run.append(step))
    assert steps_run == [] and not result["already_finished"]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    assert [r["step"] for r in train_log(tmp_path / "run")] == [1, 2, 3, 4]


def test_no_resume_never_deletes_a_previous_run(tmp_path, finished):
    folder = _fresh_copy(finished, tmp_path)
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    with pytest.raises(MedmoeError, match="does not delete it"):
        run_tiny_finetune(_cfg(tmp_path, resume=False, lr=1e-3, steps=3, save_every=5))
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == before


# ---- the command line: `medmoe finetune` rerun into its own folder -------------------------------

app = typer.Typer()
app.callback()(lambda: None)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    from medmoe.cli.finetune import register
    from test_loramoe_cli import _save_tiny_base

    register(app)
    tmp = tmp_path_factory.mktemp("cli")
    _save_tiny_base(tmp / "base")
    data = tmp / "train.jsonl"
    data.write_text("\n".join(json.dumps({"question": ex.prompt.split("Question: ")[1].split("\n")[0], "answer": ex.completion.strip()})
                              for ex in arithmetic_examples(16)) + "\n")
    args = ["finetune", "--model", str(tmp / "base"), "--data", str(data), "--output", str(tmp / "run"), "--steps", "2",
            "--batch-size", "2", "--lr", "0.01", "--experts", "4", "--rank", "2", "--save-every", "1", "--eval-examples", "0"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    return tmp / "run", args


def test_cli_rerun_of_a_finished_run_says_so_and_exits_0(cli):
    folder, args = cli
    before = _snapshot(folder)
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "already finished at step 2" in result.output
    assert _snapshot(folder) == before


@pytest.mark.parametrize("option, value, message", [
    ("--lr", "0.001", "lr: 0.01 -> 0.001"),
    ("--experts", "2", "loramoe.num_experts: 4 -> 2"),
])
def test_cli_rerun_with_another_setting_is_refused_without_a_traceback(cli, option, value, message):
    folder, args = cli
    before = _snapshot(folder)
    changed = list(args)
    changed[changed.index(option) + 1] = value
    result = CliRunner().invoke(app, changed)
    assert result.exit_code != 0
    assert isinstance(result.exception, MedmoeError), result.exception  # one clear line from `medmoe`, not a traceback
    assert message in str(result.exception) and "finetune_config.json" in str(result.exception)
    assert _snapshot(folder) == before
