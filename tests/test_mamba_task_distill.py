"""Task-level distillation (train/task_distill/, mamba/align.py) on a tiny random Llama teacher and
hybrids built from it by the transfer code: the layer mapping, the losses' zeros, the teacher cache
(reused, refused, resumed), learning, exact resume and the output folder."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.mamba.align import AttentionCapture, alignment_error
from medmoe.mamba.transfer import build_hybrid, save_hybrid
from medmoe.train.task_distill import (
    TaskData,
    TaskDistillConfig,
    TeacherCache,
    evaluate,
    lm_teacher,
    prompt_loss,
    run_task_distill,
    task_records,
    topk_token_kl,
)
from tiny_lm import tiny_tokenizer

torch.set_num_threads(1)  # tiny matrices: threads only spin on a shared machine

QUESTIONS = [("is aspirin best for the patient ?", "the patient has fever and cough ."),
             ("is rest best ?", "the patient has pain ."),
             ("is heparin best with pain ?", "fever and pain ."),
             ("is surgery best ?", "the patient has cough and fever ."),
             ("is aspirin best with cough ?", "the patient has fever ."),
             ("is rest best for the patient ?", "pain and cough .")]
RECORDS = [Record(id=f"t/{i}", question=q, context=c, options=("yes", "no", "maybe"), answer="ABC"[i % 3])
           for i, (q, c) in enumerate(QUESTIONS)]
RECORDS.append(Record(id="t/four", question="which drug is best ?", options=("aspirin", "heparin", "rest", "surgery"),
                      answer="B"))
TEXT = " ".join(" ".join([r.question, r.context or "", *r.options]) for r in RECORDS)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_text=TEXT)


@pytest.fixture(scope="module")
def teacher(tokenizer):
    """4 layers; the LM head scaled so the teacher's answers are decided (a random one is ~uniform)."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


def data(train=RECORDS[:6], heldout=RECORDS[6:]):
    return TaskData("toy", list(train), list(heldout), skip_first=0, pool_records=len(train) + len(heldout))


def student_folder(teacher, tokenizer, folder, layers=(0, 1, 3), attention=(1,)):
    student, spec = build_hybrid(teacher, layers=list(layers), attention_layers=list(attention), teacher_name="tiny")
    with torch.no_grad():  # fresh mixers pass x straight through: make the student differ from the teacher
        for name, p in student.named_parameters():
            if ".D" in name or "conv1d" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    save_hybrid(student, spec, folder, tokenizer)
    return folder


def cfg(**kw):
    base = dict(lr=1e-2, batch_size=2, max_steps=6, eval_every=3, save_every=2, cache_dtype="float32", warmup_steps=1)
    return TaskDistillConfig(**{**base, **kw})


# ---- layer mapping and the alignment term ----------------------------------------------------------

def test_layer_mapping_and_captured_attention_inputs(teacher, tokenizer):
    student, spec = build_hybrid(teacher, layers=[0, 1, 3], attention_layers=[1])
    assert spec.mixer_layers() == [(0, 0), (2, 3)]  # student position -> teacher layer, attention layers left out
    ids = torch.tensor([tokenizer("the patient has fever and cough .")["input_ids"]])
    teacher(input_ids=ids, output_hidden_states=True, use_cache=False)  # transformers adds hooks of its own
    hooks = dict(teacher.model.layers[0].self_attn._forward_hooks)
    with AttentionCapture(teacher, [0, 3], final_norm=True) as capture:
        out = teacher(input_ids=ids, output_hidden_states=True, use_cache=False)
    for j in (0, 3):  # hidden_states[j] enters layer j; its attention reads it after the layer's input norm
        torch.testing.assert_close(capture.inputs[j], teacher.model.layers[j].input_layernorm(out.hidden_states[j]))
        assert capture.outputs[j].shape == capture.inputs[j].shape
    torch.testing.assert_close(capture.final, out.hidden_states[-1])  # the last hidden state is after the final norm
    assert dict(teacher.model.layers[0].self_attn._forward_hooks) == hooks  # ours removed on exit


