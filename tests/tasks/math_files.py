"""Helpers of the math tests: rows in the layouts of MATH and DAPO-Math."""

from __future__ import annotations


def math_rows(count: int, start: int = 0) -> list[dict]:
    """MATH-shaped rows: a problem, and a worked solution whose last \\boxed{} is the answer."""
    return [{"problem": f"What is $\\frac{{{i}}}{{2}} + \\frac{{1}}{{2}}$?",
             "solution": f"We add: $\\frac{{{i}+1}}{{2}} = \\boxed{{\\frac{{{i + 1}}}{{2}}}}$.",
             "level": "Level 1", "type": "Algebra"}
            for i in range(start, start + count)]


def dapo_rows(count: int) -> list[dict]:
    """DAPO-Math-shaped rows: the problem under ``prompt``, the bare answer (a number) under ``answer``."""
    return [{"prompt": f"Compute {i} * 3.", "solution": "", "answer": i * 3} for i in range(count)]
