"""The agreement check after a load, as the vLLM plugin's tests and tools call it.

The check itself is the core's (``areal_core.agreement``): the server's scores of a probe judged
against the trainer's current adapter, its base model and its previous version, with a threshold
derived from the dtype. This is a thin entry point kept for callers of the plugin.
"""

from __future__ import annotations

import logging
from typing import Sequence

from areal_core.agreement import AgreementResult, check_server
from areal_core.interfaces import RolloutServer

logger = logging.getLogger("areal_vllm")


def check_server_agreement(
    server: RolloutServer,
    probe: Sequence[Sequence[int]],
    trainer: Sequence[float],
    base: Sequence[float],
    *,
    lora_name: str | None,
    dtype: str = "float32",
    previous: Sequence[float] | None = None,
) -> AgreementResult:
    """Judge what ``server`` serves under ``lora_name`` (None: the base model).

    :param probe: probe sequences scoring at least ``areal_core.agreement.MIN_DECISION_TOKENS``
        tokens in all.
    :param trainer: the trainer's flat scores of the probe under the adapter just exported.
    :param base: the same with the adapter disabled.
    :raises ValueError: the probe is too short (the server is not asked).
    :raises AgreementError: the served scores are not the trainer's adapter.
    """
    result = check_server(server, probe, trainer, base, lora_name=lora_name, dtype=dtype, previous=previous)
    logger.info("agreement %s on %s: %s", lora_name or "base model", server.name, result.describe())
    return result