def test_the_shallow_smollm2_mapping():
    from medmoe.mamba.hybrid import HybridSpec
    from medmoe.mamba.transfer import evenly_spaced

    spec = HybridSpec("smollm2-135m", evenly_spaced(30, 10))
    assert spec.mixer_layers() == list(enumerate([0, 3, 6, 10, 13, 16, 19, 23, 26, 29]))
    assert HybridSpec("t", [0, 14, 29], [29]).mixer_layers() == [(0, 0), (1, 14)]


def test_alignment_is_zero_for_the_teachers_attention_and_positive_for_a_mixer(teacher, tokenizer):
    student, spec = build_hybrid(teacher, layers=[0, 1, 3], attention_layers=[1])
    ids = torch.tensor([tokenizer("is aspirin best for the patient ? the patient has fever")["input_ids"]])
    with AttentionCapture(teacher, [0, 1, 3]) as capture, torch.no_grad():
        teacher(input_ids=ids, use_cache=False)
    with torch.no_grad():
        assert alignment_error(student, 1, capture.inputs[1], capture.outputs[1]).item() == 0.0  # kept attention
        assert alignment_error(student, 0, capture.inputs[0], capture.outputs[0]).item() > 1e-3  # Mamba mixer
        assert alignment_error(student, 2, capture.inputs[3], capture.outputs[3]).item() > 1e-3


def test_topk_token_kl_is_the_kl_of_the_binned_distributions():
    torch.manual_seed(0)
    student, teacher = torch.randn(5, 11), torch.randn(5, 11)
    logp = teacher.log_softmax(-1)
    values, index = logp.topk(11, dim=-1)  # k = V: the exact full-vocabulary KL
    full = (logp.exp() * (logp - student.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(topk_token_kl(student, index, values), full)
    values, index = logp.topk(3, dim=-1)
    assert 0 <= topk_token_kl(student, index, values) <= full + 1e-6
    assert topk_token_kl(teacher, index, values).abs() < 1e-6


# ---- the losses on a copy of the teacher ----------------------------------------------------------------

def test_a_student_equal_to_the_teacher_has_zero_loss_and_full_agreement(teacher, tokenizer, tmp_path):
    copy, spec = build_hybrid(teacher, attention_layers=[0, 1, 2, 3])  # every layer kept with its attention
    save_hybrid(copy, spec, tmp_path / "copy", tokenizer)
    run = run_task_distill(lm_teacher(teacher, tokenizer, "tiny"), tmp_path / "copy", data(), tmp_path / "run",
                           cfg(max_steps=0, gamma=1.0, top_k=8))
    cache = run["cache"]
    first = run["evals"][0]
    assert first["agreement"] == 1.0 and first["answer_kl"] < 1e-10
    loss, terms = prompt_loss(run["student"], spec, cache.entry(0), cfg(gamma=1.0, top_k=8), align_only=False)
    assert terms["answer_kl"] < 1e-6 and terms["token_kl"] < 1e-6 and "align" not in terms  # no replaced layer


# ---- the teacher cache ------------------------------------------------------------------------------------

def counting(teacher, tokenizer):
    t = lm_teacher(teacher, tokenizer, "tiny")
    calls = {"n": 0}
    inner = t.scorer

    def scorer(record, prompt):
        calls["n"] += 1
        return inner(record, prompt)

    t.scorer = scorer
    return t, calls


def test_the_cache_is_reused_resumed_and_refused_with_other_settings(teacher, tokenizer, tmp_path):
    t, calls = counting(teacher, tokenizer)
    records = RECORDS * 2  # 14 records: two chunk files
    first = TeacherCache.build_or_open(tmp_path / "c", t, records, active=12, layers=[0, 3], top_k=4, cache_dtype="float32")
    assert calls["n"] == 14 and len(first) == 14
    e = first.entry(0)
    assert set(e) == {"ids", "options", "logp", "in.0", "out.0", "in.3", "out.3", "topk_idx", "topk_logp"}
    assert e["in.0"].shape == (len(e["ids"]), 32) and e["topk_idx"].shape == (len(e["ids"]), 4)
    assert set(first.entry(13)) == {"ids", "options", "logp"}  # a held-out record: its answer only
    assert torch.allclose(e["logp"].exp().sum(), torch.tensor(1.0))

    TeacherCache.build_or_open(tmp_path / "c", t, records, active=12, layers=[0, 3], top_k=4, cache_dtype="float32")
    assert calls["n"] == 14  # reused: the teacher did not run again

    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())  # a build killed after the first chunk
    (tmp_path / "c" / manifest["files"][1]["name"]).unlink()
    manifest["files"], manifest["complete"] = manifest["files"][:1], False
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    again = TeacherCache.build_or_open(tmp_path / "c", t, records, active=12, layers=[0, 3], top_k=4, cache_dtype="float32")
    assert calls["n"] == 14 + 6 and again.manifest["complete"]
    torch.testing.assert_close(again.entry(13)["logp"], first.entry(13)["logp"])

    with pytest.raises(MedmoeError, match=r"layers: \[0, 3\] -> \[0\]"):
        TeacherCache.build_or_open(tmp_path / "c", t, records, active=12, layers=[0], top_k=4, cache_dtype="float32")
    with pytest.raises(MedmoeError, match="records_sha256"):
        TeacherCache.build_or_open(tmp_path / "c", t, records[::-1], active=12, layers=[0, 3], top_k=4, cache_dtype="float32")
    other = lm_teacher(LlamaForCausalLM(teacher.config).eval(), tokenizer, "tiny")
    with pytest.raises(MedmoeError, match="teacher_weights_sha256"):
        TeacherCache.build_or_open(tmp_path / "c", other, records, active=12, layers=[0, 3], top_k=4, cache_dtype="float32")


# ---- training ------------------------------------------------------------------------------------------

def test_training_moves_the_student_toward_the_teacher(teacher, tokenizer, tmp_path):
    folder = student_folder(teacher, tokenizer, tmp_path / "student")
    t = lm_teacher(teacher, tokenizer, "tiny")
    run = run_task_distill(t, folder, data(), tmp_path / "run", cfg(max_steps=12, lr=3e-3, delta=0.5))
    cache, student = run["cache"], run["student"]
    from medmoe.train.task_distill import load_student_source

    before, _, _ = load_student_source(folder)
    train = list(range(6))
    start, end = evaluate(before, cache, train, RECORDS[:6]), evaluate(student, cache, train, RECORDS[:6])
    assert end["answer_kl"] < 0.5 * start["answer_kl"]
    assert end["agreement"] >= start["agreement"]
    aligns = [h["align"] for h in run["history"]]
    assert aligns[-1] < aligns[0]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "eval"] == [0, 3, 6, 9, 12]
    assert {"loss", "answer_kl", "align", "minutes", "phase"} <= set(log[1])


