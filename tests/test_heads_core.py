"""Option heads without a model: the head files (models/head.py), fitting and cross-validation
(heads/fit.py) on synthetic features, and the `--head` option of `medmoe eval`."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from medmoe.data.record import Record
from medmoe.errors import ModelError
from medmoe.heads import fit
from medmoe.heads.features import Features, feature_folder
from medmoe.heads.fit import (
    Candidate,
    best,
    class_weights,
    cv_accuracy,
    default_layers,
    fit_candidate,
    fit_head,
    fixed_head,
    folds_of,
    option_inputs,
    predict,
    score_candidates,
    training_set,
)
from medmoe.models.head import (
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    HeadConfig,
    OptionHead,
    is_head_folder,
    lm_option_feature,
    load_head,
    save_head,
)

torch.set_num_threads(1)  # tiny problems: threads only spin on a shared machine


# ---- head files --------------------------------------------------------------------------------

def _head(letters: int = 4, width: int = 8, option_features: int = 2, seed: int = 0) -> OptionHead:
    torch.manual_seed(seed)
    head = OptionHead(letters, width, option_features)
    with torch.no_grad():
        for p in (head.mu, head.sigma, head.W, head.v, head.b):
            p.copy_(torch.randn_like(p))
        head.sigma.abs_().add_(0.1)
    return head.eval()


def _config(letters: int = 4, **kw) -> HeadConfig:
    base = dict(kind="head", base="tiny", letters=letters, option_features=["lm_logprob", "knn_vote"], layer=-1, pooling="last")
    return HeadConfig(**(base | kw))


def _inputs(n: int = 6, letters: int = 4, width: int = 8, features: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, width, generator=g)
    f = torch.randn(n, letters, features, generator=g)
    present = torch.ones(n, letters, dtype=torch.bool)
    present[::2, -1] = False  # every other record has one option fewer
    return h, f, present


@pytest.fixture()
def head_dir(tmp_path):
    folder = tmp_path / "head"
    save_head(_head(), _config(), folder)
    return folder


def test_save_load_round_trip_gives_identical_logits(head_dir):
    head = _head()
    loaded, config = load_head(head_dir)
    assert config == _config() and is_head_folder(head_dir) and not loaded.training
    h, f, present = _inputs()
    with torch.no_grad():
        want, got = head(h, f, present), loaded(h, f, present)
    assert torch.equal(want, got)
    assert torch.isinf(got[::2, -1]).all() and torch.isfinite(got[1::2]).all()
    assert sorted(p.name for p in head_dir.iterdir()) == [HEAD_WEIGHTS, HEAD_CONFIG]


def test_saving_again_replaces_the_folder(head_dir):
    save_head(_head(seed=5), _config(kind="calibration", layer=None, pooling=None), head_dir)
    loaded, config = load_head(head_dir)
    assert config.kind == "calibration" and torch.equal(loaded.b, _head(seed=5).b)
    assert sorted(p.name for p in head_dir.parent.iterdir()) == ["head"]  # no temporary folder left


def _rewrite_tensors(folder, change):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / HEAD_WEIGHTS))
    change(state)
    save_file(state, str(folder / HEAD_WEIGHTS))


def _rewrite_config(folder, change):
    raw = json.loads((folder / HEAD_CONFIG).read_text())
    change(raw)
    (folder / HEAD_CONFIG).write_text(json.dumps(raw))


def test_a_truncated_or_corrupt_weights_file_is_named(head_dir):
    weights = head_dir / HEAD_WEIGHTS
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-7])
    with pytest.raises(ModelError, match="truncated") as info:
        load_head(head_dir)
    assert str(weights) in str(info.value)
    weights.write_bytes(b"\x03\x00")
    with pytest.raises(ModelError, match="truncated") as info:
        load_head(head_dir)
    assert str(weights) in str(info.value)
    weights.write_bytes((16).to_bytes(8, "little") + b"not a json table")
    with pytest.raises(ModelError, match="corrupt") as info:
        load_head(head_dir)
    assert str(weights) in str(info.value)
    weights.unlink()
    with pytest.raises(ModelError, match="missing") as info:
        load_head(head_dir)
    assert str(weights) in str(info.value)


def test_a_config_that_is_not_json_is_named(head_dir):
    config = head_dir / HEAD_CONFIG
    config.write_text("{kind: head")
    with pytest.raises(ModelError, match="not valid JSON") as info:
        load_head(head_dir)
    assert str(config) in str(info.value)
    config.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_head(head_dir)
    config.write_text("[1, 2]")
    with pytest.raises(ModelError, match="head format 'list'") as info:
        load_head(head_dir)
    assert str(config) in str(info.value)


@pytest.mark.parametrize("fmt", [2, 0, "1", None])
def test_a_wrong_format_number_is_refused(head_dir, fmt):
    _rewrite_config(head_dir, lambda raw: raw.update(format=fmt) if fmt is not None else raw.pop("format"))
    with pytest.raises(ModelError, match=f"head format {fmt!r}, this medmoe reads format 1") as info:
        load_head(head_dir)
    assert str(head_dir / HEAD_CONFIG) in str(info.value)


@pytest.mark.parametrize("change, words", [
    (lambda raw: raw.update(colour="red"), "colour"),
    (lambda raw: raw.update(kind="oracle"), "unknown head kind 'oracle'"),
    (lambda raw: raw.update(pooling=None), "both a layer and a pooling"),
    (lambda raw: raw.pop("letters"), "letters"),
])
def test_a_bad_config_field_names_the_file(head_dir, change, words):
    _rewrite_config(head_dir, change)
    with pytest.raises(ModelError, match=words) as info:
        load_head(head_dir)
    assert str(head_dir / HEAD_CONFIG) in str(info.value)


def test_no_config_is_not_a_head_folder(tmp_path):
    assert not is_head_folder(tmp_path)
    with pytest.raises(ModelError, match=f"not a head folder \\(no {HEAD_CONFIG}\\)"):
        load_head(tmp_path)


@pytest.mark.parametrize("change", [
    lambda s: s.update(W=torch.zeros(5, 8)),  # 5 letters, the config says 4
    lambda s: s.update(b=torch.zeros(5)),
    lambda s: s.update(v=torch.zeros(3)),  # 3 option features, the config names 2
    lambda s: s.update(mu=torch.zeros(9)),  # width 9, W reads 8
    lambda s: s.update(sigma=torch.ones(8, 1)),
    lambda s: s.update(W=torch.zeros(32)),  # not a matrix
], ids=["W-letters", "b", "v", "mu", "sigma", "W-1d"])
def test_shapes_that_do_not_match_the_config_are_named(head_dir, change):
    _rewrite_tensors(head_dir, change)
    with pytest.raises(ModelError) as info:
        load_head(head_dir)
    assert str(head_dir / HEAD_WEIGHTS) in str(info.value) and "shape" in str(info.value)


@pytest.mark.parametrize("change, words", [
    (lambda s: s.update(extra=torch.zeros(2)), "extra"),
    (lambda s: s.pop("b"), "expected"),
])
def test_extra_or_missing_tensors_are_named(head_dir, change, words):
    _rewrite_tensors(head_dir, change)
    with pytest.raises(ModelError, match=words) as info:
        load_head(head_dir)
    assert str(head_dir / HEAD_WEIGHTS) in str(info.value)


def test_a_head_folder_is_not_a_model(head_dir):
    """Loading a head folder as a model is a ModelError that names it and says how to use it."""
    from medmoe.models import load_causal_lm

    with pytest.raises(ModelError) as info:
        load_causal_lm(str(head_dir))
    message = str(info.value)
    assert str(head_dir) in message and "option head" in message and "medmoe eval --head" in message


def test_lm_option_feature_is_the_log_softmax_over_present_options():
    logprobs = torch.tensor([[-1.0, -2.0, -3.0, float("-inf")], [-1.0, -1.0, -1.0, -1.0]])
    s = lm_option_feature(logprobs)
    assert s.shape == (2, 4, 1)
    assert torch.allclose(s[0, :3, 0].exp().sum(), torch.tensor(1.0)) and s[0, 3, 0] == 0
    assert torch.allclose(s[1, :, 0], torch.full((4,), -torch.log(torch.tensor(4.0)).item()))


# ---- fitting -----------------------------------------------------------------------------------

def _linear_task(n: int, width: int = 8, letters: int = 4, seed: int = 0):
    """h (n, D) and y = argmax(W* h): the gold option is a linear function of h; the LM knows nothing."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(letters, width, generator=torch.Generator().manual_seed(123))
    h = 3.0 + 2.0 * torch.randn(n, width, generator=g)  # not standardized: the head's mu/sigma do it
    y = ((h - 3.0) @ w_true.T).argmax(-1)
    f = lm_option_feature(torch.zeros(n, letters))
    return h, f, torch.ones(n, letters, dtype=torch.bool), y


