"""medmoe models inside lm-evaluation-harness: the `medmoe` lm-eval model, and a task exporter.

Importing this module registers `medmoe` in lm-eval's model registry. lm-eval 0.4.13 has no plugin
entry point for outside models (its registry accepts lazy "module:Class" placeholders, but only for
the models listed in lm_eval/models/__init__.py; nothing reads package entry points), so its stock
`lm_eval` command cannot see it; the `medmoe-lm-eval` command (`python -m medmoe.eval.lmeval`) is
lm-eval's own CLI with medmoe registered:

  medmoe-lm-eval --model medmoe --model_args model=smollm2-135m[,adapter=PATH][,dtype=bfloat16] \\
      --tasks medmoe_dental --include_path DIR --device cpu --batch_size 8

model_args (besides lm-eval's --batch_size and --device, which arrive the same way):
  model       a bundled name, hub id or local folder (medmoe.models.load_causal_lm)
  adapter     a `medmoe finetune` adapter (LoRA-MoE, PEFT LoRA) or full fine-tune on top of it
  dtype       float32 (the default), bfloat16, float16 (or fp32 / bf16 / fp16), or auto (bfloat16 where the
              device computes it natively): medmoe's one parser, models/placement.py; passed to the loader
  max_length  the window for long inputs and rolling windows (default: the model's config, as lm-eval's hf)
  batch_size  rows per forward pass (an integer; lm-eval's "auto" is refused)
  device      where the model is loaded; none, or CUDA on a machine without it: cuda if available, else cpu

Requests, as lm-eval's `hf` model answers them (lm_eval/models/huggingface.py), for causal LMs
(plain, PEFT LoRA, LoRA-MoE, Mamba hybrids): `token_loglikelihoods` runs (context + continuation)
rows through the model `batch_size` at a time (right-padded, longest first) and returns each row's
summed log-probability with `is_greedy` (every continuation token is the argmax at its position);
`loglikelihood_rolling` sums the token log-probs of a whole string over lm-eval's disjoint windows of
`max_length` tokens (the first conditioned on the BOS, else EOS, token). Tokenization is medmoe's
(`encode_pair`, `bos_ids`: lm-eval's rule), so scores equal `medmoe eval`'s up to float rounding.
An EvalModel without a causal HF network (encoder-decoder, or another system passed as eval_model)
scores through its own score_batch / score_options (batch_size contexts per score_batch call); its
is_greedy is then False (that path gives no per-token argmax) and it has no rolling loglikelihood.

`export_task(benchmark, DIR)` writes DIR/<task>.jsonl (our prompts, verbatim) and DIR/<task>.yaml,
a local multiple_choice task over it, so lm-eval scores exactly the prompts and options medmoe
scores: that is how `tests/test_lmeval.py` checks that our loglik / loglik-norm accuracies equal
lm-eval's acc / acc_norm.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from itertools import groupby
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models register lazily only into an empty registry)
import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import resolve_max_length
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from medmoe.errors import ModelError
from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.model import EvalModel, HFEvalModel, load_eval_model
from medmoe.eval.prompts import build_prompt
from medmoe.eval.scoring import accepts_logits_to_keep, bos_ids, encode_pair, is_encoder_decoder
from medmoe.loramoe import LoraMoeModel
from medmoe.models import placement

log = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's hf default, for a model whose config names no window

TokenPair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{gold}}}}"
target_delimiter: " "
metric_list:
  - metric: acc
  - metric: acc_norm
"""


def resolve_device(device: str | None) -> str:
    """lm-eval's rule (its CLI passes cuda:0 unless told otherwise) through medmoe's one parser
    (models.placement: auto, cpu, mps, cuda, cuda:N; anything else is a ModelError naming the choices):
    the device asked for; none or auto gives cuda when available, else cpu; CUDA on a machine without
    it falls back to cpu with a warning."""
    if device is None:
        return placement.resolve_device("auto")
    name = placement.parse_device(device)
    if name.startswith("cuda") and not torch.cuda.is_available():
        log.warning("device %s: CUDA is not available, using cpu", device)
        return "cpu"
    return placement.resolve_device(name)


def resolve_dtype(dtype: str | torch.dtype | None, device: str = "cpu") -> torch.dtype | None:
    """A torch dtype from a model_arg, through medmoe's one parser (float32, bfloat16, float16, their
    aliases fp32 / bf16 / fp16, a "torch." prefix, and auto: bfloat16 where `device` computes it
    natively, else float32); None: the loader's float32."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    return placement.torch_dtype(placement.resolve_dtype(placement.parse_dtype(dtype), device))


def resolve_batch_size(batch_size: int | str | None) -> int:
    """A positive integer from lm-eval's --batch_size (which may come as a string)."""
    if batch_size is None:
        return 1
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        raise ModelError(f"batch_size={batch_size}: the medmoe lm-eval model needs a number (it does not search for one)")
    try:
        value = int(batch_size)
    except ValueError:
        raise ModelError(f"batch_size={batch_size!r}: not an integer") from None
    if value < 1:
        raise ModelError(f"batch_size={value}: must be >= 1")
    return value


