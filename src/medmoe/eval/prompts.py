"""Prompts: how a Record becomes model input, and which continuations are scored as its options.

Two styles, chosen by the tokenizer:
  chat  (the model has a chat template, e.g. SmolLM2-Instruct): the question goes in a user turn and
        the options are scored right after the assistant header, with no leading space: "yes", "A".
        (" yes" with a space is a different token and gives nonsense scores after the template.)
  plain (base models, e.g. Gemma-3-270M): "...\nAnswer:" and the options are scored as " yes", " A".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from medmoe.data.record import Record

INSTRUCTIONS = {
    "en": {
        "yesno": "Answer the question with yes, no or maybe.",
        "choice": "Answer with the letter of the correct option.",
        "multi": "Answer with the letters of all correct options.",
    },
    "zh": {
        "yesno": "请用是、否或可能回答问题。",
        "choice": "请回答正确选项的字母。",
        "multi": "请回答所有正确选项的字母。",
    },
}
LABELS = {"en": ("Context", "Question", "Answer"), "zh": ("病例", "问题", "答案")}


def language_of(record: Record) -> str:
    text = record.question + "".join(record.options)
    return "zh" if any("\u4e00" <= ch <= "\u9fff" for ch in text) else "en"


def is_yesno(record: Record) -> bool:
    return record.options == ("yes", "no", "maybe")


def question_block(record: Record, with_answer: bool = False) -> str:
    """The question as text: context, question, lettered options (not for yes/no/maybe)."""
    lang = language_of(record)
    context_label, question_label, answer_label = LABELS[lang]
    parts = []
    if record.context:
        parts.append(f"{context_label}: {record.context}")
    parts.append(f"{question_label}: {record.question}")
    if record.options and not is_yesno(record):
        parts += [f"{letter}. {text}" for letter, text in zip(record.letters, record.options)]
    if with_answer:
        gold = record.options[record.gold_indices[0]] if is_yesno(record) else record.answer
        parts.append(f"{answer_label}: {gold}")
    return "\n".join(parts)


def instruction(record: Record) -> str:
    kind = "yesno" if is_yesno(record) else "multi" if record.is_multi_answer else "choice"
    return INSTRUCTIONS[language_of(record)][kind]


@dataclass(frozen=True)
class Prompt:
    context: str  # everything before the answer
    continuations: tuple[str, ...]  # one per option, in option order


def uses_chat(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(record: Record, tokenizer: Any, shots: Sequence[Record] = ()) -> Prompt:
    """The scoring prompt for an option question; few-shot `shots` come from train/dev splits only."""
    answer_label = LABELS[language_of(record)][2]
    options = record.options if is_yesno(record) else tuple(record.letters)
    body = "\n\n".join([*(question_block(s, with_answer=True) for s in shots), question_block(record)])
    text = f"{instruction(record)}\n\n{body}"
    if uses_chat(tokenizer):
        context = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return Prompt(context, tuple(options))
    return Prompt(f"{text}\n{answer_label}:", tuple(f" {o}" for o in options))
