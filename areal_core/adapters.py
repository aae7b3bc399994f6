"""The adapters of a run, and each one's view of the configuration.

A run without ``adapters:`` trains one adapter, named ``gconfig.lora_name``, with the run's own
settings. A run with ``adapters:`` trains each entry on the one frozen base. Each adapter sees
the run through ``adapter_run_config``: a ``RunConfig`` whose ``actor`` LoRA and optimizer
settings, ``train.batch_size``, ``rollout.max_head_offpolicyness``, ``gconfig`` (with
``lora_name`` set to the adapter's name), ``dataset`` and ``reward`` are the adapter's own, so the
per-adapter code of the GRPO loop reads the settings it always read.
"""

from __future__ import annotations

import attrs

from areal_core.config import AdapterConfig, RunConfig


def run_adapters(config: RunConfig) -> list[AdapterConfig]:
    """The adapters the run trains: ``config.adapters``, or the one the top-level settings make."""
    if config.adapters:
        return list(config.adapters)
    a = config.actor
    return [AdapterConfig(
        name=config.gconfig.lora_name, lora_rank=a.lora_rank, lora_alpha=a.lora_alpha,
        target_modules=list(a.target_modules), peft_type=a.peft_type, optimizer=a.optimizer,
        batch_size=config.train.batch_size, max_head_offpolicyness=config.rollout.max_head_offpolicyness,
        gconfig=config.gconfig, dataset=config.dataset, reward=config.reward)]


def adapter_run_config(config: RunConfig, adapter: AdapterConfig) -> RunConfig:
    """``config`` as ``adapter`` sees it (see the module docstring); ``adapters`` is kept."""
    actor = attrs.evolve(config.actor, lora_rank=adapter.lora_rank, lora_alpha=adapter.lora_alpha,
                         target_modules=list(adapter.target_modules), peft_type=adapter.peft_type,
                         optimizer=adapter.optimizer)
    return attrs.evolve(
        config, actor=actor,
        rollout=attrs.evolve(config.rollout, max_head_offpolicyness=adapter.max_head_offpolicyness),
        gconfig=attrs.evolve(adapter.gconfig, lora_name=adapter.name),
        train=attrs.evolve(config.train, batch_size=adapter.batch_size),
        dataset=adapter.dataset, reward=adapter.reward)


def adapter_views(config: RunConfig) -> list[tuple[AdapterConfig, RunConfig]]:
    """Every adapter of the run with its view of the configuration, in the order listed."""
    return [(adapter, adapter_run_config(config, adapter)) for adapter in run_adapters(config)]
