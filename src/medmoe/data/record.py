"""The one record type every loader returns, for every dataset and task."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from typing import Any

LETTERS = string.ascii_uppercase


@dataclass(frozen=True)
class Record:
    """One question.

    id:          stable, unique within its dataset ("pubmedqa/21645374")
    question:    the question text, never empty
    context:     supporting text (a PubMedQA abstract, a CMB-Clin case), or None
    options:     option texts in order; their letters are A, B, C, ...; empty for open-ended questions
    answer:      for option questions the letter(s) of the correct option(s), sorted ("B", "ACD");
                 for open-ended questions the reference answer text
    explanation: the dataset's explanation or long answer, or None
    metadata:    dataset-specific fields (subject, MeSH terms, multi_answer, ...)
    """

    id: str
    question: str
    answer: str
    context: str | None = None
    options: tuple[str, ...] = ()
    explanation: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def is_choice(self) -> bool:
        return bool(self.options)

    @property
    def letters(self) -> str:
        """The option letters of this record: "ABC" for three options."""
        return LETTERS[: len(self.options)]

    @property
    def gold_indices(self) -> tuple[int, ...]:
        """0-based indices of the correct options (empty for open-ended questions)."""
        return tuple(LETTERS.index(letter) for letter in self.answer) if self.is_choice else ()

    @property
    def is_multi_answer(self) -> bool:
        return self.is_choice and len(self.answer) > 1

    @property
    def answer_text(self) -> str:
        """The gold answer in words: option texts joined for option questions, else the reference."""
        if not self.is_choice:
            return self.answer
        return "; ".join(self.options[i] for i in self.gold_indices)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "question": self.question,
            "context": self.context,
            "options": list(self.options),
            "answer": self.answer,
            "explanation": self.explanation,
            "metadata": self.metadata,
        }
