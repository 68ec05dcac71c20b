"""Training examples for fine-tuning: load, format as (prompt, completion), tokenize, batch.

`--data` accepts a bundled dataset name (its train split, through `medmoe.data.load_dataset`), a
JSONL file whose lines are {"prompt", "completion"} or {"text"}, or any record file medmoe.data reads.
Records become the evaluation prompt plus the gold answer's continuation.
The loss covers the completion tokens only (prompt labels are -100).

Batches are a pure function of (seed, micro-batch index, rank, world size), so a resumed or a
data-parallel run sees exactly the examples an uninterrupted single-process run sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from medmoe.errors import DataError

LETTERS = "ABCDEFGHIJ"


@dataclass
class Example:
    prompt: str
    completion: str


def format_record(question: str, answer: str, options=None, context: str | None = None) -> Example:
    """A plain prompt for raw question/answer pairs: context, question, lettered options, "Answer:"."""
    parts = []
    if context:
        parts.append(f"Context: {context.strip()}")
    parts.append(f"Question: {question.strip()}")
    if options:
        parts.append("Options:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options)))
    parts.append("Answer:")
    return Example("\n".join(parts), f" {answer.strip()}")


def example_from_record(record, tokenizer, with_explanation: bool = False) -> Example:
    """The evaluation prompt (medmoe.eval.prompts) followed by the gold continuation, so training
    teaches exactly what option scoring measures; open-ended records complete with the reference.
    with_explanation: multiple-choice completions go on with a new line and the record's explanation
    (when it has one), so the model also keeps writing text, not only option letters."""
    from medmoe.eval.prompts import build_prompt

    if not record.options:
        return format_record(record.question, record.answer, None, record.context)
    prompt = build_prompt(record, tokenizer)
    if record.is_multi_answer:  # scored letter by letter; train on all gold letters
        first = prompt.continuations[record.gold_indices[0]]
        completion = first[: len(first) - 1] + record.answer
    else:
        completion = prompt.continuations[record.gold_indices[0]]
    if with_explanation and record.explanation:
        completion += "\n" + record.explanation.strip()
    return Example(prompt.context, completion)


def _example_from_json(obj: dict, path: Path, line: int) -> Example | None:
    if "prompt" in obj and "completion" in obj:
        return Example(str(obj["prompt"]), str(obj["completion"]))
    if "text" in obj:
        return Example("", str(obj["text"]))
    return None


def load_examples(spec: str, tokenizer=None, split: str = "train", with_explanation: bool = False) -> list[Example]:
    """Examples from a bundled dataset name (its train split), a prompt/completion or text JSONL file,
    or any record file medmoe.data reads (JSONL/JSON/CSV with question and answer fields).
    with_explanation: see example_from_record (records only, with a tokenizer)."""
    path = Path(spec)
    if path.is_file() and path.suffix == ".jsonl":
        examples: list[Example] = []
        record_file = False
        for i, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise DataError.single(path, f"not valid JSON ({exc.msg})", line=i) from exc
            example = _example_from_json(obj, path, i)
            if example is None:  # a record file: let medmoe.data read and validate it
                record_file = True
                break
            examples.append(example)
        if not record_file:
            if not examples:
                raise DataError.single(path, "no examples in file")
            return examples
    from medmoe.data import load_dataset

    records = load_dataset(spec, split=split)
    if not records:
        raise DataError.single(spec, f"no records in split '{split}'")
    if tokenizer is None:
        return [format_record(r.question, r.answer, r.options, r.context) for r in records]
    return [example_from_record(r, tokenizer, with_explanation) for r in records]


def select_examples(examples: list[Example], skip_first: int = 0, limit: int = 0) -> list[Example]:
    """Leave out the first `skip_first` examples (held out for something else, e.g. the MambaFormer
    gate, which trains on the first records of the same split), then keep at most `limit` (0 = all)."""
    if skip_first >= len(examples):
        raise DataError.single("training data", f"leaving out the first {skip_first} examples leaves none of the {len(examples)}")
    chosen = examples[skip_first:]
    return chosen[:limit] if limit > 0 else chosen


def tokenize_examples(examples: list[Example], tokenizer, max_length: int, seq2seq: bool = False) -> list[dict]:
    """input_ids and labels per example (prompt labels -100, EOS appended, prompt truncated on the left).
    A completion longer than the window is cut on the right so that the prompt keeps at least half
    of the window (or all of itself, when shorter): a completion with no prompt teaches nothing.
    seq2seq (T5 family): input_ids are the prompt for the encoder (with the tokenizer's special
    tokens, T5's closing </s>), labels the completion for the decoder (no separator space), each at
    most max_length tokens."""
    features = []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for ex in examples:
        if seq2seq:
            prompt = tokenizer(ex.prompt, add_special_tokens=True)["input_ids"]
            completion = tokenizer(ex.completion.removeprefix(" "), add_special_tokens=False)["input_ids"] + eos
            features.append({"input_ids": prompt[-max_length:], "labels": completion[:max_length]})
            continue
        prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] if ex.prompt else []
        completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"] + eos
        completion = completion[: max_length - min(len(prompt), max_length // 2)]
        prompt = prompt[max(0, len(prompt) - (max_length - len(completion))):]
        features.append({"input_ids": prompt + completion, "labels": [-100] * len(prompt) + completion})
    return features


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; padding has attention 0 and label -100. Labels are padded
    to their own longest (for a decoder-only model that is the same width as input_ids; for an
    encoder-decoder model they are the decoder's targets)."""
    width = max(len(f["input_ids"]) for f in features)
    label_width = max(len(f["labels"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), label_width), -100, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):  # loop over examples (not tokens) to build the batch
        n = len(f["input_ids"])
        ids[row, :n] = torch.tensor(f["input_ids"])
        labels[row, : len(f["labels"])] = torch.tensor(f["labels"])
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class MicroBatches:
    """Deterministic stream of micro-batches: epoch e visits a permutation seeded by (seed, e).

    Global micro-batch m holds stream positions [m * B * W, (m + 1) * B * W) with B the per-rank
    micro-batch size and W the world size; rank r takes the r-th slice of B.
    """

    def __init__(self, features: list[dict], micro_batch_size: int, seed: int, pad_id: int, rank: int = 0, world: int = 1):
        if not features:
            raise DataError.single("<training data>", "no training examples")
        self.features, self.size, self.seed, self.pad_id = features, micro_batch_size, seed, pad_id
        self.rank, self.world = rank, world
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms[epoch] = torch.randperm(len(self.features), generator=torch.Generator().manual_seed(self.seed * 1000 + epoch))
        return self._perms[epoch]

    def indices(self, micro_index: int) -> list[int]:
        n = len(self.features)
        start = (micro_index * self.world + self.rank) * self.size
        positions = range(start, start + self.size)
        return [int(self._perm(p // n)[p % n]) for p in positions]

    def batch(self, micro_index: int) -> dict[str, torch.Tensor]:
        return collate([self.features[i] for i in self.indices(micro_index)], self.pad_id)

    def epoch_of(self, micro_index: int) -> float:
        return (micro_index + 1) * self.size * self.world / len(self.features)
