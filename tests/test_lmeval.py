"""lm-evaluation-harness integration: medmoe as an lm-eval model, and accuracy agreement.

A local task over bundled data (our prompts, exported verbatim) is scored by lm-eval's own `hf`
model and by medmoe's harness on the same tiny model: loglik accuracy must equal lm-eval's acc and
loglik-norm must equal acc_norm, example for example; the `medmoe` lm-eval model returns hf's
(log-likelihood, is_greedy) for every option. Then the model's own calls: is_greedy against the
argmax, rolling log-likelihood against a direct computation, batch_size > 1 against 1, and the
model_args (dtype, device, batch_size).
"""

import json
from types import SimpleNamespace

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

from medmoe.errors import ModelError  # noqa: E402
from medmoe.eval.benchmarks import load_benchmark  # noqa: E402
from medmoe.eval.harness import evaluate  # noqa: E402
from medmoe.eval.model import HFEvalModel, load_eval_model  # noqa: E402
from medmoe.eval.scoring import OptionScores  # noqa: E402
from tiny_lm import tiny_llama, tiny_tokenizer  # noqa: E402

LIMIT = 12


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    text = " ".join(r.question + " " + " ".join(r.options) for r in load_benchmark("dental", LIMIT).records)
    tokenizer = tiny_tokenizer(extra_text=text)
    tiny_llama(vocab=len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def lm_eval_samples(model, model_args, task, include, batch_size=1):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=TaskManager(include_path=str(include)),
                          device="cpu", batch_size=batch_size, log_samples=True)
    samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
    return out["results"][task], samples


