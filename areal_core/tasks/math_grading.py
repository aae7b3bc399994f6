"""Grading a maths answer with Hugging Face's ``math-verify``: the default grader of the ``math``
reward, run inside a grading process (``areal_core.tasks.grader_pool``), never in a rank.

math-verify bounds its own parsing and verification with ``SIGALRM``, which only the main thread
of a process may use, and the reward is called from the rollout thread. So both calls here run
with math-verify's timeouts disabled (``parsing_timeout=None``, ``timeout_seconds=None``) and the
grading process's deadline bounds them instead.

Modes: ``boxed`` grades the content of the completion's last complete ``\\boxed{...}`` (or
``\\fbox{...}``) alone, and a completion without one scores 0; ``plain`` hands the whole
completion to math-verify's default extraction (LaTeX and plain expressions, anywhere in the
text; several boxed answers are read as a set of answers).
"""

from __future__ import annotations

import functools
import logging

MODES = ("boxed", "plain")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def boxed_contents(text: str) -> list[str]:
    """The contents of every complete ``\\boxed{...}``/``\\fbox{...}`` in ``text``, in order,
    nested braces included (``\\boxed{\\frac{1}{2}}`` -> ``\\frac{1}{2}``)."""
    found = []
    position = 0
    while True:
        starts = [(text.find(command, position), command) for command in _BOX_COMMANDS]
        starts = [(index, command) for index, command in starts if index >= 0]
        if not starts:
            return found
        index, command = min(starts)
        opening = index + len(command)
        while opening < len(text) and text[opening] == " ":
            opening += 1
        position = opening
        if opening >= len(text) or text[opening] != "{":
            continue
        depth = 0
        for end in range(opening, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                found.append(text[opening + 1:end])
                position = end + 1
                break
        else:
            return found  # unclosed (a completion cut off): no complete box after it


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{...}`` in ``text``, or None when it has none."""
    contents = boxed_contents(text)
    return contents[-1] if contents else None


def _math_verify():
    import math_verify

    # It warns once that its timeouts are off and the caller must bound the work: the grading
    # process's deadline does.
    for name in ("math_verify", "math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_reference(reference: str):
    parsed = _math_verify().parse("\\boxed{" + reference + "}", parsing_timeout=None)
    if not parsed:
        raise ValueError(f"math-verify reads no answer in the reference {reference!r}")
    return parsed


def grade(completion: str, reference: str, mode: str) -> float:
    """1.0 when math-verify judges the answer ``completion`` states (per ``mode``) equal to
    ``reference`` (a LaTeX or plain answer, e.g. ``\\frac{1}{2}`` or ``72``), else 0.0.

    Raises ValueError when math-verify reads nothing in ``reference`` (the dataset's fault).
    """
    math_verify = _math_verify()
    gold = _parse_reference(reference)
    if mode == "boxed":
        boxed = last_boxed(completion)
        if boxed is None:
            return 0.0
        answer = math_verify.parse("\\boxed{" + boxed + "}", parsing_timeout=None)
    elif mode == "plain":
        answer = math_verify.parse(completion, parsing_timeout=None)
    else:
        raise ValueError(f"unknown grading mode {mode!r}; use one of {', '.join(MODES)}")
    if not answer:
        return 0.0
    return 1.0 if math_verify.verify(gold, answer, timeout_seconds=None) else 0.0
