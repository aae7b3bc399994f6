"""The table of tricky answers and the grade each reward gives them, shared by
test_math_answers.py (which grades every row for real) and docs/math.md (which shows it)."""

from __future__ import annotations

#: (what the row shows, the math record's reference answer, the gsm8k record's, the completion,
#: the math reward's grade in mode boxed, in mode plain, the gsm8k reward's grade)
TABLE = [
    ("0.5 for 1/2, boxed", "\\frac{1}{2}", "0.5", "The answer is \\boxed{0.5}.", 1, 1, 1),
    ("1/2 for 0.5, boxed", "\\frac{1}{2}", "0.5", "The answer is \\boxed{1/2}.", 1, 1, 0),
    ("1/2 for 0.5, unboxed", "0.5", "0.5", "#### 1/2", 0, 1, 0),
    ("\\frac in $...$", "\\frac{1}{2}", "0.5", "So the answer is $\\frac{1}{2}$.", 0, 1, 0),
    ("\\frac12 without braces", "\\frac{1}{2}", "0.5", "\\boxed{\\frac12}", 1, 1, 0),
    ("0.5 for \\frac{1}{2}, unboxed", "\\frac{1}{2}", "0.5", "#### 0.5", 0, 1, 1),
    ("a unit in the box", "5", "5", "The rod is \\boxed{5 \\text{ cm}} long.", 1, 1, 1),
    ("a unit in prose", "5", "5", "The rod is 5 cm long.", 0, 1, 1),
    ("a unit after ####", "5", "5", "#### 5 cm", 0, 1, 1),
    ("thousands comma, boxed", "1000", "1000", "\\boxed{1,000}", 1, 1, 1),
    ("thousands comma in prose", "1000", "1000", "The farm sells 1,000 liters.", 0, 1, 1),
    ("a reference with a comma", "1,000", "1000", "#### 1000", 0, 1, 1),
    ("a negative answer", "-7", "-7", "It is \\boxed{-7} degrees.", 1, 1, 1),
    ("the sign counts", "-7", "-7", "It dropped by 7 degrees, so \\boxed{7}.", 0, 0, 0),
    ("a negative answer after ####", "-7", "-7", "#### -7", 0, 1, 1),
    ("two boxes: the last counts", "7", "7", "First \\boxed{3}, then \\boxed{7}.", 1, 0, 1),
    ("two boxes: the first does not", "3", "3", "First \\boxed{3}, then \\boxed{7}.", 0, 0, 0),
    ("a wrong answer, boxed", "4", "4", "\\boxed{5}", 0, 0, 0),
    ("a wrong answer in prose", "4", "4", "The answer is 5.", 0, 0, 0),
    ("no answer", "4", "4", "I do not know.", 0, 0, 0),
    ("an empty completion", "4", "4", "", 0, 0, 0),
    ("a box never closed", "4", "4", "\\boxed{4", 0, 0, 1),
]


def _cell(text: str) -> str:
    return f"`{text}`" if text else "(empty)"


def markdown_rows() -> list[str]:
    """The table as docs/math.md shows it, one Markdown row per case."""
    return [
        f"| {shows} | {_cell(math_ref)} | {_cell(gsm8k_ref)} | {_cell(completion)} | {boxed} | {plain} | {gsm8k} |"
        for shows, math_ref, gsm8k_ref, completion, boxed, plain, gsm8k in TABLE
    ]