def test_align_only_phase_then_the_task(teacher, tokenizer, tmp_path):
    folder = student_folder(teacher, tokenizer, tmp_path / "student")
    run = run_task_distill(lm_teacher(teacher, tokenizer, "tiny"), folder, data(), tmp_path / "run",
                           cfg(max_steps=4, align_only_steps=2))
    phases = [h["phase"] for h in run["history"]]
    assert phases == ["align", "align", "task", "task"]
    assert "answer_kl" not in run["history"][0] and "answer_kl" in run["history"][2]
    state = json.loads((tmp_path / "run" / "latest.json").read_text())
    trainer = json.loads((tmp_path / "run" / f"ckpt-{state['step']:06d}" / "trainer_state.json").read_text())
    assert trainer["align_until"] == 2
    assert [e["step"] for e in trainer["evals"]] == [0, 3, 4]  # the final evaluation, after the save at step 4


def test_an_interrupted_run_resumes_exactly(teacher, tokenizer, tmp_path):
    folder = student_folder(teacher, tokenizer, tmp_path / "student")
    t = lm_teacher(teacher, tokenizer, "tiny")
    straight = run_task_distill(t, folder, data(), tmp_path / "straight", cfg(gamma=0.5, top_k=4))
    first = run_task_distill(t, folder, data(), tmp_path / "resumed", cfg(gamma=0.5, top_k=4, max_steps=3))
    assert first["step"] == 3
    resumed = run_task_distill(t, folder, data(), tmp_path / "resumed", cfg(gamma=0.5, top_k=4))  # a larger budget
    assert resumed["step"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]
    for (name, p), q in zip(straight["student"].state_dict().items(), resumed["student"].state_dict().values()):
        torch.testing.assert_close(p, q, msg=name, rtol=0, atol=0)
    steps = [json.loads(line)["step"] for line in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps after the resumed checkpoint are logged once

    with pytest.raises(MedmoeError, match=r"config\.alpha: 1\.0 -> 0\.5"):
        run_task_distill(t, folder, data(), tmp_path / "resumed", cfg(gamma=0.5, top_k=4, alpha=0.5))
    with pytest.raises(MedmoeError, match="--no-resume does not delete"):
        run_task_distill(t, folder, data(), tmp_path / "resumed", cfg(gamma=0.5, top_k=4), resume=False)


def test_a_general_distill_run_is_not_taken_for_a_task_run(teacher, tokenizer, tmp_path):
    from medmoe.mamba.distill import DistillConfig, distill

    student, spec = build_hybrid(teacher, layers=[0, 3])
    blocks = torch.randint(0, len(tokenizer), (4, 8), generator=torch.Generator().manual_seed(0))
    distill(teacher, student, spec, blocks, tmp_path / "general", DistillConfig(batch_size=2, max_steps=1), tokenizer=tokenizer)
    with pytest.raises(MedmoeError, match="holds checkpoints of another run"):
        run_task_distill(lm_teacher(teacher, tokenizer, "tiny"), tmp_path / "general", data(), tmp_path / "general", cfg())


def test_a_student_of_another_teacher_is_refused(teacher, tokenizer, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=8))
    student, spec = build_hybrid(other, teacher_name="other")
    save_hybrid(student, spec, tmp_path / "student", tokenizer)
    with pytest.raises(MedmoeError, match="does not fit the teacher 'tiny'.*hidden_size 32 vs the student's 16"):
        run_task_distill(lm_teacher(teacher, tokenizer, "tiny"), tmp_path / "student", data(), tmp_path / "run", cfg())


