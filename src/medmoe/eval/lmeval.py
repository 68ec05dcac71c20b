"""medmoe models inside lm-evaluation-harness: the `medmoe` lm-eval model, and a task exporter.

Importing this module registers `medmoe` in lm-eval's model registry. lm-eval 0.4 has no plugin
entry point for outside models, so its stock `lm_eval` command cannot see it; the `medmoe-lm-eval`
command (`python -m medmoe.eval.lmeval`) is lm-eval's own CLI with medmoe registered:

  medmoe-lm-eval --model medmoe --model_args model=smollm2-135m[,adapter=PATH] \\
      --tasks medmoe_dental --include_path DIR

`export_task(benchmark, DIR)` writes DIR/<task>.jsonl (our prompts, verbatim) and DIR/<task>.yaml,
a local multiple_choice task over it, so lm-eval scores exactly the prompts and options medmoe
scores: that is how `tests/test_lmeval.py` checks that our loglik / loglik-norm accuracies equal
lm-eval's acc / acc_norm.
"""

from __future__ import annotations

import json
from itertools import groupby
from pathlib import Path
from typing import Any

import lm_eval.models  # noqa: F401  (lm-eval's own models register lazily only into an empty registry)
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from medmoe.eval.benchmarks import load_benchmark
from medmoe.eval.model import EvalModel, load_eval_model
from medmoe.eval.prompts import build_prompt

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


@register_model("medmoe")
class MedmoeLM(LM):
    """An lm-eval model backed by any medmoe EvalModel (plain, LoRA adapter, later routed/LoRA-MoE)."""

    def __init__(self, model: str = "smollm2-135m", adapter: str | None = None, eval_model: EvalModel | None = None, **_: Any):
        super().__init__()
        self.eval_model = eval_model or load_eval_model(model, adapter)

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy); requests sharing a context share its forward."""
        pairs = [req.args for req in requests]
        results: list[tuple[float, bool]] = []
        for context, group in groupby(pairs, key=lambda pair: pair[0]):
            continuations = [cont for _, cont in group]
            scores = self.eval_model.score_options(context, continuations)
            results += [(lp, False) for lp in scores.logprobs]
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError("medmoe scores options and generates; perplexity tasks are not supported")

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
