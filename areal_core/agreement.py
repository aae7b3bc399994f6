"""Are the served weights the trainer's current adapter? The check after every adapter load.

A question of discrimination, not of equality: a server and a trainer never compute the same
log-probabilities (other kernels, other summation orders, bfloat16 rounding of the logits), while
serving the wrong weights moves them by as much as the adapter, or its last update, does. After
each load the check scores a fixed probe (``PROBE_TOKENS`` tokens of held-out prompts and their
answers) under

    S  the server, asked for the version just loaded,
    T  the trainer's current adapter (what S must be),
    B  the trainer's base model, adapter disabled (scored once per run: it never changes),
    P  the trainer's previous version (the T of the last check; absent at the first one),

and raises an alarm on either of two findings, both on distances between per-token
log-probabilities over the probe,

    D(X, Y) = sum_t w_t |x_t - y_t| / sum_t w_t,   w_t = sqrt(p_t) under T,

over the probe's tokens less the ``TRIM`` share (5 %, 12 of 256) whose ``w_t |x_t - y_t|`` is
largest. A mean absolute difference, then, that counts a token by the square root of its
probability under the trainer's adapter and leaves out the few tokens that differ most. Why both:
rounding noise in a log-probability grows as the token gets unlikely (for a likely token the
errors of its logit and of the normaliser cancel to (1 - p) of their size; for an unlikely one
they add), while the adapter moves likely and unlikely tokens alike; weighting by sqrt(p) keeps
every token (one of p = 1e-4 counts 1 % of a certain one). And low-precision noise is heavy-tailed
over the tokens: in bfloat16 a few tokens at sensitive positions differ by 0.5-0.8 even at p of
0.1-0.2 (two such tokens made 43 % of a version's weighted noise), while wrong weights move most
tokens at once; trimming 5 % cut that version's noise figure 8x (docs/agreement.md).

1. **S is one of the known wrong answers.** For each alternative A (the base model B, the
   previous version P, and the adapter at twice its scale, linearised as ``2T - B``), the check
   compares how near S is to A and to T: ``nearer = D(S, T) / D(S, A)``. Healthy, S sits on T
   within the rounding noise n and A is the adapter's (or the update's) effect e away, so nearer
   is n / (e + n), at most about 1 (A equal to T: version 0 against the base, an update that
   changed nothing). Serving A, nearer is (e + n) / n. An alarm when nearer exceeds
   ``NEARER_FACTOR`` (5): S is five times nearer to A than to the trainer's adapter. Both
   distances carry the same noise, so the rule needs no dtype: it calibrates itself, and tells A
   apart once its effect is about four times the noise.
2. **S is far from T.** Wrong weights that are none of the known alternatives (another run's
   adapter, a target module missing) show as a large gap D(S, T), compared with
   ``GAP_THRESHOLD`` of the dtype the two sides compute in (the lower precision decides), set at
   3x or more the largest healthy gap measured on these CPUs (figures in docs/agreement.md).
   A trimmed mean, not the max: rounding noise is thin on most tokens with rare outliers (a token
   the model all but rules out can differ by 4e-4 in float32 and by more than 3 in bfloat16),
   while wrong weights move most tokens at once. A gap above the threshold is forgiven only when S is
   still ``1 / CLOSER_FRACTION`` times nearer to T than to both B and P.

What the check can and cannot tell. Version 0 (B = 0) equals the base: serving the base as v0 is
no fault and cannot be seen. An update too small to resolve leaves a version equal to the one
before: serving the previous one then changes nothing a rollout could show, and the check says
nothing. Every check reports ``adapter_effect`` = D(T, B) and ``update_effect`` = D(T, P), so a
user sees what the check could resolve at that step.

The probe: ``PROBE_TOKENS`` = 256 scored tokens. The healthy figures are means over the probe:
with 256 tokens they vary by about +-10 % between checks (measured on the demo in float32 and
bfloat16), so a nearer factor of 5 and a gap threshold of 3x the noise are not crossed by
chance; in the demo's arithmetic task the probe spans about 25 problems, so weights that go wrong
only on some tokens still move the mean. Fewer tokens make both figures depend on the few
records the probe happens to hold.
"""