def test_the_output_loads_as_the_mamba_expert(teacher, tokenizer, tmp_path):
    from medmoe.mambaformer.experts import check_gate_records, load_expert
    from medmoe.models import load_causal_lm

    folder = student_folder(teacher, tokenizer, tmp_path / "student")
    d = data()
    d.skip_first = 4
    run = run_task_distill(lm_teacher(teacher, tokenizer, "tiny"), folder, d, tmp_path / "run", cfg(max_steps=2))
    model, tok = load_causal_lm(str(tmp_path / "run"))
    assert type(model).__name__ == "MambaHybridForCausalLM" and tok is not None
    for (name, p), q in zip(run["student"].state_dict().items(), model.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    expert = load_expert("mamba", str(tmp_path / "run"))
    assert expert.trained_on is not None
    assert expert.trained_on["method"] == "task-distill" and expert.trained_on["data"] == "toy"
    assert expert.trained_on["teacher"] == "tiny" and expert.trained_on["steps"] == 2
    assert expert.trained_on["pool"]["train_prompts"] == 6 and "minutes" in expert.trained_on
    check_gate_records({"mamba": expert}, "toy", 4)
    with pytest.raises(MedmoeError, match="gate would train on the first 5"):
        check_gate_records({"mamba": expert}, "toy", 5)


# ---- the task's prompts ------------------------------------------------------------------------------------

def test_pubmedqa_prompts_come_from_the_pool_and_leave_out_gate_and_dev():
    from medmoe.data import load_dataset

    d = task_records("pubmedqa", skip_first=150)
    train_split, dev, test = (load_dataset("pubmedqa", s) for s in ("train", "dev", "test"))
    ids = {r.id for r in d.train}
    assert len(d.train) == 250 and len(d.heldout) == 100 and d.pool_records == 500
    assert ids == {r.id for r in train_split[150:]}
    assert {r.id for r in d.heldout} == {r.id for r in dev}
    assert not (ids | {r.id for r in d.heldout}) & {r.id for r in test}


# ---- the command ---------------------------------------------------------------------------------------------

def test_distill_task_command_runs_resumes_and_loads(teacher, tokenizer, tmp_path):
    from typer.testing import CliRunner

    from medmoe.cli import app
    from medmoe.models import load_causal_lm

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    student_folder(teacher, tokenizer, tmp_path / "student")
    out = tmp_path / "run"
    config = tmp_path / "task.yaml"
    config.write_text(f"model: {tmp_path / 'teacher'}\nstudent: {tmp_path / 'student'}\ndata: pubmedqa\nlimit: 3\n"
                      "heldout-limit: 2\nbatch-size: 1\neval-every: 1\ncache-dtype: float32\n")
    args = ["mambaformer", "distill-task", "--config", str(config), "-o", str(out), "--gamma", "0.1", "--top-k", "4"]
    first = CliRunner().invoke(app, [*args, "--max-steps", "2"], terminal_width=200)
    assert first.exit_code == 0, first.output
    assert "3 training prompts, 2 held out (dev split)" in first.output and "held-out agreement" in first.output
    settings = json.loads((out / "task_distill.json").read_text())
    assert settings["task"] == "pubmedqa" and settings["config"]["batch_size"] == 1 and settings["config"]["gamma"] == 0.1
    second = CliRunner().invoke(app, [*args, "--max-steps", "3"], terminal_width=200)
    assert second.exit_code == 0, second.output
    assert json.loads((out / "latest.json").read_text())["step"] == 3
    other = CliRunner().invoke(app, [*args, "--max-steps", "3", "--delta", "0.5"], terminal_width=200)
    assert other.exit_code != 0 and "config.delta: 1.0 -> 0.5" in str(other.exception)
    model, _ = load_causal_lm(str(out))
    assert type(model).__name__ == "MambaHybridForCausalLM"


def test_the_budget_benchmark_runs_on_tiny_models(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import mamba_task_distill

    report = mamba_task_distill.main(["--tiny", "--threads", "1", "--budgets", "0,0.01", "--test-limit", "6",
                                      "--run", str(tmp_path / "run"), "--report-dir", str(tmp_path / "reports")])
    data = json.loads(report.with_suffix(".json").read_text())
    assert [r["budget"] for r in data["budgets"]] == [0.0, 0.01]
    assert data["budgets"][0]["steps"] == 0 and data["budgets"][1]["steps"] >= 1
    assert data["test_examples"] == 6 and 0 <= data["best_constant"]["accuracy"] <= 1
    text = report.read_text()
    assert "| budget (min) |" in text and "best constant answer" in text.lower()


def test_a_head_gives_the_teachers_calibrated_distribution(teacher, tokenizer, tmp_path):
    from medmoe.mambaformer.experiments.task_distill import load_teacher
    from medmoe.models.head import HeadConfig, OptionHead, save_head

    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    head = OptionHead(letters=3, width=0, option_features=1)
    with torch.no_grad():
        head.v.fill_(1.0)
        head.b.copy_(torch.tensor([0.0, 4.0, 0.0]))  # a calibration: the LM's answer plus a bias toward B
    save_head(head, HeadConfig(kind="calibration", base=str(tmp_path / "teacher"), letters=3), tmp_path / "head")
    with_head = load_teacher(None, tmp_path / "head")
    assert with_head.head == str(tmp_path / "head") and with_head.head_sha256 and with_head.source == str(tmp_path / "teacher")
    plain = lm_teacher(teacher, tokenizer, "tiny")
    records = RECORDS[:6]
    a = TeacherCache.build_or_open(tmp_path / "a", with_head, records, active=0, cache_dtype="float32")
    b = TeacherCache.build_or_open(tmp_path / "b", plain, records, active=0, cache_dtype="float32")
    for i in range(len(records)):
        expected = torch.log_softmax(b.entry(i)["logp"] + torch.tensor([0.0, 4.0, 0.0]), dim=-1)
        torch.testing.assert_close(a.entry(i)["logp"], expected, atol=1e-4, rtol=1e-4)
    with pytest.raises(MedmoeError, match="answers for the expert"):
        load_teacher("smollm2-135m", tmp_path / "head")