def test_option_likelihood_accuracy_equals_lm_eval(tmp_path, tiny_dir, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from medmoe.eval.lmeval import export_task

    model = load_eval_model(str(tiny_dir))
    task = export_task("dental", tmp_path / "tasks", model.tokenizer, "text", LIMIT)
    ours = {}
    for rule in ("loglik", "loglik-norm"):
        result = evaluate(model, ["dental"], tmp_path / rule, rule, limit=LIMIT)
        ours[rule] = result["benchmarks"]["dental"]["accuracy"]
    rows = [json.loads(line) for line in (tmp_path / "loglik" / "dental" / "predictions.jsonl").read_text().splitlines()]

    hf_results, hf_samples = lm_eval_samples("hf", f"pretrained={tiny_dir}", task, tmp_path / "tasks")
    assert len(hf_samples) == LIMIT
    assert ours["loglik"] == pytest.approx(hf_results["acc,none"])
    assert ours["loglik-norm"] == pytest.approx(hf_results["acc_norm,none"])
    for row, sample in zip(rows, hf_samples):  # per example, per option
        theirs = [resp[0][0] for resp in sample["resps"]]
        assert list(row["scores"].values()) == pytest.approx(theirs, abs=1e-3)

    mm_results, mm_samples = lm_eval_samples("medmoe", f"model={tiny_dir}", task, tmp_path / "tasks", batch_size=3)
    assert mm_results["acc,none"] == pytest.approx(hf_results["acc,none"])
    assert mm_results["acc_norm,none"] == pytest.approx(hf_results["acc_norm,none"])
    for ours_sample, hf_sample in zip(mm_samples, hf_samples):  # per option: hf's log-likelihood and is_greedy
        assert [r[0][0] for r in ours_sample["resps"]] == pytest.approx([r[0][0] for r in hf_sample["resps"]], abs=1e-4)
        assert [r[0][1] for r in ours_sample["resps"]] == [r[0][1] for r in hf_sample["resps"]]


# --- the model's calls, on a tiny model in memory ---------------------------------------------------

TEXT = "the patient has fever and cough . which drug is best ? aspirin or heparin , rest or surgery"


def request(*args):
    return SimpleNamespace(args=args)  # what the model reads of an lm-eval Instance


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer()
    return tiny_llama(vocab=len(tokenizer)), tokenizer


def medmoe_lm(tiny, **kwargs):
    from medmoe.eval.lmeval import MedmoeLM

    model, tokenizer = tiny
    return MedmoeLM(eval_model=HFEvalModel(model, tokenizer), **kwargs)


def greedy_ids(model, ids, n):
    """The n tokens greedy decoding appends to ids (argmax of a plain forward, one token at a time)."""
    ids = list(ids)
    for _ in range(n):
        with torch.no_grad():
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[-n:]


def direct_logprob(model, inputs, targets):
    """sum log p(targets | inputs) from one plain forward over inputs + targets[:-1]."""
    with torch.no_grad():
        logits = model(torch.tensor([list(inputs) + list(targets[:-1])])).logits[0]
    logp = torch.log_softmax(logits[len(inputs) - 1:].float(), dim=-1)
    return float(logp.gather(-1, torch.tensor(targets)[:, None]).sum())


def test_is_greedy_is_the_per_token_argmax(tiny):
    from medmoe.eval.lmeval import token_loglikelihoods

    model, tokenizer = tiny
    context = tokenizer("the patient has fever and", add_special_tokens=False)["input_ids"]
    greedy = greedy_ids(model, context, 3)
    other = next(t for t in range(len(tokenizer)) if t != greedy[1])  # not the argmax after greedy[0]
    rows = [(context, greedy), (context, greedy[:1]), (context, [greedy[0], other]), (context, [other, *greedy[1:]])]
    results = token_loglikelihoods(model, rows)
    assert [flag for _, flag in results] == [True, True, False, False]
    for (ctx, cont), (logprob, _) in zip(rows, results):
        assert logprob == pytest.approx(direct_logprob(model, ctx, cont), abs=1e-5)

    # the same through lm-eval's call, from text: a context whose greedy words read back as the same tokens
    lm = medmoe_lm(tiny)
    for words in ("the patient has", "which drug is best ?", "Question : the patient", "fever and cough"):
        greedy = greedy_ids(model, lm.encode(words, " x")[0], 2)
        continuation = " " + tokenizer.decode(greedy)
        if lm.encode(words, continuation)[1] == greedy:
            break
    else:
        pytest.skip("no context whose greedy continuation survives decode + encode")
    word = next(w for w in ("aspirin", "heparin") if tokenizer.convert_tokens_to_ids(w) != greedy[1])
    wrong = " " + tokenizer.decode(greedy[:1]) + " " + word  # the first token greedy, the second not
    assert lm.encode(words, wrong)[1] == [greedy[0], tokenizer.convert_tokens_to_ids(word)]
    (lp_greedy, flag_greedy), (_, flag_wrong) = lm.loglikelihood([request(words, continuation), request(words, wrong)])
    assert flag_greedy and not flag_wrong
    assert lp_greedy == pytest.approx(direct_logprob(model, lm.encode(words, continuation)[0], greedy), abs=1e-5)


def direct_rolling(model, tokens, prefix, window):
    """log p(tokens) with each token predicted once, from lm-eval's windows: token j (position j + 1 of
    [prefix] + tokens) is scored in the first window that reaches it, which reads the `window` positions
    before that window's end; written out from the docs (lm_eval.api.model.LM.loglikelihood_rolling)."""
    full, total, done = [prefix, *tokens], 0.0, 0
    while done < len(tokens):
        end = min(done + window, len(tokens))  # this window predicts tokens[done:end] = full[done + 1:end + 1]
        start = max(end - window, 0)
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([full[start:end]])).logits[0].float(), dim=-1)
        for j in range(done, end):
            total += float(logp[j - start, full[j + 1]])
        done = end
    return total