from __future__ import annotations

import math
from typing import Sequence

import attrs

from areal_core.errors import AgreementError

#: Scored tokens of the probe (see the module text for why this many).
PROBE_TOKENS = 256
#: Fewer scored tokens than this make no decision (a caller's own probe, e.g. the conformance kit).
MIN_DECISION_TOKENS = 256

#: Rule 2's threshold on the gap D(S, T) per compute dtype; see docs/agreement.md for the healthy
#: and wrong-weights figures behind each (float16 is scaled from bfloat16 by the ratio of their
#: unit roundoffs, 2^-11 / 2^-8, and not measured).
GAP_THRESHOLD = {
    "float32": 2e-5,  # healthy demo runs: at most 7.7e-7 (200 steps), 26x below
    "bfloat16": 0.02,  # healthy: at most 0.0044 on the demo (200 steps), 0.0062 on the test model
    "float16": 0.02 / 8,
}

#: The share of probe tokens with the largest weighted differences that a distance leaves out.
TRIM = 0.05

#: Rule 1: S this many times nearer to an alternative than to T is that alternative (healthy
#: demo runs: at most 1.48, bfloat16's previous version, whose update is the size of the noise).
NEARER_FACTOR = 5.0

#: Rule 2's forgiveness: a gap above the threshold with S this many times nearer to T than to both
#: the base and the previous version is noise on a sharpened model, not wrong weights.
CLOSER_FRACTION = 0.2

_PRECISION_ORDER = ("float32", "float16", "bfloat16")


def compute_dtype(trainer_dtype: str, server_dtype: str) -> str:
    """The lower precision of the two sides: it sets the noise the check must sit above."""
    known = [d for d in (trainer_dtype, server_dtype) if d in _PRECISION_ORDER]
    return max(known, key=_PRECISION_ORDER.index) if known else "float32"


def probe_sequences(records: Sequence[dict], tokens: int, max_length: int) -> list[list[int]]:
    """Probe sequences of at most ``max_length`` tokens whose scored tokens add up to ``tokens``.

    Each holds whole records (prompt, then answer when the record has one) concatenated; a
    sequence of n tokens scores n - 1 of them. Deterministic for a given dataset.

    :raises ValueError: the records hold fewer tokens than ``tokens``.
    """
    if max_length < 3:
        raise ValueError(f"probe sequences need room for at least 3 tokens, not {max_length}")
    sequences: list[list[int]] = []
    current: list[int] = []
    scored = 0
    for record in records:
        piece = (list(record["prompt_ids"]) + list(record.get("answer_ids", ())))[:max_length]
        if len(current) + len(piece) > max_length:
            sequences.append(current)
            scored += len(current) - 1
            current = []
        current.extend(piece)
        if scored + len(current) - 1 >= tokens:
            break
    if len(current) >= 2:
        sequences.append(current)
        scored += len(current) - 1
    if scored < tokens:
        raise ValueError(
            f"the agreement probe needs {tokens} tokens of held-out records and the dataset's eval "
            f"split gives only {scored}: add held-out records, or set train.agreement=off"
        )
    excess = scored - tokens  # trim the last sequence so exactly ``tokens`` are scored
    if excess:
        sequences[-1] = sequences[-1][: len(sequences[-1]) - excess]
    return [s for s in sequences if len(s) >= 2]


def flatten(per_sequence) -> list[float]:
    """One flat list of scores from per-sequence rows (lists or 1-D tensors)."""
    flat: list[float] = []
    for row in per_sequence:
        flat.extend(float(x) for x in (row.tolist() if hasattr(row, "tolist") else row))
    return flat


def _same_length(x: Sequence[float], y: Sequence[float]) -> None:
    if len(x) != len(y):
        raise AgreementError(
            f"the server returned {len(x)} log-probabilities for a probe the trainer scored with {len(y)}"
        )