def test_a_head_learns_a_linear_rule():
    h, f, present, y = _linear_task(400)
    head = fit_head(h, f, present, y, l2=1e-3)
    assert (predict(head, h, f, present) == y).float().mean() > 0.95
    h2, f2, present2, y2 = _linear_task(400, seed=1)  # fresh questions from the same rule
    assert (predict(head, h2, f2, present2) == y2).float().mean() > 0.85
    assert torch.allclose(head.mu, h.mean(0)) and torch.allclose(head.sigma, h.std(0))


def _biased_lm(n: int = 400, letters: int = 4, seed: int = 0):
    """LM scores that would be right but for +2 on letter A."""
    g = torch.Generator().manual_seed(seed)
    clean = torch.randn(n, letters, generator=g)
    y = clean.argmax(-1)
    biased = torch.log_softmax(clean + torch.tensor([2.0] + [0.0] * (letters - 1)), dim=-1)
    return biased, y


@pytest.mark.parametrize("balanced", [False, True])
def test_a_calibration_recovers_a_planted_letter_prior(balanced):
    logprobs, y = _biased_lm()
    f, present = lm_option_feature(logprobs), torch.ones_like(logprobs, dtype=torch.bool)
    head = fit_head(None, f, present, y, bias_only=True, balanced=balanced)
    assert head.W.shape == (4, 0) and head.v.tolist() == [1.0]  # a calibration moves b only
    assert head.b[0] - head.b[1:].mean() < -1.0
    zero_shot = (predict(fixed_head(torch.zeros(4)), None, f, present) == y).float().mean()
    calibrated = (predict(head, None, f, present) == y).float().mean()
    assert zero_shot < 0.6 and calibrated > 0.9


