"""Grading functions that misbehave on purpose, for the math reward's ``grader`` option: each
runs in a grading process and, given a completion's text, says which process it is, hangs,
raises or kills its process."""

from __future__ import annotations

import os
import time


def misbehaving(completion: str, reference: str, mode: str) -> float:
    """``pid``: the grading process's id; ``hang``: never answers; ``raise``: raises;
    ``crash``: the process dies; anything else: 1.0 when it equals ``reference``."""
    if completion == "pid":
        return float(os.getpid())
    if completion == "hang":
        time.sleep(3600)
    if completion == "raise":
        raise RuntimeError("the grader broke on purpose")
    if completion == "crash":
        os._exit(3)
    return 1.0 if completion == reference else 0.0


NOT_CALLABLE = 42


def digits_only(completion: str, reference: str, mode: str) -> float:
    """For a run of the tiny model, whose completions are one token: hangs on a completion that
    decodes to no text (a special or unused token), raises on one that is not a digit, and grades
    a digit by equality with ``reference``."""
    if not completion:
        time.sleep(3600)
    if not completion.isdigit():
        raise ValueError(f"not a digit: {completion!r}")
    return 1.0 if completion == reference else 0.0
