"""Trainer versus server log-probabilities on a fixed probe sequence.

After each load the server's log-probabilities of a probe must match the trainer's: a rollout
silently served by the base model or by an old version moves them far more than the tolerance.
"""

from __future__ import annotations

from typing import Sequence

from areal_core.errors import AgreementError


def probe_sequence(records: Sequence[dict], length: int) -> list[int]:
    """A deterministic probe of ``length`` tokens: prompts (and answers, when given) concatenated."""
    tokens: list[int] = []
    for record in records:
        tokens.extend(record["prompt_ids"])
        tokens.extend(record.get("answer_ids", ()))
        if len(tokens) >= length:
            break
    if len(tokens) < length:
        raise ValueError(f"the dataset gives only {len(tokens)} probe tokens; {length} needed")
    return tokens[:length]


def max_abs_difference(server: Sequence[float], trainer: Sequence[float]) -> float:
    if len(server) != len(trainer):
        raise AgreementError(
            f"the server returned {len(server)} log-probabilities for a probe the trainer scored "
            f"with {len(trainer)}"
        )
    return max((abs(float(s) - float(t)) for s, t in zip(server, trainer)), default=0.0)


def check_agreement(server: Sequence[float], trainer: Sequence[float], tolerance: float, what: str) -> float:
    """The max abs difference; AgreementError naming ``what`` when it exceeds ``tolerance``."""
    difference = max_abs_difference(server, trainer)
    if not difference <= tolerance:
        raise AgreementError(
            f"{what}: server and trainer log-probabilities differ by up to {difference:.3g} "
            f"(tolerance {tolerance:g}); the server may be serving the base model or another "
            f"version, or the weights were converted wrongly"
        )
    return difference
