"""The strict answer extractor: generated text -> option letter(s), or no answer.

Leaderboards on CMB / CMExam are hard to reproduce because every paper extracts answers from
generated text differently. medmoe's rule is strict and fixed (docs/evaluation.md, "Answer extraction"):

1. Normalize with Unicode NFKC, so full-width letters and punctuation count as ASCII
   ("Ａ" -> "A", "：" -> ":", "（" -> "(").
2. A *letter* is an uppercase option letter that is not part of a word: no ASCII letter or digit
   directly before or after it ("Aspirin", "B12", "HbA1c" hold none). Chinese characters around it
   are fine ("选B项"). A bare run of capitals ("ACD") is a letter group unless a lowercase word
   follows it, which makes it an acronym in prose ("ACE inhibitors" is not a group; "答案：ACD" is).
3. Explicit markers win: "answer is X", "answer: X", "correct option is (X)", "答案是X", "答案：X",
   "正确答案为X", "选X". Every marker in the text is read; if they disagree the result is a conflict
   (no answer).
4. Without a marker, the text must *open* with the answer: "B", "B.", "(B)", "B) ...", "A, C".
   A letter followed by a space and a word ("A patient ...") is prose, not an answer.
5. Letters outside the question's options make the answer invalid (no answer).
6. Single-answer questions need exactly one distinct letter; several letters are ambiguous (no answer).
   Multi-answer extraction returns the sorted distinct letters ("CA" -> "AC").
7. Yes/no/maybe questions (PubMedQA) use the words instead of letters: yes/no/maybe (是/否/可能),
   as a whole word after a marker or at the start of the text.

"No answer" is the empty prediction: it is scored as wrong, never guessed.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

YESNO_WORDS = {"yes": "A", "no": "B", "maybe": "C", "是": "A", "否": "B", "可能": "C"}

# A letter group: uppercase letters, optionally separated by commas, 、, "and", 和 ... Not touching
# other ASCII letters/digits on the outside; a plain run like "ACD" is allowed.
_SEP = r"(?:\s*(?:,|、|/|&|;|和|及|与|(?i:and|or))\s*|\s+)?"
_GROUP = rf"(?<![A-Za-z0-9])([A-Z](?:{_SEP}[A-Z](?![a-z]))*)(?![A-Za-z0-9])"
_MARKERS = [
    r"answers?\s*(?:is|are|would be|should be)?\s*:?\s*(?:option|options|choice)?\s*\(?",
    r"correct\s+(?:option|options|choice|choices|answer|answers)\s*(?:is|are)?\s*:?\s*\(?",
    r"(?:正确)?答案\s*(?:应该|应|是|为|选)?\s*:?\s*(?:选项|选)?\s*\(?",
    r"(?<![A-Za-z])选(?:择|项)?\s*\(?",
]
_MARKER_RE = re.compile(rf"(?i:{'|'.join(_MARKERS)}){_GROUP}")
# Leading answer: optional "(" then a group, then end of text or punctuation / a line break.
_LEADING_RE = re.compile(rf"^\s*[\(\[]?{_GROUP}\s*(?:[\)\]]|[.:,;。、，；]|$|\n)")
_YESNO_MARKER_RE = re.compile(r"(?:answers?\s*(?:is)?\s*:?|答案\s*(?:是|为)?\s*:?)\s*(yes|no|maybe|是|否|可能)(?![A-Za-z])", re.IGNORECASE)
_YESNO_LEADING_RE = re.compile(r"^\s*(yes|no|maybe|是|否|可能)(?![A-Za-z])", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    """letters: the extracted answer ("" = no answer); status: how it was found or why not.

    status is one of: marker, leading, none (nothing found), conflict (markers disagree),
    ambiguous (several letters for a single-answer question), invalid (a letter that is not an option).
    """

    letters: str
    status: str


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text)


def _letters_of(group: str) -> str:
    return "".join(sorted(set(re.findall(r"[A-Z]", group))))


def _is_word(text: str, match: re.Match[str]) -> bool:
    """A bare run of capitals followed by a lowercase word is an acronym in prose ("ACE inhibitors")."""
    return bool(re.fullmatch(r"[A-Z]{2,}", match.group(1)) and re.match(r"\s+[a-z]", text[match.end(1):]))


def _decide(candidates: list[str], status: str, allowed: str, multi: bool) -> Extraction:
    if len(set(candidates)) > 1:
        return Extraction("", "conflict")
    letters = candidates[0]
    if any(letter not in allowed for letter in letters):
        return Extraction("", "invalid")
    if len(letters) > 1 and not multi:
        return Extraction("", "ambiguous")
    return Extraction(letters, status)


def extract_letters(text: str, allowed: str, multi: bool = False) -> Extraction:
    """The option letter(s) a generated `text` commits to, by the rule in the module docstring.

    allowed: the question's option letters ("ABCD"); multi: whether several letters may be answered.
    """
    text = normalize(text)
    marked = [_letters_of(m.group(1)) for m in _MARKER_RE.finditer(text) if not _is_word(text, m)]
    if marked:
        return _decide(marked, "marker", allowed, multi)
    leading = _LEADING_RE.match(text)
    if leading and not _is_word(text, leading):
        return _decide([_letters_of(leading.group(1))], "leading", allowed, multi)
    return Extraction("", "none")


def extract_yesno(text: str) -> Extraction:
    """yes/no/maybe (是/否/可能) as letters A/B/C, after a marker or at the start of the text."""
    text = normalize(text)
    marked = [YESNO_WORDS[m.group(1).lower()] for m in _YESNO_MARKER_RE.finditer(text)]
    if marked:
        return Extraction(marked[0], "marker") if len(set(marked)) == 1 else Extraction("", "conflict")
    leading = _YESNO_LEADING_RE.match(text)
    if leading:
        return Extraction(YESNO_WORDS[leading.group(1).lower()], "leading")
    return Extraction("", "none")