def mean_abs_distance(x: Sequence[float], y: Sequence[float], weights: Sequence[float] | None = None,
                      trim: float = 0.0) -> float:
    """``sum_t w_t |x_t - y_t| / sum_t w_t`` over the tokens kept: the ``trim`` share of them with
    the largest ``w_t |x_t - y_t|`` is left out (plain mean without weights or trim)."""
    _same_length(x, y)
    if not x:
        return 0.0
    weights = [1.0] * len(x) if weights is None else list(weights)
    terms = sorted(((w * abs(float(a) - float(b)), w) for w, a, b in zip(weights, x, y)), reverse=True)
    kept = terms[int(trim * len(terms)):]
    total = sum(w for _, w in kept)
    return sum(c for c, _ in kept) / total if total > 0 else 0.0


def probability_weights(trainer: Sequence[float]) -> list[float]:
    """``sqrt(p_t)`` of each token under the trainer's adapter (see the module text)."""
    return [math.exp(0.5 * min(float(t), 0.0)) for t in trainer]


def max_abs_difference(x: Sequence[float], y: Sequence[float]) -> float:
    _same_length(x, y)
    return max((abs(float(a) - float(b)) for a, b in zip(x, y)), default=0.0)


def distance(x: Sequence[float], y: Sequence[float], weights: Sequence[float]) -> float:
    """The check's D (see the module text): weighted by ``weights``, the ``TRIM`` share trimmed."""
    return mean_abs_distance(x, y, weights, TRIM)


def nearer_factor(served: Sequence[float], trainer: Sequence[float], alternative: Sequence[float],
                  weights: Sequence[float]) -> float:
    """Rule 1's figure: how many times nearer S is to ``alternative`` than to T, D(S, T) / D(S, A).
    1 when both are as near (or both exact)."""
    to_trainer = distance(served, trainer, weights)
    to_alternative = distance(served, alternative, weights)
    if to_alternative == 0.0:
        return 1.0 if to_trainer == 0.0 else math.inf
    return to_trainer / to_alternative


@attrs.frozen
class AgreementResult:
    """One check's figures and its verdict (distances are D of the module text: sqrt(p)-weighted
    mean absolute log-probability differences)."""

    version: int
    dtype: str
    tokens: int
    gap: float  # D(S, T)
    threshold: float  # rule 2's
    adapter_effect: float  # D(T, B): what serving the base model would show
    update_effect: float | None  # D(T, P): what serving the previous version would show
    served_vs_base: float  # D(S, B)
    served_vs_previous: float | None  # D(S, P)
    nearer: dict  # rule 1's factor per alternative ("base", "previous", "double_scale")
    gap_max_abs: float  # max_t |s_t - t_t|, for reference only
    reason: str  # why the alarm ("" when none)

    @property
    def alarm(self) -> bool:
        return bool(self.reason)

    def metrics(self) -> dict:
        return {
            "agreement_gap": self.gap,
            "agreement_threshold": self.threshold,
            "agreement_adapter_effect": self.adapter_effect,
            "agreement_update_effect": self.update_effect,
            "agreement_nearer_base": self.nearer.get("base"),
            "agreement_nearer_previous": self.nearer.get("previous"),
            "agreement_nearer_double_scale": self.nearer.get("double_scale"),
            "agreement_max_abs": self.gap_max_abs,
            "agreement_tokens": self.tokens,
        }

    def event(self) -> dict:
        """The figures for an ``events.jsonl`` record."""
        return {"version": self.version, "dtype": self.dtype, "tokens": self.tokens, "gap": self.gap,
                "threshold": self.threshold, "adapter_effect": self.adapter_effect,
                "update_effect": self.update_effect, "served_vs_base": self.served_vs_base,
                "served_vs_previous": self.served_vs_previous, "nearer": dict(self.nearer),
                "gap_max_abs": self.gap_max_abs, "alarm": self.alarm, "reason": self.reason}

    def describe(self) -> str:
        update = "n/a" if self.update_effect is None else f"{self.update_effect:.3g}"
        found = f": {self.reason}" if self.reason else ""
        return (f"adapter version {self.version}{found} (served vs trainer {self.gap:.3g}, weighted mean "
                f"abs log-prob over {self.tokens} probe tokens, threshold {self.threshold:g} for "
                f"{self.dtype}; the base model would be {self.adapter_effect:.3g} away, the previous "
                f"version {update})")