def test_absent_options_are_never_predicted():
    g = torch.Generator().manual_seed(0)
    n, letters = 200, 5
    logprobs = torch.randn(n, letters, generator=g)
    logprobs[: n // 2, 4] = float("-inf")  # half are 4-option questions in a 5-letter head
    logprobs[n // 2:, 4] += 3.0  # the LM loves E where there is one
    f, present = option_inputs(Features([], torch.empty(0), torch.empty(0), logprobs), letters)
    assert present[: n // 2, 4].logical_not().all() and present[n // 2:].all()
    y = torch.where(present[:, 4], torch.tensor(4), logprobs[:, :4].argmax(-1))
    h = torch.randn(n, 6, generator=g)
    for head in (fit_head(h, f, present, y), fit_head(None, f, present, y, bias_only=True)):
        pred = predict(head, h, f, present)
        assert (pred[: n // 2] != 4).all()
        assert torch.isinf(head(h if head.W.shape[1] else None, f, present)[: n // 2, 4]).all()
    loud = fixed_head(torch.tensor([0.0, 0.0, 0.0, 0.0, 100.0]))  # a huge bias on E cannot pick an absent E
    pred = predict(loud, None, f, present)
    assert (pred[: n // 2] != 4).all() and (pred[n // 2:] == 4).all()


def test_folds_are_stable_and_about_balanced():
    ids = [f"pubmedqa/{i}" for i in range(2000)]
    folds = folds_of(ids)
    assert torch.equal(folds, folds_of(ids)) and torch.equal(folds_of(ids[::-1]), folds.flip(0))  # per id, not order
    assert folds_of(["pubmedqa/0", "pubmedqa/1", "dental/7", "x"]).tolist() == [2, 3, 2, 1]  # same on every machine
    counts = torch.bincount(folds, minlength=5)
    assert counts.numel() == 5 and (counts - 400).abs().max() < 60
    assert set(folds_of(ids, folds=3).tolist()) == {0, 1, 2}


def test_cross_validation_never_trains_on_the_held_out_fold(monkeypatch):
    """Each fold's head is fitted on exactly the other folds' rows (recorded through fit_head)."""
    n = 60
    ids = [f"r{i}" for i in range(n)]
    folds = folds_of(ids)
    h, f, present, y = _linear_task(n)
    h[:, 0] = torch.arange(n, dtype=torch.float32)  # each row carries its own number
    fitted_rows = []
    real_fit = fit.fit_head

    def spy(hh, *args, **kwargs):
        fitted_rows.append(set(hh[:, 0].long().tolist()))
        return real_fit(hh, *args, **kwargs)

    monkeypatch.setattr(fit, "fit_head", spy)
    cv_accuracy(h, f, present, y, folds)
    expected = [set(torch.nonzero(folds != k).flatten().tolist()) for k in folds.unique().tolist()]
    assert fitted_rows == expected


def test_memorized_training_rows_do_not_score_on_held_out_folds():
    """One private feature per record and random labels: a head fits its training rows perfectly,
    but the held-out rows' features were never seen, so CV accuracy stays near the majority class."""
    n, letters = 100, 4
    y = torch.randint(0, letters, (n,), generator=torch.Generator().manual_seed(0))
    h = torch.eye(n)
    f, present = lm_option_feature(torch.zeros(n, letters)), torch.ones(n, letters, dtype=torch.bool)
    memorizer = fit_head(h, f, present, y, l2=1e-4)
    assert (predict(memorizer, h, f, present) == y).float().mean() == 1.0
    majority = torch.bincount(y).max().item() / n
    assert cv_accuracy(h, f, present, y, folds_of([f"m{i}" for i in range(n)]), l2=1e-4) <= majority + 0.1


def test_a_fixed_bias_is_scored_without_fitting(monkeypatch):
    logprobs, y = _biased_lm(100)
    f, present = lm_option_feature(logprobs), torch.ones_like(logprobs, dtype=torch.bool)
    monkeypatch.setattr(fit, "fit_head", lambda *a, **k: pytest.fail("a fixed bias is not fitted"))
    folds = folds_of([str(i) for i in range(100)])
    zero = cv_accuracy(None, f, present, y, folds, fixed_bias=torch.zeros(4))
    right = cv_accuracy(None, f, present, y, folds, fixed_bias=torch.tensor([-2.0, 0, 0, 0]))
    assert right == pytest.approx(1.0) and zero < 0.7


def test_best_breaks_ties_toward_the_earlier_candidate():
    zero = Candidate("zero-shot", accuracy=0.5)
    calib = Candidate("calibration", accuracy=0.5)
    head = Candidate("head", layer=-1, pooling="last", l2=1e-2, accuracy=0.5 + 1e-9)  # equal to 6 places
    assert best([zero, calib, head]) is zero
    assert best([calib, zero, head]) is calib
    assert best([zero, calib, head], kinds=("head", "calibration")) is calib
    better = Candidate("head", layer=-1, pooling="mean", l2=1e-3, accuracy=0.51)
    assert best([zero, calib, head, better]) is better
    assert best([zero, calib, head, better], kinds=("zero-shot", "calibration")) is zero
    twin = Candidate("zero-shot", accuracy=0.5)  # equal to `zero` field by field: still the earlier one wins
    assert best([zero, twin]) is zero and best([twin, zero]) is twin


def test_score_candidates_and_fit_candidate_on_a_biased_lm():
    logprobs, y = _biased_lm(150)
    n = len(y)
    hidden = torch.randn(n, 3, 6).half()
    features = Features([f"q{i}" for i in range(n)], hidden, hidden, logprobs)
    records = [Record(id=f"q{i}", question="q", answer="ABCD"[int(y[i])], options=("a", "b", "c", "d")) for i in range(n)]
    records.append(Record(id="multi", question="q", answer="AB", options=("a", "b", "c", "d")))
    features = Features(features.ids + ["multi"], torch.cat([hidden, hidden[:1]]), torch.cat([hidden, hidden[:1]]),
                        torch.cat([logprobs, logprobs[:1]]))
    ts = training_set(features, records)
    assert ts.ids == [f"q{i}" for i in range(n)] and ts.letters == 4 and torch.equal(ts.y, y)  # multi-answer left out
    contextual = torch.tensor([-2.0, 0.0, 0.0, 0.0])
    candidates = score_candidates(ts, contextual, layers=[-1], poolings=("last",), lambdas=(1e-2,))
    names = [c.name for c in candidates]
    assert names == ["zero-shot", "calibration(plain)", "calibration(balanced)", "contextual",
                     "head(layer=-1, last, lambda=0.01, plain)", "head(layer=-1, last, lambda=0.01, balanced)"]
    assert candidates[3].accuracy == pytest.approx(1.0) and candidates[0].accuracy < 0.7
    assert best(candidates).kind == "contextual"  # ties with a later perfect head go to the simpler one
    for c in candidates:
        head = fit_candidate(ts, c, contextual)
        assert head.letters == 4 and head.W.shape[1] == (6 if c.kind == "head" else 0)
    assert torch.equal(fit_candidate(ts, candidates[3], contextual).b, contextual)
    assert torch.equal(fit_candidate(ts, candidates[0]).b, torch.zeros(4))
    with pytest.raises(ValueError, match="content-free"):
        fit_candidate(ts, candidates[3], None)
    assert [c.name for c in score_candidates(ts, None, heads=False)] == names[:3]


def test_class_weights_and_default_layers():
    y = torch.tensor([0, 0, 0, 1])
    assert class_weights(y, 3).tolist() == pytest.approx([4 / 6, 2.0, 0.0])
    for total in (3, 13, 25, 31):
        layers = default_layers(total)
        assert layers == sorted(set(layers)) and layers[-1] == total - 1 and len(layers) <= 8
        assert all(total // 4 <= i < total for i in layers)


def test_feature_folders_are_per_source_and_dtype(monkeypatch, tmp_path):
    monkeypatch.setenv("MEDMOE_HOME", str(tmp_path))
    a, b = feature_folder("smollm2-135m", torch.float32), feature_folder("smollm2-135m", torch.bfloat16)
    c = feature_folder("/models/x y/", "float32")
    assert a == tmp_path / "features" / "smollm2-135m-float32" and b.name == "smollm2-135m-bfloat16"
    assert c.parent == tmp_path / "features" and c.name == "models_x_y-float32"


# ---- the CLI -----------------------------------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("extra", [["--model", "smollm2-135m"], ["--adapter", "a"], ["--router", "r"],
                                   ["--rule", "loglik"], ["--shots", "1"]])
def test_eval_head_refuses_a_model_of_its_own(tmp_path, extra):
    from medmoe.cli import app

    result = runner.invoke(app, ["eval", "--head", str(tmp_path), *extra, "-o", str(tmp_path / "out")], terminal_width=300)
    assert result.exit_code == 2, result.output
    assert "--head names its expert" in result.output and "no --model/--adapter/--router" in result.output
    assert not (tmp_path / "out").exists()


def test_heads_train_refuses_an_unknown_family(tmp_path):
    from medmoe.cli import app

    result = runner.invoke(app, ["heads", "train", "--data", "pubmedqa", "-o", str(tmp_path / "h"), "--family", "oracle"],
                           terminal_width=300)
    assert result.exit_code == 2 and "--family" in result.output and not (tmp_path / "h").exists()