def load_lm_eval_model(model: str, adapter: str | None = None, device: str = "cpu", dtype: torch.dtype | None = None) -> EvalModel:
    """`load_eval_model` with the loader's device and dtype (the routed system is refused as there)."""
    if model.startswith("routed:"):
        return load_eval_model(model, adapter)  # raises, with the pointer to `medmoe eval --router`
    from medmoe.models import load_causal_lm

    network, tokenizer = load_causal_lm(model, dtype=dtype, device=device, adapter=adapter)
    return HFEvalModel(network, tokenizer, model if adapter is None else f"{model}+{Path(adapter).name}")


def hf_network(model: Any) -> Any:
    """The Hugging Face model under a LoRA-MoE or PEFT wrapper (for its config)."""
    if isinstance(model, LoraMoeModel):
        model = model.model
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@torch.inference_mode()
def token_loglikelihoods(model: Any, rows: Sequence[TokenPair], batch_size: int = 1, max_length: int = DEFAULT_MAX_LENGTH,
                         pad_id: int = 0) -> list[tuple[float, bool]]:
    """For each (context ids, continuation ids) of a causal LM: (sum_j log p(c_j | context, c_<j),
    whether every c_j is the argmax of its position), as lm-eval's hf model computes them.

    The model reads (context + continuation)[-(max_length + 1):][:-1] (a long context loses its start);
    batch_size rows run as one right-padded batch, longest first (little padding), so each row's
    logits are an unbatched run's up to float reduction order. The LM head runs only from the first
    position that predicts a continuation token (where the model takes logits_to_keep).
    """
    device = next(model.parameters()).device
    results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)  # an empty continuation: nothing to predict
    for context, continuation in rows:
        if len(continuation) > max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens does not fit the window of {max_length}")
        if not context and continuation:
            raise ValueError("a continuation needs at least one context token (BOS) to be predicted from")
    inputs = [(list(ctx) + list(cont))[-(max_length + 1):][:-1] for ctx, cont in rows]
    order = sorted((i for i, (_, cont) in enumerate(rows) if cont), key=lambda i: -len(inputs[i]))
    keep_logits = accepts_logits_to_keep(model)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = len(inputs[chunk[0]])  # the longest: rows come longest first
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, : len(inputs[i])] = torch.tensor(inputs[i])
            mask[row, : len(inputs[i])] = 1
        first = min(len(inputs[i]) - len(rows[i][1]) for i in chunk)  # the first position that predicts a continuation token
        kwargs = {"logits_to_keep": width - first} if keep_logits else {}
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False, **kwargs).logits
        offset = width - logits.shape[1]  # logits[:, p - offset] is position p
        for row, i in enumerate(chunk):
            target = torch.tensor(list(rows[i][1]), device=device)  # (m,)
            end = len(inputs[i]) - offset
            logp = torch.log_softmax(logits[row, end - len(target): end].float(), dim=-1)  # (m, V): position j predicts c_j
            results[i] = (float(logp.gather(-1, target[:, None]).sum()), bool((logp.argmax(dim=-1) == target).all()))
    return results