_ALTERNATIVE_WORDS = {"base": "the base model (no adapter applied)",
                      "previous": "the previous version",
                      "double_scale": "the adapter at twice its scale"}


def judge(version: int, dtype: str, served: Sequence[float], trainer: Sequence[float],
          base: Sequence[float], previous: Sequence[float] | None,
          threshold: float | None = None) -> AgreementResult:
    """The figures of one check and its verdict (see the module text for the two rules)."""
    threshold = GAP_THRESHOLD[dtype] if threshold is None else threshold
    served, trainer, base = [float(x) for x in served], [float(x) for x in trainer], [float(x) for x in base]
    _same_length(served, trainer)
    _same_length(served, base)
    alternatives = {"base": base, "double_scale": [2 * t - b for t, b in zip(trainer, base)]}
    if previous is not None:
        alternatives["previous"] = [float(x) for x in previous]
    w = probability_weights(trainer)
    nearer = {name: nearer_factor(served, trainer, alt, w) for name, alt in alternatives.items()}
    gap = distance(served, trainer, w)
    served_vs_base = distance(served, base, w)
    served_vs_previous = None if previous is None else distance(served, alternatives["previous"], w)
    reason = ""
    closest = max(nearer, key=nearer.get)
    if nearer[closest] > NEARER_FACTOR:
        reason = (f"the server serves {_ALTERNATIVE_WORDS[closest]}: its scores are {nearer[closest]:.3g} "
                  f"times nearer to that than to the trainer's adapter")
    elif gap > threshold:
        others = [d for d in (served_vs_base, served_vs_previous) if d is not None]
        if gap > CLOSER_FRACTION * min(others):
            reason = (f"the served log-probabilities are {gap:.3g} away from the trainer's, above the "
                      f"{threshold:g} that {dtype} rounding explains: other weights are served")
    return AgreementResult(
        version=version, dtype=dtype, tokens=len(served), gap=gap, threshold=threshold,
        adapter_effect=distance(trainer, base, w),
        update_effect=None if previous is None else distance(trainer, alternatives["previous"], w),
        served_vs_base=served_vs_base, served_vs_previous=served_vs_previous, nearer=nearer,
        gap_max_abs=max_abs_difference(served, trainer), reason=reason,
    )


def score_on_server(server, probe: Sequence[Sequence[int]], lora_name: str | None) -> list[float]:
    """The server's log-probabilities of every probe sequence (tokens 1..), flattened."""
    return flatten(server.prompt_logprobs(list(sequence), lora_name=lora_name) for sequence in probe)


def check_server(server, probe: Sequence[Sequence[int]], trainer: Sequence[float], base: Sequence[float], *,
                 lora_name: str | None, dtype: str, version: int = 0,
                 previous: Sequence[float] | None = None, threshold: float | None = None) -> AgreementResult:
    """Judge what ``server`` serves under ``lora_name`` against the trainer's scores of ``probe``.

    Works with any ``RolloutServer`` (it calls ``prompt_logprobs`` only). ``trainer``, ``base``
    and ``previous`` are flat scores of the same probe (``flatten`` of the engine's
    ``compute_logprobs``). Returns the figures; raises ``AgreementError`` with them on an alarm.

    :raises ValueError: the probe scores fewer than ``MIN_DECISION_TOKENS`` tokens (the server is
        not asked).
    """
    scored = sum(max(len(sequence) - 1, 0) for sequence in probe)
    if scored < MIN_DECISION_TOKENS:
        raise ValueError(f"the agreement probe scores {scored} tokens; use at least {MIN_DECISION_TOKENS}")
    served = score_on_server(server, probe, lora_name)
    result = judge(version, dtype, served, trainer, base, previous, threshold)
    if result.alarm:
        raise AgreementError(f"{lora_name or 'the base model'} on {server.name}: {result.describe()}")
    return result
