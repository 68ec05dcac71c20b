"""Summary statistics of a dataset split (`medmoe data stats`)."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from typing import Any

from medmoe.data.record import Record


def split_stats(records: Sequence[Record]) -> dict[str, Any]:
    """Counts and lengths for one split: what a user checks before training or evaluating."""
    if not records:
        return {"records": 0}
    words = [len(r.question.split()) if r.question.isascii() else len(r.question) for r in records]
    context = [len(r.context or "") for r in records]
    stats: dict[str, Any] = {
        "records": len(records),
        "question_length_median": statistics.median(words),
        "context_chars_median": statistics.median(context),
        "with_explanation": sum(r.explanation is not None for r in records),
    }
    if records[0].is_choice:
        stats["options"] = dict(Counter(len(r.options) for r in records))
        stats["answers"] = dict(sorted(Counter(r.answer for r in records if len(r.answer) == 1).items()))
        stats["multi_answer"] = sum(r.is_multi_answer for r in records)
    subjects = Counter(r.metadata.get("subject") for r in records if r.metadata.get("subject"))
    if subjects:
        stats["subjects"] = len(subjects)
    return stats
