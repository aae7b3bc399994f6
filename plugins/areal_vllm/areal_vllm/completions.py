"""The ``/v1/completions`` requests we send and how their answers become samples and log-probs.

Prompts go in as token ids and completions come back as token ids (``return_token_ids``) with
the log-probability of each sampled token (``logprobs: 0``); prompt log-probabilities come from
``prompt_logprobs: 0``. vLLM reports raw log-probabilities (the model's, before temperature or
top-p/top-k), the quantity the trainer computes.
"""

from __future__ import annotations

from typing import Any, Sequence

from areal_core.errors import ArealError
from areal_core.interfaces import Sample, SamplingParams


def completion_request(model: str, prompt_ids: Sequence[int], n: int, sampling: SamplingParams) -> dict:
    """The body asking ``model`` (a base model or an adapter name) for ``n`` samples of a prompt."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": [int(t) for t in prompt_ids],
        "n": n,
        "max_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else 0,
        "logprobs": 0,
        "return_token_ids": True,
        "skip_special_tokens": False,
    }
    if sampling.stop_token_ids:
        body["stop_token_ids"] = [int(t) for t in sampling.stop_token_ids]
    if sampling.ignore_eos:
        body["ignore_eos"] = True  # vLLM's extra sampling parameter of /v1/completions
    if sampling.seed is not None:
        body["seed"] = sampling.seed  # vLLM gives the i-th of the n samples seed + i
    return body


def samples_from_completion(body: dict, prompt_ids: Sequence[int], version: int, n: int) -> list[Sample]:
    """The ``n`` samples of one completion answer, each tagged with ``version``."""
    choices = sorted(body.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != n:
        raise ArealError(f"vLLM returned {len(choices)} completions where {n} were asked for")
    prompt = tuple(int(t) for t in prompt_ids)
    samples = []
    for choice in choices:
        token_ids = choice.get("token_ids")
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if token_ids is None or logprobs is None or len(token_ids) != len(logprobs):
            raise ArealError(
                "vLLM's completion lacks token ids or their log-probabilities "
                f"({0 if token_ids is None else len(token_ids)} ids, "
                f"{0 if logprobs is None else len(logprobs)} log-probs); the server must be vLLM "
                "with return_token_ids support (>= 0.10)"
            )
        samples.append(Sample(
            prompt_ids=prompt,
            output_ids=tuple(int(t) for t in token_ids),
            logprobs=tuple(float(lp) for lp in logprobs),
            version=version,
            finish_reason=choice.get("finish_reason") or "",
        ))
    return samples


def prompt_logprobs_request(model: str, token_ids: Sequence[int]) -> dict:
    """The body asking ``model`` for the log-probabilities of ``token_ids`` as a prompt."""
    return {
        "model": model,
        "prompt": [int(t) for t in token_ids],
        "max_tokens": 1,
        "temperature": 0.0,
        "prompt_logprobs": 0,
    }


def prompt_logprobs_from_completion(body: dict, token_ids: Sequence[int]) -> list[float]:
    """``log p(token_ids[i] | token_ids[:i])`` for i >= 1, from a ``prompt_logprobs`` answer."""
    choices = body.get("choices") or []
    entries = choices[0].get("prompt_logprobs") if choices else None
    if entries is None or len(entries) != len(token_ids):
        raise ArealError(
            f"vLLM returned {0 if entries is None else len(entries)} prompt log-prob entries "
            f"for {len(token_ids)} prompt tokens"
        )
    values = []
    for position, (token, entry) in enumerate(zip(token_ids[1:], entries[1:]), start=1):
        found = (entry or {}).get(str(int(token)))
        if found is None:
            raise ArealError(f"vLLM's prompt log-probs miss token {token} at position {position}")
        values.append(float(found["logprob"]))
    return values
