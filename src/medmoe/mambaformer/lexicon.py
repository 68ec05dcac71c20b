"""The medical lexicon behind the gate's domain flag d_t, built from training data only.

Rule (documented in docs/router.md):
1. MeSH: every word of every MeSH heading attached to a training record (PubMedQA:
   `record.metadata["meshes"]`), lower-cased and split on non-alphanumerics, except MeSH
   *check tags* (Humans, Male, Female, Adult, Aged, ...: demographic headings on nearly every
   abstract, not medical content), words of study-design and statistics headings
   (`GENERIC_MESH_WORDS`: Retrospective Studies, Treatment Outcome, Odds Ratio, ...), stop words,
   numbers and words shorter than `min_len` letters.
2. Clinical / dental terms: every word of a training record's text (question, context, options,
   explanation) that contains a medical word-forming morpheme (`MEDICAL_MORPHEMES`: -itis,
   -ectomy, odont-, gingiv-, cardi-, ...), appearing in at least `min_records` records.
3. Words in more than `max_doc_share` of all training records are dropped ("patients"): a flag that
   is on for every query tells the gate nothing (only with >= 20 records, where a share means something).
Words are lower-case runs of [a-z0-9]; the featuriser matches words case-insensitively.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from medmoe.data.record import Record
from medmoe.errors import MedmoeError
from medmoe.paths import atomic_write_text

WORD = re.compile(r"[a-z0-9]+")

MESH_CHECK_TAGS = frozenset(
    "humans male female adult aged middle young child children infant newborn preschool adolescent "
    "animals pregnancy mice rats 80 over".split()
)
STOP_WORDS = frozenset(
    "a an and are as at be by for from in into is it its of on or that the their this to was were with "
    "without within other others not no than then there these those which who whom whose what when where "
    "how all any both each few more most some such only own same so very can will just should now type "
    "use used using based related factors studies study".split()
)
MIN_RECORDS_FOR_DOC_SHARE = 20
# Words of MeSH headings about study design, statistics and demographics rather than medicine.
GENERIC_MESH_WORDS = frozenset(
    "studies study factors factor outcome outcomes ratio analysis models model index rate rates results "
    "questionnaires surveys assessment value tests reproducibility sensitivity specificity prognosis prevalence "
    "incidence time follow cohort cross sectional retrospective prospective case control logistic multivariate "
    "regression data collection length stay united states odds risk age sex young severity illness predictive "
    "survival statistics topic evaluation quality care attitude health personnel practice patterns reference values "
    "program programs linear retrospective proportional hazards kaplan meier estimate chi square distribution".split()
)
# Word-forming morphemes of medical and dental vocabulary (prefixes, roots and suffixes).
MEDICAL_MORPHEMES = (
    "itis", "ectomy", "otomy", "ostomy", "plasty", "osis", "emia", "aemia", "algia", "pathy", "oma",
    "logy", "scopy", "graphy", "penia", "trophy", "plasia", "genic", "cyte", "blast", "lysis",
    "odont", "dent", "gingiv", "periodon", "endodon", "orthodon", "pulp", "caries", "mandib", "maxill",
    "occlus", "molar", "incisor", "canine", "enamel", "cement", "alveol", "palat", "mucos", "oral",
    "cardi", "hepat", "nephr", "neur", "gastr", "pulmon", "derm", "oste", "arthr", "myo", "hemat",
    "haemat", "angi", "vascul", "onco", "carcin", "tumor", "tumour", "lymph", "immun", "thromb",
    "cyst", "renal", "insulin", "glyc", "diabet", "infect", "bacter", "viral", "virus", "antibiot",
    "surg", "anesth", "anaesth", "clinic", "patient", "therap", "diagnos", "syndrom", "chronic",
    "acute", "lesion", "biopsy", "dose", "drug", "pharmac", "mortal", "morbid",
)


def words(text: str) -> list[str]:
    """Lower-case alphanumeric words of a text (the lexicon's unit)."""
    return WORD.findall(text.lower())


def _keep(word: str, min_len: int) -> bool:
    return len(word) >= min_len and not word.isdigit() and word not in STOP_WORDS


def mesh_headings(record: Record) -> list[str]:
    """The MeSH headings of a record (a list, or the string form of one as in the raw PubMedQA file)."""
    meshes = record.metadata.get("meshes") or record.metadata.get("MESHES") or []
    if isinstance(meshes, str):
        try:
            meshes = ast.literal_eval(meshes)
        except (ValueError, SyntaxError):
            meshes = [m.strip() for m in meshes.split(";")]
    if not isinstance(meshes, (list, tuple)):
        raise MedmoeError(f"record {record.id}: metadata['meshes'] is {type(meshes).__name__}, expected a list")
    return [str(m) for m in meshes]


def record_text(record: Record) -> str:
    """All text of a training record, explanation included (lexicon building only; the gate reads
    `queries.query_text`, which leaves the explanation out)."""
    return " ".join([record.question, record.context or "", *record.options, record.explanation or ""])


@dataclass
class Lexicon:
    """A set of lower-case medical words, with where each source came from."""

    terms: frozenset[str]
    rule: str = ""
    sources: dict = field(default_factory=dict)

    def __contains__(self, word: str) -> bool:
        return word.lower() in self.terms

    def __len__(self) -> int:
        return len(self.terms)

    def to_dict(self) -> dict:
        return {"version": 1, "rule": self.rule, "sources": self.sources, "terms": sorted(self.terms)}

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Lexicon:
        path = Path(path)
        if not path.is_file():
            raise MedmoeError(f"{path}: no such lexicon file")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            return cls(frozenset(str(t).lower() for t in d["terms"]), d.get("rule", ""), d.get("sources", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise MedmoeError(f"{path}: not a medmoe lexicon ({exc})") from exc


def build_lexicon(records: Iterable[Record], min_len: int = 3, min_records: int = 2, max_doc_share: float = 0.15,
                  morphemes: tuple[str, ...] = MEDICAL_MORPHEMES) -> Lexicon:
    """Build the lexicon from training records (never pass test records). See the module rule."""
    mesh_words: set[str] = set()
    doc_freq: Counter[str] = Counter()
    n_records = n_with_mesh = 0
    for record in records:
        n_records += 1
        headings = mesh_headings(record)
        n_with_mesh += bool(headings)
        for heading in headings:
            if heading.strip().lower() in MESH_CHECK_TAGS:
                continue
            mesh_words.update(w for w in words(heading)
                              if _keep(w, min_len) and w not in MESH_CHECK_TAGS and w not in GENERIC_MESH_WORDS)
        doc_freq.update(set(words(record_text(record))))
    morpheme_words = {
        w for w, count in doc_freq.items()
        if count >= min_records and _keep(w, max(min_len, 4)) and any(m in w for m in morphemes)
    }
    too_common = ({w for w, count in doc_freq.items() if count > max_doc_share * n_records}
                  if n_records >= MIN_RECORDS_FOR_DOC_SHARE else set())
    terms = frozenset((mesh_words | morpheme_words) - too_common)
    rule = (f"MeSH heading words (no check tags, study-design words, stop words, numbers, len < {min_len}) + "
            f"training-text words with a medical morpheme in >= {min_records} records (len >= {max(min_len, 4)}); "
            f"minus words in > {max_doc_share:.0%} of training records")
    sources = {"records": n_records, "records_with_mesh": n_with_mesh, "mesh_words": len(mesh_words),
               "morpheme_words": len(morpheme_words), "too_common": len(too_common & (mesh_words | morpheme_words)),
               "terms": len(terms)}
    return Lexicon(terms, rule, sources)