@pytest.mark.parametrize("window", [None, 5])
def test_rolling_loglikelihood_equals_a_direct_computation(tiny, window):
    model, tokenizer = tiny
    lm = medmoe_lm(tiny, max_length=window)
    tokens = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert lm.prefix_token_id == tokenizer.bos_token_id
    (ours,) = lm.loglikelihood_rolling([request(TEXT)])
    if window is None:  # the model's whole window (512 positions): one forward over [BOS] + tokens
        assert lm.max_length == 512
        assert ours == pytest.approx(direct_logprob(model, [tokenizer.bos_token_id], tokens), abs=1e-4)
    else:
        assert len(tokens) > 2 * window  # several windows, each token once
        assert ours == pytest.approx(direct_rolling(model, tokens, tokenizer.bos_token_id, window), abs=1e-4)
        assert ours != pytest.approx(direct_logprob(model, [tokenizer.bos_token_id], tokens), abs=1e-3)
    assert lm.loglikelihood_rolling([request("")]) == [0.0]


def test_batch_size_gives_the_numbers_of_batch_size_one(tiny):
    words = TEXT.split()
    requests = [request(" ".join(words[:n]), " " + " ".join(words[n:n + k])) for n, k in ((2, 1), (5, 3), (9, 1), (3, 6), (12, 2), (1, 1))]
    requests.append(request("", "the patient"))  # an empty context: the BOS
    strings = [request(" ".join(words[:n])) for n in (3, 17, 8)]
    one = medmoe_lm(tiny, batch_size=1, max_length=6)
    single, rolling = one.loglikelihood(requests), one.loglikelihood_rolling(strings)
    for batch_size in (2, 3, 16):
        lm = medmoe_lm(tiny, batch_size=batch_size, max_length=6)
        batched = lm.loglikelihood(requests)
        assert [lp for lp, _ in batched] == pytest.approx([lp for lp, _ in single], abs=1e-5)
        assert [flag for _, flag in batched] == [flag for _, flag in single]
        assert lm.loglikelihood_rolling(strings) == pytest.approx(rolling, abs=1e-5)


class ScoreOnly:
    """An EvalModel without a causal network: it scores options, nothing else."""

    name, tokenizer = "score-only", None

    def __init__(self):
        self.batches = []

    def score_options(self, context, continuations):
        return self.score_batch([(context, continuations)])[0]

    def score_batch(self, requests):
        self.batches.append(len(requests))
        return [OptionScores([-float(len(c)) for c in conts], [1] * len(conts), [1] * len(conts), 1) for _, conts in requests]


def test_a_model_without_a_causal_network_batches_through_score_batch():
    from medmoe.eval.lmeval import MedmoeLM

    system = ScoreOnly()
    lm = MedmoeLM(eval_model=system, batch_size=2)
    requests = [request("q1", " a"), request("q1", " bb"), request("q2", " ccc"), request("q3", " d")]
    assert lm.loglikelihood(requests) == [(-2.0, False), (-3.0, False), (-4.0, False), (-2.0, False)]
    assert system.batches == [2, 1]  # three questions (requests sharing a context), two at a time
    with pytest.raises(NotImplementedError, match="causal LM"):
        lm.loglikelihood_rolling([request("text")])


def test_model_args_reach_the_loader(tiny_dir):
    from medmoe.eval.lmeval import MedmoeLM, resolve_device

    lm = MedmoeLM.create_from_arg_string(f"model={tiny_dir},dtype=bfloat16", {"batch_size": "4", "device": "cpu"})
    assert lm.batch_size == 4
    assert lm.device == torch.device("cpu")
    assert next(lm.eval_model.model.parameters()).dtype == torch.bfloat16
    if not torch.cuda.is_available():  # lm-eval's CLI passes cuda:0 unless told otherwise
        assert resolve_device("cuda:0") == "cpu"
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(ModelError, match="dtype 'int8': choose one of auto, float32, bfloat16, float16"):
        MedmoeLM(model=str(tiny_dir), dtype="int8")
    with pytest.raises(ModelError, match="gpu"):
        resolve_device("gpu")
    from medmoe.eval.lmeval import resolve_dtype

    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("torch.float16") == torch.float16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    with pytest.raises(ModelError, match="batch_size=auto"):
        MedmoeLM(model=str(tiny_dir), batch_size="auto")
