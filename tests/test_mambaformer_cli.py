"""`medmoe mambaformer profile`, `mambaformer gate train`, `gate calibrate`, `gate pareto` end to end on a tiny tokenizer and model
(trained / built in-process, saved to a temp dir) and synthetic expert results on PubMedQA ids."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from medmoe.cli import app
from medmoe.data import load_dataset
from medmoe.mambaformer.checkpoint import RouterCheckpoint
from medmoe.mambaformer.queries import query_text
from medmoe.mambaformer.results import ExpertResults
from router_helpers import query_results


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-lm")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [query_text(r) for r in load_dataset("pubmedqa", "train")[:100]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=800, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    tokenizer.save_pretrained(folder)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(folder)
    return folder, tokenizer


def synthetic_results(split, tokenizer, n, seed):
    return query_results(load_dataset("pubmedqa", split)[:n], tokenizer, seed)


def test_train_calibrate_pareto_profile(tiny_model, tmp_path):
    folder, tokenizer = tiny_model
    paths = {}
    for split, n in (("train", 40), ("dev", 30), ("test", 30)):
        paths[split] = tmp_path / f"{split}.jsonl"
        synthetic_results(split, tokenizer, n, seed=len(split)).save_jsonl(paths[split])
    runner = CliRunner()

    result = runner.invoke(app, ["mambaformer", "profile", str(folder), "--lengths", "8,16,32", "--repeats", "2",
                                 "--output", str(tmp_path / "lat.json")])
    assert result.exit_code == 0, result.output
    lat = json.loads((tmp_path / "lat.json").read_text())
    assert min(lat["a"], lat["b"], lat["c"]) >= 0 and lat["lengths"] == [8, 16, 32]

    budget = float(np.median(ExpertResults.load_jsonl(paths["dev"]).transformer.latency_ms)) * 0.8
    ckpt_dir = tmp_path / "router"
    result = runner.invoke(app, ["mambaformer", "gate", "train", "--train-results", str(paths["train"]), "--dev-results",
                                 str(paths["dev"]), "--model", str(folder), "--output", str(ckpt_dir), "--epochs", "5", "--max-length", "256",
                                 "--transformer-latency", str(tmp_path / "lat.json"), "--mamba-latency", str(tmp_path / "lat.json"),
                                 "--latency-budget", str(budget), "--mamba", str(tmp_path / "em")])
    assert result.exit_code == 0, result.output
    ckpt = RouterCheckpoint.load(ckpt_dir)
    assert ckpt.info["calibration"]["metrics"]["p50_ms"] <= budget
    assert ckpt.experts == {"transformer": str(folder), "mamba": str(tmp_path / "em")} and ckpt.gate_ms is not None
    assert ckpt.latency_models["mamba"].lengths == (8, 16, 32)
    assert (ckpt_dir / "lexicon.json").is_file() and len(json.loads((ckpt_dir / "history.json").read_text())) == 5

    result = runner.invoke(app, ["mambaformer", "gate", "calibrate", "--router", str(ckpt_dir), "--dev-results", str(paths["dev"]),
                                 "--latency-budget", str(budget * 1.2)])
    assert result.exit_code == 0, result.output
    assert RouterCheckpoint.load(ckpt_dir).info["calibration"]["budget_ms"] == pytest.approx(budget * 1.2)

    result = runner.invoke(app, ["mambaformer", "gate", "pareto", "--router", str(ckpt_dir), "--results", str(paths["test"]),
                                 "--dev-results", str(paths["dev"]), "--output", str(tmp_path / "pareto")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "pareto" / "pareto.json").read_text())
    names = [p["name"] for p in report["baselines"]]
    assert names[:2] == ["transformer-only", "mamba-only"] and "oracle-accuracy" in names
    assert (tmp_path / "pareto" / "pareto.png").stat().st_size > 1000


def test_unknown_ids_give_a_clear_error(tiny_model, tmp_path):
    folder, tokenizer = tiny_model
    table = synthetic_results("dev", tokenizer, 5, seed=0)
    table.ids[0] = "pubmedqa/0"
    table.save_jsonl(tmp_path / "bad.jsonl")
    result = CliRunner().invoke(app, ["mambaformer", "gate", "train", "--train-results", str(tmp_path / "bad.jsonl"),
                                      "--dev-results", str(tmp_path / "bad.jsonl"), "--model", str(folder),
                                      "--output", str(tmp_path / "r"), "--epochs", "1"])
    assert result.exit_code != 0
    assert "no record" in str(result.exception)
