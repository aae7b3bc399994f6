"""The agreement check after a load: the server's log-probabilities of a probe versus the trainer's.

Works with any ``RolloutServer`` (it only calls ``prompt_logprobs``); the comparison itself is
``areal_core.agreement.check_agreement``.
"""

from __future__ import annotations

import logging
from typing import Sequence

from areal_core.agreement import check_agreement
from areal_core.interfaces import RolloutServer

logger = logging.getLogger("areal_vllm")

#: Shorter probes can miss a wrong adapter whose effect happens to be small on a few tokens.
MIN_PROBE_TOKENS = 64


def check_server_agreement(
    server: RolloutServer,
    probe_ids: Sequence[int],
    trainer_logprobs: Sequence[float],
    *,
    lora_name: str | None,
    tolerance: float,
) -> float:
    """Compare the server's log-probabilities of ``probe_ids`` under ``lora_name`` with the trainer's.

    :param probe_ids: a fixed probe sequence of at least ``MIN_PROBE_TOKENS`` token ids.
    :param trainer_logprobs: the trainer's ``log p(probe_ids[i] | probe_ids[:i])`` for i >= 1
        (``len(probe_ids) - 1`` values), from the adapter just exported.
    :param lora_name: the version name just loaded (None compares the base model).
    :param tolerance: ``train.agreement_tolerance``.
    :return: the maximum absolute difference (also logged).
    :raises ValueError: the probe is shorter than ``MIN_PROBE_TOKENS``.
    :raises AgreementError: the difference is above ``tolerance``.
    """
    if len(probe_ids) < MIN_PROBE_TOKENS:
        raise ValueError(f"the agreement probe has {len(probe_ids)} tokens; use at least {MIN_PROBE_TOKENS}")
    served = server.prompt_logprobs(probe_ids, lora_name=lora_name)
    what = f"{lora_name or 'the base model'} on {server.name}"
    difference = check_agreement(served, trainer_logprobs, tolerance, what)
    logger.info("agreement %s: max |server - trainer| log-prob = %.3g over %d tokens",
                what, difference, len(served))
    return difference
