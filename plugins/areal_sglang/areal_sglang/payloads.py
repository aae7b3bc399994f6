"""The JSON bodies the client sends to SGLang's native HTTP API, and the reading of its answers.

Every body for ``/generate`` names an adapter in ``lora_path``: SGLang serves a request without
it with the base model, silently. ``require_lora_path`` is the one gate every generate body goes
through before it is sent.
"""

from __future__ import annotations

from typing import Any, Sequence

from areal_core.errors import ArealError
from areal_core.interfaces import SamplingParams


def require_lora_path(payload: dict) -> dict:
    """Return ``payload`` unchanged if it names an adapter version; raise ArealError if not.

    A generate request without ``lora_path`` (or with an empty one) would be served by the base
    model without any error, so it is never sent.
    """
    lora_path = payload.get("lora_path")
    names = lora_path if isinstance(lora_path, list) else [lora_path]
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ArealError(
            f"refusing to send a generate request without an adapter version in lora_path "
            f"(got {lora_path!r}); SGLang would serve it with the base model"
        )
    return payload


def sampling_fields(sampling: SamplingParams, n: int) -> dict[str, Any]:
    """SGLang's ``sampling_params`` for one request of ``n`` samples."""
    fields: dict[str, Any] = {
        "max_new_tokens": sampling.max_new_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "n": n,
    }
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.stop_token_ids:
        fields["stop_token_ids"] = list(sampling.stop_token_ids)
    if sampling.ignore_eos:
        fields["ignore_eos"] = True
    return fields


def sample_seeds(seed: int, prompt_index: int, n: int) -> list[int]:
    """Distinct seeds of the ``n`` samples of prompt ``prompt_index`` in a call seeded ``seed``.

    SGLang's seeded sampling (applied when the server runs with
    ``--enable-deterministic-inference``; ignored otherwise) draws from a hash of
    (seed, position): samples sharing a seed would be identical, so each sample gets its own.
    """
    return [(seed * 1_000_003 + prompt_index * 10_007 + sample) % 2**31 for sample in range(n)]


def generate_payload(
    input_ids: Sequence[int], *, lora_name: str, n: int, sampling: SamplingParams,
    prompt_index: int = 0,
) -> dict:
    """The body of ``POST /generate``: ``n`` samples of one token-id prompt under ``lora_name``.

    Unseeded, one request with ``n``; seeded (``sampling.seed``), a batch of ``n`` copies of the
    prompt, each with its own seed from ``sample_seeds(sampling.seed, prompt_index, n)``. Either
    way SGLang answers with the ``n`` completions in order (a single dict when ``n`` is 1).
    """
    ids = [int(token) for token in input_ids]
    if sampling.seed is None:
        body = {"input_ids": ids, "sampling_params": sampling_fields(sampling, n)}
    else:
        seeds = sample_seeds(sampling.seed, prompt_index, n)
        per_sample = [{**sampling_fields(sampling, 1), "sampling_seed": seed} for seed in seeds]
        body = {"input_ids": [ids] * n, "sampling_params": per_sample} if n > 1 else \
            {"input_ids": ids, "sampling_params": per_sample[0]}
    return require_lora_path({**body, "return_logprob": True, "lora_path": lora_name})


def prompt_logprobs_payload(token_ids: Sequence[int], *, lora_name: str) -> dict:
    """The body of ``POST /generate`` that scores ``token_ids`` and generates nothing."""
    return require_lora_path(
        {
            "input_ids": [int(token) for token in token_ids],
            "sampling_params": {"max_new_tokens": 0, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": 0,
            "lora_path": lora_name,
        }
    )


def load_payload(lora_name: str, path: str) -> dict:
    """The body of ``POST /load_lora_adapter``."""
    return {"lora_name": lora_name, "lora_path": path}


def unload_payload(lora_name: str) -> dict:
    """The body of ``POST /unload_lora_adapter``."""
    return {"lora_name": lora_name}


def read_completion(answer: dict) -> tuple[tuple[int, ...], tuple[float, ...], str]:
    """``(output_ids, logprobs, finish_reason)`` of one completion in a ``/generate`` answer.

    :raises ArealError: when SGLang aborted the request or its answer lacks the logprobs asked for.
    """
    meta = answer.get("meta_info") or {}
    finish = meta.get("finish_reason") or {}
    reason = finish.get("type", "") if isinstance(finish, dict) else str(finish)
    if reason == "abort":
        raise ArealError(f"SGLang aborted the request: {finish.get('message', finish)}")
    token_logprobs = meta.get("output_token_logprobs")
    if token_logprobs is None:
        raise ArealError(f"SGLang's answer has no output_token_logprobs: {sorted(meta)}")
    output_ids = tuple(int(entry[1]) for entry in token_logprobs)
    logprobs = tuple(float(entry[0]) for entry in token_logprobs)
    stated_ids = answer.get("output_ids")
    if stated_ids is not None and tuple(stated_ids) != output_ids:
        raise ArealError(
            f"SGLang's output_ids {stated_ids} disagree with its logprob tokens {list(output_ids)}"
        )
    return output_ids, logprobs, reason


def read_prompt_logprobs(answer: dict, expected_tokens: int) -> list[float]:
    """Log-probabilities of tokens 1.. of the prompt from a ``prompt_logprobs_payload`` answer."""
    entries = (answer.get("meta_info") or {}).get("input_token_logprobs")
    if entries is None:
        raise ArealError("SGLang's answer has no input_token_logprobs")
    # The first prompt token has no prefix to be predicted from: SGLang gives it None.
    values = [entry[0] for entry in entries[1:]]
    if len(values) != expected_tokens or any(value is None for value in values):
        raise ArealError(
            f"SGLang returned {len(values)} prompt logprobs, expected {expected_tokens} numbers"
        )
    return [float(value) for value in values]
