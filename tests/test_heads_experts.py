"""Cached features (heads/features.py) from every kind of expert, each a tiny random model built in
process: an HF causal LM (Llama), a T5 (encoder-decoder), HF Mamba, the medmoe Mamba hybrid and a
Llama with a LoRA-MoE adapter; then a head trained on them answering through HeadAnswerer exactly as
`predict` does on the cached features."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.eval.model import HFEvalModel
from medmoe.eval.prompts import build_prompt
from medmoe.heads import features as features_module
from medmoe.heads.features import MAX_OPTIONS, extract_features, forward_prompt, pool, record_key
from tiny_lm import tiny_llama, tiny_tokenizer

torch.set_num_threads(1)  # tiny matrices: threads only spin on a shared machine

RECORDS = (
    Record(id="t/yesno", question="is aspirin best for the patient ?", context="the patient has fever and cough .",
           options=("yes", "no", "maybe"), answer="A"),
    Record(id="t/four", question="which drug is best ?", options=("aspirin", "heparin", "rest", "surgery"), answer="B"),
    Record(id="t/five", question="which is best with pain ?", options=("aspirin", "heparin", "rest", "surgery", "a"),
           answer="E"),
)
TEXT = " ".join(" ".join([r.question, r.context or "", *r.options]) for r in RECORDS)
KINDS = ("llama", "t5", "hf-mamba", "hybrid", "loramoe")
LAYERS, WIDTH = 2, 32


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(extra_text=TEXT)


def _llama(tokenizer):
    return tiny_llama(vocab=len(tokenizer))


def build(kind: str, tokenizer):
    """A tiny random model of `kind` with LAYERS blocks of width WIDTH, in eval mode."""
    import transformers as tf

    vocab = len(tokenizer)
    torch.manual_seed(0)
    if kind == "llama":
        return _llama(tokenizer)
    if kind == "t5":
        cfg = tf.T5Config(vocab_size=vocab, d_model=WIDTH, d_kv=8, d_ff=64, num_layers=LAYERS, num_decoder_layers=LAYERS,
                          num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=3)
        return tf.T5ForConditionalGeneration(cfg).eval()
    if kind == "hf-mamba":
        cfg = tf.MambaConfig(vocab_size=vocab, hidden_size=WIDTH, num_hidden_layers=LAYERS, state_size=8, expand=2,
                             conv_kernel=4, pad_token_id=0, bos_token_id=2, eos_token_id=3)
        return tf.MambaForCausalLM(cfg).eval()
    if kind == "hybrid":
        from medmoe.mamba.transfer import build_hybrid

        student, _ = build_hybrid(_llama(tokenizer), attention_layers=[1])
        with torch.no_grad():  # fresh mixers pass x straight through: make their parameters matter
            for name, p in student.named_parameters():
                if ".D" in name or "conv1d" in name:
                    p.normal_(0, 0.3)
        return student.eval()
    if kind == "loramoe":
        from medmoe.loramoe import LoraMoeConfig, LoraMoeModel

        wrapped = LoraMoeModel(_llama(tokenizer), LoraMoeConfig(num_experts=4, top_k=2, rank=4, router_dim=8, queue_size=16))
        with torch.no_grad():  # B = 0 at initialization: make the adapter change the answer
            for name, p in wrapped.adapter_state_dict().items():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return wrapped.eval()
    raise ValueError(kind)


@pytest.fixture(scope="module", params=KINDS)
def expert(request, tokenizer):
    """(kind, HFEvalModel) of each kind."""
    model = build(request.param, tokenizer)
    return request.param, HFEvalModel(model, tokenizer, f"tiny-{request.param}", share_prefix=False)


@pytest.fixture(scope="module")
def cached(expert, tmp_path_factory):
    """(folder, features) of RECORDS, extracted once per kind."""
    kind, lm = expert
    folder = tmp_path_factory.mktemp(f"features-{kind}")
    return folder, extract_features(lm, RECORDS, folder, f"tiny-{kind}", progress=False)


def _no_compute(*args, **kwargs):
    raise AssertionError("features were computed again")


def test_features_have_every_layer_and_the_options_scores(expert, cached):
    kind, lm = expert
    _, feats = cached
    assert feats.ids == [r.id for r in RECORDS]
    assert feats.last.shape == feats.mean.shape == (3, LAYERS + 1, WIDTH)
    assert feats.last.dtype == feats.mean.dtype == torch.float16 and torch.isfinite(feats.last.float()).all()
    assert torch.isfinite(feats.mean.float()).all() and feats.layers == LAYERS + 1
    assert feats.option_logprobs.shape == (3, MAX_OPTIONS)
    for i, record in enumerate(RECORDS):
        k = len(record.options)
        row = feats.option_logprobs[i]
        assert torch.isfinite(row[:k]).all() and (row[:k] < 0).all() and torch.isneginf(row[k:]).all()
        prompt = build_prompt(record, lm.tokenizer, (), "letter")
        want = lm.score_options(prompt.context, prompt.continuations).logprobs  # the harness's own scoring path
        assert row[:k].tolist() == pytest.approx(want, abs=1e-4)
    assert not torch.equal(feats.last[:, -1], feats.last[:, 0])  # the layers differ


def test_t5_features_are_the_encoders_hidden_states(tokenizer, tmp_path):
    lm = HFEvalModel(build("t5", tokenizer), tokenizer, "tiny-t5", share_prefix=False)
    feats = extract_features(lm, RECORDS[:1], tmp_path, "tiny-t5", progress=False)
    prompt = build_prompt(RECORDS[0], tokenizer, (), "letter")
    ids = torch.tensor([tokenizer(prompt.context, add_special_tokens=True)["input_ids"]])
    with torch.no_grad():
        encoded = lm.model.get_encoder()(input_ids=ids).last_hidden_state[0]  # (n, D)
    torch.testing.assert_close(feats.last[0, -1], encoded[-1].half())
    torch.testing.assert_close(feats.mean[0, -1], encoded.mean(0).half())


def test_the_loramoe_adapter_is_in_the_features(tokenizer, tmp_path):
    base = HFEvalModel(_llama(tokenizer), tokenizer, "base", share_prefix=False)
    tuned = HFEvalModel(build("loramoe", tokenizer), tokenizer, "tuned", share_prefix=False)
    a = extract_features(base, RECORDS, tmp_path / "base", "base", progress=False)
    b = extract_features(tuned, RECORDS, tmp_path / "tuned", "tuned", progress=False)
    assert torch.equal(a.last[:, 0], b.last[:, 0])  # same embeddings
    assert not torch.allclose(a.last[:, -1].float(), b.last[:, -1].float())
    assert not torch.allclose(a.option_logprobs[:, :3], b.option_logprobs[:, :3])


def test_a_second_call_computes_nothing(expert, cached, monkeypatch):
    kind, lm = expert
    folder, first = cached
    monkeypatch.setattr(features_module, "_extract_chunk", _no_compute)
    again = extract_features(lm, RECORDS, folder, f"tiny-{kind}", progress=False)
    assert again.ids == first.ids
    for name in ("last", "mean", "option_logprobs"):
        assert torch.equal(getattr(again, name), getattr(first, name))
    part = extract_features(lm, RECORDS[::-1][:2], folder, f"tiny-{kind}", progress=False)  # any subset, any order
    assert part.ids == ["t/five", "t/four"] and torch.equal(part.last, first.last.flip(0)[:2])


def test_an_edited_record_is_computed_again(expert, cached, monkeypatch):
    kind, lm = expert
    folder, first = cached
    edited = replace(RECORDS[1], question="which drug is best for cough ?")
    assert record_key(edited) != record_key(RECORDS[1])
    computed = []
    real = features_module._extract_chunk

    def counting(lm_, fitter, records):
        computed.extend(r.id for r in records)
        return real(lm_, fitter, records)

    monkeypatch.setattr(features_module, "_extract_chunk", counting)
    records = [RECORDS[0], edited, RECORDS[2]]
    feats = extract_features(lm, records, folder, f"tiny-{kind}", progress=False)
    assert computed == ["t/four"] and feats.ids == [r.id for r in records]
    assert torch.equal(feats.last[[0, 2]], first.last[[0, 2]])
    assert not torch.equal(feats.last[1], first.last[1])
    monkeypatch.setattr(features_module, "_extract_chunk", _no_compute)  # both versions are cached now
    extract_features(lm, RECORDS, folder, f"tiny-{kind}", progress=False)


def test_a_folder_of_another_source_or_dtype_is_refused(expert, cached, monkeypatch):
    kind, lm = expert
    folder, _ = cached
    monkeypatch.setattr(features_module, "_extract_chunk", _no_compute)
    with pytest.raises(MedmoeError, match=f"source: tiny-{kind} -> someone-else"):
        extract_features(lm, RECORDS, folder, "someone-else", progress=False)
    half = HFEvalModel(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, "half", share_prefix=False)
    with pytest.raises(MedmoeError, match="dtype: float32 -> bfloat16"):
        extract_features(half, RECORDS, folder, f"tiny-{kind}", progress=False)


def test_an_interrupted_extraction_resumes(tokenizer, tmp_path, monkeypatch):
    lm = HFEvalModel(_llama(tokenizer), tokenizer, "tiny", share_prefix=False)
    monkeypatch.setattr(features_module, "CHUNK", 1)
    real, calls = features_module._extract_chunk, []

    def dies_second(lm_, fitter, records):
        calls.append([r.id for r in records])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(lm_, fitter, records)

    monkeypatch.setattr(features_module, "_extract_chunk", dies_second)
    with pytest.raises(KeyboardInterrupt):
        extract_features(lm, RECORDS, tmp_path, "tiny", progress=False)
    names = sorted(p.name for p in tmp_path.iterdir())  # one whole chunk, no torn temporary file
    assert len(names) == 2 and names[0].startswith("chunk-") and names[0].endswith(".safetensors") and names[1] == "features.json"
    monkeypatch.setattr(features_module, "_extract_chunk", real)
    calls.clear()
    monkeypatch.setattr(features_module, "_extract_chunk", lambda *a: calls.append([r.id for r in a[2]]) or real(*a))
    resumed = extract_features(lm, RECORDS, tmp_path, "tiny", progress=False)
    assert calls == [["t/four"], ["t/five"]]
    fresh = extract_features(lm, RECORDS, tmp_path / "fresh", "tiny", progress=False)
    for name in ("last", "mean", "option_logprobs"):
        assert torch.equal(getattr(resumed, name), getattr(fresh, name))


def test_pool_is_what_the_cache_stores(tokenizer, tmp_path):
    lm = HFEvalModel(_llama(tokenizer), tokenizer, "tiny", share_prefix=False)
    feats = extract_features(lm, RECORDS, tmp_path, "tiny", progress=False)
    for i, record in enumerate(RECORDS):
        prompt = build_prompt(record, tokenizer, (), "letter")
        with torch.inference_mode():
            hidden, scores = forward_prompt(lm.model, tokenizer, prompt.context, prompt.continuations)
        assert len(hidden) == LAYERS + 1 and scores == feats.option_logprobs[i, : len(scores)].tolist()
        for layer in (0, 1, -1):
            for pooling in ("last", "mean"):
                assert torch.equal(pool(hidden, layer, pooling)[0], feats.pooled(layer, pooling)[i])
    assert torch.equal(feats.select(["t/five", "t/yesno"]).last, feats.last[[2, 0]])
    with pytest.raises(MedmoeError, match="no cached features for 1 records"):
        feats.select(["t/none"])


# ---- a trained head answers as `predict` does ---------------------------------------------------

def _pool_records(n: int = 24) -> list[Record]:
    drugs = ("aspirin", "heparin", "rest", "surgery", "a")
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append(Record(id=f"p/{i}", question=f"is {drugs[i % 4]} best with pain ?", context="the patient has fever .",
                              options=("yes", "no", "maybe"), answer="ABC"[(i // 3) % 3]))
        else:
            k = 4 if i % 3 == 1 else 5
            options = tuple(drugs[(i + j) % 5] for j in range(k))
            out.append(Record(id=f"p/{i}", question=f"which drug is best with {drugs[i % 5]} ?", options=options,
                              answer="ABCDE"[i % k]))
    return out


@pytest.fixture(scope="module")
def trained(tokenizer, tmp_path_factory):
    """(lm, records, features, {name: (head, config)}) on the tiny Llama: a head per pooling and a calibration."""
    from medmoe.heads.fit import fit_head, training_set
    from medmoe.models.head import HeadConfig

    lm = HFEvalModel(_llama(tokenizer), tokenizer, "tiny", share_prefix=False)
    records = _pool_records()
    feats = extract_features(lm, records, tmp_path_factory.mktemp("pool"), "tiny", progress=False)
    ts = training_set(feats, records)
    heads = {}
    for layer, pooling in ((-1, "last"), (1, "mean")):
        head = fit_head(ts.h(layer, pooling), ts.f, ts.present, ts.y, l2=1e-2)
        heads[f"head-{pooling}"] = head, HeadConfig(kind="head", base="tiny", letters=ts.letters, layer=layer, pooling=pooling)
    calibration = fit_head(None, ts.f, ts.present, ts.y, bias_only=True)
    heads["calibration"] = calibration, HeadConfig(kind="calibration", base="tiny", letters=ts.letters)
    return lm, records, feats, heads


@pytest.mark.parametrize("name", ["head-last", "head-mean", "calibration"])
def test_head_answerer_answers_as_predict_does_on_the_cached_features(trained, name):
    from medmoe.heads.answerer import HeadAnswerer
    from medmoe.heads.fit import option_inputs, predict

    lm, records, feats, heads = trained
    head, config = heads[name]
    outcomes = HeadAnswerer(lm, head, config).answer(records)
    f, present = option_inputs(feats, config.letters)
    h = feats.pooled(config.layer, config.pooling) if config.layer is not None else None
    want = predict(head, h, f, present)
    with torch.no_grad():
        logits = head(h, f, present)
    assert len(outcomes) == len(records)
    for i, (record, outcome) in enumerate(zip(records, outcomes)):
        k = len(record.options)
        assert outcome.prediction == record.letters[int(want[i])]
        assert list(outcome.scores) == list(record.letters)
        torch.testing.assert_close(torch.tensor(list(outcome.scores.values())), logits[i, :k], rtol=0, atol=1e-5)
        assert sum(outcome.probs.values()) == pytest.approx(1.0)
        lm_best = int(feats.option_logprobs[i, :k].argmax())
        assert outcome.route == {"head": config.kind, "lm_prediction": record.letters[lm_best]}
    assert len({o.prediction for o in outcomes}) > 1 or name == "calibration"


def test_head_answerer_refuses_what_it_cannot_answer(trained):
    from medmoe.heads.answerer import HeadAnswerer
    from medmoe.heads.fit import fixed_head
    from medmoe.models.head import HeadConfig

    lm, records, _, heads = trained
    head, _ = heads["calibration"]
    four = HeadAnswerer(lm, fixed_head(head.b.detach()[:4]), HeadConfig(kind="calibration", base="tiny", letters=4))
    with pytest.raises(MedmoeError, match="5 options, this head answers at most 4"):
        four.answer([r for r in records if len(r.options) == 5][:1])
    answerer = HeadAnswerer(lm, head, heads["calibration"][1])
    with pytest.raises(MedmoeError, match="--rule letter --shots 0"):
        answerer.score_records(records[:1], "loglik", [()])
    with pytest.raises(MedmoeError, match="--rule letter --shots 0"):
        answerer.score_records(records[:1], "letter", [records[1:2]])
    assert [o.prediction for o in answerer.score_records(records[:2], "letter", [(), ()])] == \
        [o.prediction for o in answerer.answer(records[:2])]


def test_trained_heads_load_and_answer_from_their_folder(tokenizer, tmp_path, monkeypatch):
    """`medmoe heads train` then `medmoe eval --head`: train_heads on a saved tiny Llama, save_head,
    HeadAnswerer.load (the base by path), the same answers as the head in memory."""
    from medmoe.heads import fit
    from medmoe.heads.answerer import HeadAnswerer
    from medmoe.heads.train import train_heads
    from medmoe.models.head import load_head, save_head

    monkeypatch.setenv("MEDMOE_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fit, "BALANCED", (True,))  # half the candidates: the test is about the plumbing
    base = tmp_path / "base"
    _llama(tokenizer).save_pretrained(base)
    tokenizer.save_pretrained(base)
    lm = HFEvalModel(_llama(tokenizer), tokenizer, str(base), share_prefix=False)
    records = _pool_records(20)
    trained, candidates = train_heads(lm, str(base), "tiny-pool", records, layers=[-1], progress=False)
    assert set(trained) == {"zero-shot", "calibrated", "head"}
    assert {c.kind for c in candidates} == {"zero-shot", "calibration", "contextual", "head"}
    assert list((tmp_path / "home" / "features").iterdir())  # the features went to the shared cache
    chosen = trained["head"]
    assert chosen.config.selection["chosen"] == chosen.candidate.name
    assert chosen.config.trained_on["records"] == 20 and chosen.config.letters == 5
    save_head(chosen.head, chosen.config, tmp_path / "head")
    loaded = HeadAnswerer.load(tmp_path / "head")
    assert load_head(tmp_path / "head")[1] == chosen.config
    direct = HeadAnswerer(lm, chosen.head, chosen.config).answer(records[:6])
    again = loaded.answer(records[:6])
    assert [o.prediction for o in again] == [o.prediction for o in direct]
    for a, b in zip(again, direct):
        assert a.scores == pytest.approx(b.scores, abs=1e-5) and a.route == b.route


def test_contextual_bias_on_content_free_prompts(trained):
    from medmoe.heads.contextual import content_free_records, contextual_bias

    lm, records, _, _ = trained
    yesno = content_free_records(records[0])
    assert [r.question for r in yesno] == ["N/A", "[MASK]", "..."] and all(r.options == ("yes", "no", "maybe") for r in yesno)
    assert all(r.context == r.question for r in yesno)
    mcq = content_free_records(records[1])
    assert all(r.options == (r.question,) * len(records[1].options) and r.context is None for r in mcq)
    fives = [r for r in records if len(r.options) == 5]
    bias = contextual_bias(lm, fives + records[:1], 5)
    assert bias.shape == (5,) and torch.isfinite(bias).all()
    assert torch.exp(-bias).sum() == pytest.approx(1.0, abs=1e-5)  # b = -log p_cf, p_cf a distribution over 5
    yes_no_maybe = contextual_bias(lm, records[:1], 5)
    assert (yes_no_maybe[3:] == 0).all() and torch.exp(-yes_no_maybe[:3]).sum() == pytest.approx(1.0, abs=1e-5)


# ---- the server answers through its format's head -----------------------------------------------

def test_the_causal_lm_answerer_answers_through_the_records_format_head(trained):
    from medmoe.answer.causal_lm import CausalLMAnswerer
    from medmoe.heads.answerer import HeadAnswerer
    from medmoe.heads.bundled import HeadSet

    lm, records, _, heads = trained
    head, config = heads["head-last"]
    config = replace(config, questions="yesno/en")
    answerer = CausalLMAnswerer(lm.model, lm.tokenizer, "tiny", heads=HeadSet([(head, config)]))
    answers = answerer.answer_batch(records[:6])
    expected = HeadAnswerer(lm, head, config).answer(records[:6])
    for record, answer, outcome in zip(records[:6], answers, expected):
        if record.options == ("yes", "no", "maybe"):  # its format's head answers
            assert answer.expert == "tiny+head(head)"
            assert answer.answer == outcome.prediction
        else:  # no head for this format: the expert's own option likelihoods
            assert answer.expert == "tiny"


def test_server_head_settings_are_checked(tmp_path, trained):
    from medmoe.errors import MedmoeError
    from medmoe.models.head import save_head
    from medmoe.serve.answerers import server_heads

    _, _, _, heads = trained
    head, config = heads["calibration"]
    save_head(head, config, tmp_path / "h")
    assert server_heads("none", "tiny", None) is None
    assert server_heads("bundled", "tiny", "some/adapter") is None  # bundled heads read the base alone
    assert len(server_heads([str(tmp_path / "h")], "tiny", None).heads) == 1
    with pytest.raises(MedmoeError, match="reads tiny"):
        server_heads([str(tmp_path / "h")], "smollm2-135m", None)
    with pytest.raises(MedmoeError, match="bundled"):
        server_heads("everything", "tiny", None)


def test_bundled_heads_name_their_format_and_expert():
    from medmoe.heads.bundled import BUNDLED_HEADS, HeadSet, bundled_head_folders

    folders = bundled_head_folders("smollm2-135m")
    assert {p.name for p in folders} >= {"pubmedqa", "dental"}, BUNDLED_HEADS
    found = {config.questions: config for _, config in HeadSet.bundled("smollm2-135m").heads}
    assert set(found) == {"yesno/en", "choice/en"}
    assert all(c.base == "smollm2-135m" and c.retrieval is None and c.trained_on["pool"] for c in found.values())
