"""Fine-tuning loop: exact resume after a kill, atomic checkpoints, the three methods."""

from __future__ import annotations

import json

import pytest
import torch

from loramoe_tiny_models import CharTokenizer, arithmetic_examples, tiny_model
from medmoe.train import checkpoint as ckpt_mod
from medmoe.train.finetune import FinetuneConfig, finetune

MOE = {"num_experts": 4, "top_k": 2, "rank": 4, "router_dim": 8, "dropout": 0.1,
       "contrastive_tokens": 16, "queue_size": 64}


class Killed(Exception):
    pass


def _cfg(tmp_path, name, **kw):
    base = dict(method="loramoe", output=str(tmp_path / name), steps=6, batch_size=3, grad_accum=2, lr=5e-3,
                warmup_steps=2, eval_every=3, eval_examples=6, save_every=2, progress=False, loramoe=MOE, seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def _run(cfg, on_step=None):
    model, _ = tiny_model("llama")
    return finetune(cfg, model, CharTokenizer(), train_examples=arithmetic_examples(), on_step=on_step)


@pytest.mark.parametrize("method", ["loramoe", "lora"])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(tmp_path, method):
    straight = _run(_cfg(tmp_path, "straight", method=method))

    def kill_at_5(step, loss):
        if step == 5:
            raise Killed()

    with pytest.raises(Killed):
        _run(_cfg(tmp_path, "resumed", method=method), on_step=kill_at_5)
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path / "resumed" / "checkpoints")] == ["step-2.json", "step-4.json"]
    resumed = _run(_cfg(tmp_path, "resumed", method=method))
    assert resumed["start_step"] == 4 and sorted(resumed["losses"]) == [5, 6]
    assert resumed["losses"][6] == straight["losses"][6]
    assert resumed["eval"][6] == straight["eval"][6]
    trained = {n: p for n, p in straight["model"].named_parameters() if p.requires_grad}
    for name, p in resumed["model"].named_parameters():
        if p.requires_grad:
            assert torch.equal(p, trained[name]), name


def test_training_reduces_loss_and_writes_adapter_and_log(tmp_path):
    cfg = _cfg(tmp_path, "run", steps=12, save_every=100)
    result = _run(cfg)
    assert result["losses"][12] < result["losses"][1]
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 13))
    assert set(log[0]["aux"]) == {"balance", "z", "contrastive"}
    assert "eval_loss" in log[2] and "eval_loss" not in log[0]


def test_full_finetuning_trains_every_parameter(tmp_path):
    result = _run(_cfg(tmp_path, "full", method="full", steps=2, save_every=100))
    assert all(p.requires_grad for p in result["model"].parameters())
    assert (tmp_path / "full" / "model" / "config.json").is_file()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 3)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ckpt_mod.save_checkpoint(tmp_path, 1, model, opt, sched)

    def broken_save(tensors, path):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod, "save_file", broken_save)
    with pytest.raises(OSError):
        ckpt_mod.save_checkpoint(tmp_path, 2, model, opt, sched)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1.json", "step-1.safetensors"]  # no torn step-2, no temp file
    assert [p.name for p in ckpt_mod.list_checkpoints(tmp_path)] == ["step-1.json"]


def test_bundled_dataset_records_become_eval_prompt_plus_gold_continuation():
    from medmoe.data import load_dataset
    from medmoe.eval.prompts import build_prompt
    from medmoe.train.data import load_examples

    tokenizer = CharTokenizer()  # no chat template: plain "Answer:" prompts
    examples = load_examples("dental", tokenizer)
    records = load_dataset("dental", split="train")
    assert len(examples) == len(records) > 100
    prompt = build_prompt(records[0], tokenizer)
    assert examples[0].prompt == prompt.context
    assert examples[0].completion == f" {records[0].answer}"


def test_with_explanation_appends_the_records_explanation():
    from medmoe.data import load_dataset
    from medmoe.train.data import load_examples

    tokenizer = CharTokenizer()
    records = load_dataset("dental", split="train")
    plain = load_examples("dental", tokenizer)
    explained = load_examples("dental", tokenizer, with_explanation=True)
    i = next(k for k, r in enumerate(records) if r.explanation)
    assert explained[i].prompt == plain[i].prompt
    assert explained[i].completion == f" {records[i].answer}\n{records[i].explanation.strip()}"
    j = next((k for k, r in enumerate(records) if not r.explanation), None)
    if j is not None:  # a record without one keeps the plain completion
        assert explained[j].completion == plain[j].completion


def test_long_completion_keeps_half_the_window_for_the_prompt():
    from medmoe.train.data import Example, tokenize_examples

    tokenizer = CharTokenizer()
    long_prompt, long_completion = "p" * 50, "c" * 100
    (both_long,) = tokenize_examples([Example(long_prompt, long_completion)], tokenizer, max_length=40)
    assert len(both_long["input_ids"]) == 40
    assert both_long["labels"].count(-100) == 20  # the prompt's last 20 tokens, then 20 of the completion
    (short_prompt,) = tokenize_examples([Example("pp", long_completion)], tokenizer, max_length=40)
    assert short_prompt["labels"][:2] == [-100, -100] and len(short_prompt["input_ids"]) == 40
    (fits,) = tokenize_examples([Example("pp", "cc")], tokenizer, max_length=40)
    assert fits["labels"] == [-100, -100, *tokenizer("cc")["input_ids"], tokenizer.eos_token_id]


def test_prompt_completion_jsonl_and_bad_line(tmp_path):
    from medmoe.errors import DataError
    from medmoe.train.data import load_examples

    good = tmp_path / "pc.jsonl"
    good.write_text('{"prompt": "Q: 1+1\\nA:", "completion": " 2"}\n{"text": "free text"}\n')
    examples = load_examples(str(good))
    assert [(e.prompt, e.completion) for e in examples] == [("Q: 1+1\nA:", " 2"), ("", "free text")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "completion": "y"}\n{oops\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        load_examples(str(bad))
