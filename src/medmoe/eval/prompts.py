"""Prompts: how a Record (and its few-shot examples) becomes model input.

One prompt text per record, shared by every scoring rule; only the continuations differ:
  letter     the option letters "A", "B", ... (yes/no/maybe questions: the words themselves)
  loglik     the option texts (yes/no/maybe questions: the words)
  generate   nothing: the model writes after the prompt and the extractor reads the answer

Two styles, chosen by the tokenizer:
  chat  (the model has a chat template, e.g. SmolLM2-Instruct): instruction, shots and question go in
        one user turn; continuations are scored right after the assistant header with no leading
        space ("yes", "A"); " yes" with a space is a different token and gives nonsense scores there.
  plain (base models, e.g. Gemma-3-270M): "...\\nAnswer:" and continuations with a leading space.

explain=True appends EXPLAIN to the instruction ("...option. Then explain your answer briefly."): the
prompt of generated explanations (benchmarks/mambaformer_generative.py); always with kind "none".

The instruction never depends on the gold answer: whether several answers may be given comes from
the benchmark (CMExam: yes) or the question's own type (CMB-Exam's 多项选择题), not from the key.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from medmoe.data.record import Record

INSTRUCTIONS = {
    "en": {
        "yesno": "Answer the question with yes, no or maybe.",
        "choice": "Answer with the letter of the correct option.",
        "multi": "Answer with the letter(s) of the correct option(s); there may be more than one.",
        "open": "Answer the question.",
    },
    "zh": {
        "yesno": "请用是、否或可能回答问题。",
        "choice": "请回答正确选项的字母。",
        "multi": "请回答正确选项的字母，正确选项可能不止一个。",
        "open": "请根据病例回答问题。",
    },
}
EXPLAIN = {"en": "Then explain your answer briefly.", "zh": "然后简要解释原因。"}
LABELS = {"en": ("Context", "Question", "Answer"), "zh": ("病例", "问题", "答案")}
CONTINUATION_KINDS = ("letter", "text", "none")


def language_of(record: Record) -> str:
    text = record.question + "".join(record.options)
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def is_yesno(record: Record) -> bool:
    return record.options == ("yes", "no", "maybe")


def may_have_several_answers(record: Record, benchmark_multi: bool = False) -> bool:
    """From the question's declared type (CMB-Exam) or the benchmark, never from the gold answer."""
    question_type = str(record.metadata.get("question_type") or "")
    if question_type:
        return "多项" in question_type or "multiple" in question_type.lower()
    return benchmark_multi


def gold_in_words(record: Record, kind: str) -> str:
    """How a shot's answer is shown: letters for letter/generate prompts, option text for loglik."""
    if is_yesno(record):
        return record.options[record.gold_indices[0]]
    if not record.is_choice:
        return record.answer
    return record.answer_text if kind == "text" else record.answer


def question_block(record: Record, answer: str | None = None) -> str:
    """The question as text: context, question, lettered options (not for yes/no/maybe), answer."""
    context_label, question_label, answer_label = LABELS[language_of(record)]
    parts = []
    if record.context:
        parts.append(f"{context_label}: {record.context}")
    parts.append(f"{question_label}: {record.question}")
    if record.options and not is_yesno(record):
        parts += [f"{letter}. {text}" for letter, text in zip(record.letters, record.options)]
    if answer is not None:
        parts.append(f"{answer_label}: {answer}")
    return "\n".join(parts)


def instruction(record: Record, multi: bool = False, explain: bool = False) -> str:
    if not record.is_choice:
        kind = "open"
    else:
        kind = "yesno" if is_yesno(record) else "multi" if may_have_several_answers(record, multi) else "choice"
    language = language_of(record)
    text = INSTRUCTIONS[language][kind]
    if not explain:
        return text
    return text + ("" if language == "zh" else " ") + EXPLAIN[language]


@dataclass(frozen=True)
class Prompt:
    context: str  # everything before the answer
    continuations: tuple[str, ...]  # one per option, in option order (empty for generation)
    labels: tuple[str, ...]  # the letter each continuation stands for


def uses_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(
    record: Record, tokenizer: Any, shots: Sequence[Record] = (), kind: str = "letter", multi: bool = False,
    explain: bool = False,
) -> Prompt:
    """The prompt for `record`; `kind` (letter | text | none) picks the continuations to score.

    explain: ask for the answer and an explanation (generation only: requires kind "none").

    shots: few-shot examples, from train/dev splits only (benchmarks.py picks them); shown with
    their answers before the question.
    """
    if kind not in CONTINUATION_KINDS:
        raise ValueError(f"unknown continuation kind {kind!r}; one of {CONTINUATION_KINDS}")
    if explain and kind != "none":
        raise ValueError("an explanation prompt is generated from, not scored: use kind 'none'")
    answer_label = LABELS[language_of(record)][2]
    blocks = [question_block(s, gold_in_words(s, kind)) for s in shots] + [question_block(record)]
    text = f"{instruction(record, multi, explain)}\n\n" + "\n\n".join(blocks)
    if kind == "none" or not record.is_choice:
        options: tuple[str, ...] = ()
    elif is_yesno(record):
        options = record.options
    else:
        options = tuple(record.letters) if kind == "letter" else record.options
    labels = tuple(record.letters[: len(options)])
    if uses_chat(tokenizer):
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return Prompt(context, tuple(options), labels)
    return Prompt(f"{text}\n{answer_label}:", tuple(f" {o}" for o in options), labels)
