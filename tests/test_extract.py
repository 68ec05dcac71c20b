"""The strict answer extractor on its documented edge cases."""

import pytest

from medmoe.eval.extract import extract_letters, extract_yesno


@pytest.mark.parametrize(
    "text, multi, expected",
    [
        ("B", False, ("B", "leading")),
        ("B. Aspirin is first line", False, ("B", "leading")),
        ("(C) because ...", False, ("C", "leading")),
        ("The answer is D.", False, ("D", "marker")),
        ("Answer: (A)", False, ("A", "marker")),
        ("答案：C", False, ("C", "marker")),
        ("正确答案是E。", False, ("E", "marker")),
        ("本题选B项", False, ("B", "marker")),
        # full-width letters and punctuation
        ("答案：Ｂ", False, ("B", "marker")),
        ("Ｄ．", False, ("D", "leading")),
        ("（Ａ）", False, ("A", "leading")),
        # no letter
        ("I am not sure.", False, ("", "none")),
        ("", False, ("", "none")),
        # letters inside words never count
        ("Aspirin", False, ("", "none")),
        ("Vitamin B12 deficiency", False, ("", "none")),
        ("HbA1c is raised", False, ("", "none")),
        ("A patient with chest pain", False, ("", "none")),
        ("The answer is ACE inhibitors", False, ("", "none")),
        # several letters
        ("答案：ACD", True, ("ACD", "marker")),
        ("答案：A、C、D", True, ("ACD", "marker")),
        ("The answers are C and A", True, ("AC", "marker")),
        ("A, C", True, ("AC", "leading")),
        ("答案：AC", False, ("", "ambiguous")),
        ("A, C", False, ("", "ambiguous")),
        ("The answer is A. Wait, the answer is B.", False, ("", "conflict")),
        ("The answer is A. So the answer is A.", False, ("A", "marker")),
        # letters that are not options
        ("Answer: E", False, ("", "invalid")),
    ],
)
def test_extract_letters(text, multi, expected):
    found = extract_letters(text, "ABCD" if "E" not in text or "invalid" in expected else "ABCDE", multi)
    assert (found.letters, found.status) == expected


def test_option_letters_come_from_the_question():
    assert extract_letters("答案：E", "ABCDE").letters == "E"
    assert extract_letters("答案：E", "ABCD").status == "invalid"


@pytest.mark.parametrize(
    "text, expected",
    [("yes", "A"), ("No, it does not.", "B"), ("Maybe.", "C"), ("The answer is no", "B"),
     ("答案：是", "A"), ("否", "B"), ("nothing", ""), ("yesterday", ""), ("Answer: yes. Answer: no", "")],
)
def test_extract_yesno(text, expected):
    assert extract_yesno(text).letters == expected
