"""The heads medmoe ships: trained by `benchmarks/quality.py run --bundle` on the bundled training
pools, one per expert and question format, in `heads/bundled/<expert>/<benchmark>/` (a few KB each).

The server and `medmoe eval --head bundled` answer option questions through them by default: a
record is answered by the bundled head of its expert whose `questions` format ("yesno/en",
"choice/en", ...) is the record's, and that has room for its options; other records keep the
expert's zero-shot answer. Only heads without retrieval features are bundled, so a server starts in
seconds (a head with retrieval embeds its pool first; train one with `medmoe heads train --retrieval`).
"""

from __future__ import annotations

from pathlib import Path

from medmoe.data.record import Record
from medmoe.eval.prompts import is_yesno, language_of
from medmoe.models.head import HeadConfig, OptionHead, is_head_folder, load_head

BUNDLED_HEADS = Path(__file__).resolve().parent / "bundled"


def question_format(record: Record) -> str:
    """"yesno/<language>" or "choice/<language>": which head answers a record (a head stores its pool's)."""
    return f"{'yesno' if is_yesno(record) else 'choice'}/{language_of(record)}"


def bundled_head_folders(expert: str) -> list[Path]:
    """The bundled head folders trained on `expert` (a bundled short name), by benchmark name."""
    folder = BUNDLED_HEADS / expert
    return sorted(p for p in folder.iterdir() if is_head_folder(p)) if folder.is_dir() else []


class HeadSet:
    """Heads by question format; `for_record` picks the one that answers a record, or None."""

    def __init__(self, heads: list[tuple[OptionHead, HeadConfig]]):
        self.heads = heads

    @classmethod
    def bundled(cls, expert: str) -> HeadSet:
        return cls([load_head(p) for p in bundled_head_folders(expert)])

    def for_record(self, record: Record) -> tuple[OptionHead, HeadConfig] | None:
        fmt = question_format(record)
        for head, config in self.heads:
            if config.questions == fmt and len(record.options) <= head.letters and not config.retrieval:
                return head, config
        return None