@register_model("medmoe")
class MedmoeLM(LM):
    """An lm-eval model backed by any medmoe EvalModel (plain, LoRA adapter, LoRA-MoE, Mamba hybrid).

    eval_model: an EvalModel already loaded (then model, adapter, device and dtype are not used).
    """

    def __init__(self, model: str = "smollm2-135m", adapter: str | None = None, eval_model: EvalModel | None = None,
                 batch_size: int | str | None = 1, device: str | None = None, dtype: str | torch.dtype | None = None,
                 max_length: int | str | None = None, max_batch_size: int | None = None, **unused: Any):
        super().__init__()
        if unused:
            log.warning("medmoe lm-eval model: ignoring model_args %s", ", ".join(sorted(unused)))
        self.batch_size = resolve_batch_size(batch_size)
        if eval_model is None:
            where = resolve_device(device)
            eval_model = load_lm_eval_model(model, adapter, where, resolve_dtype(dtype, where))
        self.eval_model = eval_model
        self._max_length = int(max_length) if max_length else None
        network = self.causal_network
        self._device = next(network.parameters()).device if network is not None else torch.device("cpu")

    @property
    def tokenizer(self) -> Any:
        return self.eval_model.tokenizer

    @property
    def causal_network(self) -> Any:
        """The EvalModel's causal LM (a torch module), or None (encoder-decoder, or a system without one)."""
        network = getattr(self.eval_model, "model", None)
        if not isinstance(network, torch.nn.Module) or is_encoder_decoder(hf_network(network)):
            return None
        return network

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        config = getattr(hf_network(self.causal_network), "config", None)
        return resolve_max_length(config, self.tokenizer, default=DEFAULT_MAX_LENGTH)

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and a rolling string's first window) is conditioned on: BOS, else EOS (lm-eval's rule)."""
        tokenizer = self.tokenizer
        return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        tokenizer = self.tokenizer
        for token in (tokenizer.pad_token_id, tokenizer.eos_token_id):
            if token is not None:
                return token
        return 0

    def encode(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids with BOS when the tokenizer adds one, continuation ids), medmoe's (= lm-eval's)
        tokenization; an empty context is the prefix token, as lm-eval's hf model does it."""
        if context == "":
            ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"]
            prefix = self.prefix_token_id
            return ([prefix], ids) if not ids or ids[0] != prefix else (ids[:1], ids[1:])
        ctx, cont = encode_pair(self.tokenizer, context, continuation)
        return (bos_ids(self.tokenizer, ctx) + ctx) or [self.prefix_token_id], cont

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request."""
        pairs = [tuple(req.args) for req in requests]
        network = self.causal_network
        if network is None:
            results = self._option_loglikelihoods(pairs)
        else:
            rows = [self.encode(context, continuation) for context, continuation in pairs]
            results = token_loglikelihoods(network, rows, self.batch_size, self.max_length, self.pad_token_id)
        for pair, result in zip(pairs, results):
            self.cache_hook.add_partial("loglikelihood", pair, result)
        return results

    def _option_loglikelihoods(self, pairs: list[tuple[str, str]]) -> list[tuple[float, bool]]:
        """Through the EvalModel's own scoring: requests sharing a context are one question; batch_size
        questions go to score_batch at once (score_options one by one for batch_size 1). No argmax here."""
        questions = [(context, [cont for _, cont in group]) for context, group in groupby(pairs, key=lambda pair: pair[0])]
        score_batch = getattr(self.eval_model, "score_batch", None)
        results: list[tuple[float, bool]] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start:start + self.batch_size]
            if self.batch_size > 1 and score_batch is not None:
                scores = score_batch(chunk)
            else:
                scores = [self.eval_model.score_options(context, conts) for context, conts in chunk]
            results += [(lp, False) for score in scores for lp in score.logprobs]
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """log p(string), summed over lm-eval's disjoint windows of max_length tokens (perplexity tasks)."""
        network = self.causal_network
        if network is None:
            raise NotImplementedError(f"{self.eval_model.name}: rolling loglikelihood needs a causal LM")
        windows: list[TokenPair] = []
        owners: list[int] = []
        for n, req in enumerate(requests):
            (string,) = req.args
            tokens = self.tokenizer(string, add_special_tokens=False)["input_ids"]
            for window in get_rolling_token_windows(tokens, self.prefix_token_id, self.max_length, context_len=1):
                windows.append(make_disjoint_window(window))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, token_loglikelihoods(network, windows, self.batch_size, self.max_length, self.pad_token_id)):
            totals[n] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", tuple(req.args), total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for req in requests:
            context, gen_kwargs = req.args
            text = self.eval_model.generate(context, int(gen_kwargs.get("max_gen_toks", 32))).text
            for stop in gen_kwargs.get("until", []) or []:
                text = text.split(stop)[0]
            outputs.append(text)
        return outputs


def export_task(benchmark: str, folder: Path, tokenizer: Any, rule_kind: str = "text", limit: int | None = None,
                task: str | None = None) -> str:
    """Write a local lm-eval task over `benchmark` with medmoe's prompts; returns the task name.

    The prompt is our build_prompt context; lm-eval joins it to each choice with a space, which is
    exactly our plain-style continuation " option" (chat-style prompts score options without a
    space, so they are exported for plain tokenizers only).
    """
    bench = load_benchmark(benchmark, limit)
    task = task or "medmoe_" + benchmark.replace("-", "_")
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{task}.jsonl"
    with data.open("w", encoding="utf-8") as sink:
        for record in bench.records:
            prompt = build_prompt(record, tokenizer, (), rule_kind, bench.multi)
            if not all(c.startswith(" ") for c in prompt.continuations):
                raise ValueError("export_task needs a plain (non-chat) prompt style")
            gold = prompt.labels.index(record.answer[0])
            row = {"id": record.id, "prompt": prompt.context, "choices": [c[1:] for c in prompt.continuations], "gold": gold}
            sink.write(json.dumps(row, ensure_ascii=False) + "\n")
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(task=task, data=data.resolve()), encoding="utf-8")
    return task


def main() -> None:
    """lm-eval's command line, with the `medmoe` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
