"""Admission control: what a batch will cost, learned from the batches run, so that the batcher can
refuse at once (503 + Retry-After) a request it cannot answer within its timeout.

A request queued now waits for what is left of the running batch, every batch queued ahead of it,
and its own batch (medmoe.serve.batching). Batch costs differ by what the batch does, so they are
learned per batch key (e.g. the expert a gate picks) and per kind of work:

  options  scoring: one prefill per batch                      unit: the batch
  open     greedy generation: one decoding step per new token,  unit: one token of the batch's largest
           up to the batch's largest token budget                budget (the record's max_new_tokens,
                                                                 e.g. a chat request's max_tokens)

Seconds per unit are kept per power-of-two batch size (an exponential moving average each). A batch
of r rows is predicted from r's size class; else from the nearest larger class measured (a bigger
batch costs at least as much); else from the largest smaller class times the size ratio (no batching
gain is assumed beyond what has been seen). A batch whose key and kind no batch has measured has no
prediction: the batcher then lets at most one such batch of each kind be ahead of a request, its own
included, so a fresh server admits one batch's worth of a burst, times it, then admits by estimate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from medmoe.data.record import Record

OPTIONS, OPEN = "options", "open"
SMOOTHING = 0.2  # weight of the newest batch in each running seconds-per-unit estimate


def kind_of(record: Record) -> str:
    """The kind of work a record needs: option scoring or open generation."""
    return OPTIONS if record.options else OPEN


def size_class(rows: int) -> int:
    """The power of two at or above `rows`: batches of 3 and 4 rows share one estimate."""
    return 1 << max(rows - 1, 0).bit_length()


@dataclass
class Wait:
    """A request's predicted wait: seconds of work whose cost is known, and per kind of work how many
    batches of unknown cost (never measured) are ahead of it, its own included."""

    seconds: float = 0.0
    unknown: Counter = field(default_factory=Counter)

    @property
    def unknown_batches(self) -> int:
        return sum(self.unknown.values())

    def add(self, seconds: float, unknown_kinds: Sequence[str] = ()) -> None:
        self.seconds += seconds
        self.unknown.update(unknown_kinds)


class CostModel:
    """Seconds per batch, learned per (batch key, kind of work, size class); see the module docstring.

    max_new_tokens: the server's generation limit, the budget of an open record that names none.
    """

    def __init__(self, max_new_tokens: int, smoothing: float = SMOOTHING):
        self.max_new_tokens, self.smoothing = max_new_tokens, smoothing
        self.rates: dict[tuple[str, str], dict[int, float]] = {}  # (key, kind) -> size class -> seconds per unit

    def budget(self, record: Record) -> int:
        """New tokens an open record may generate: its own limit, never above the server's (the answerer's rule)."""
        try:
            asked = int(record.metadata.get("max_new_tokens", self.max_new_tokens))
        except (TypeError, ValueError):
            asked = self.max_new_tokens
        return max(1, min(asked, self.max_new_tokens))

    def units(self, kind: str, records: Sequence[Record]) -> int:
        return max(self.budget(r) for r in records) if kind == OPEN else 1

    def observe(self, key: str, records: Sequence[Record], seconds: float) -> None:
        """Learn from a batch that ran to the end in `seconds`. A batch holding both kinds (an answerer
        without batch keys) charges its whole time to each: an overestimate, never an underestimate."""
        size = size_class(len(records))
        for kind, part in _by_kind(records).items():
            rate = seconds / self.units(kind, part)
            table = self.rates.setdefault((key, kind), {})
            table[size] = rate if size not in table else self.smoothing * rate + (1 - self.smoothing) * table[size]

    def predict(self, key: str, records: Sequence[Record]) -> tuple[float, list[str]]:
        """(seconds the batch `records`, all with batch key `key`, will take, the kinds of work in it
        that no batch has measured: their seconds are not in the sum)."""
        total, unknown = 0.0, []
        for kind, part in _by_kind(records).items():
            rate = self._rate(key, kind, len(records))
            if rate is None:
                unknown.append(kind)
            else:
                total += rate * self.units(kind, part)
        return total, unknown

    def _rate(self, key: str, kind: str, rows: int) -> float | None:
        table = self.rates.get((key, kind))
        if not table:
            return None
        size = size_class(rows)
        larger = [s for s in table if s >= size]
        if larger:
            return table[min(larger)]
        largest = max(table)
        return table[largest] * size / largest


def _by_kind(records: Sequence[Record]) -> dict[str, list[Record]]:
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(kind_of(record), []).append(record)
    return groups
