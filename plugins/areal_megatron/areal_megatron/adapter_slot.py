"""One adapter of the megatron engine: its settings, placements, parameters, optimizer and steps."""

from __future__ import annotations

import torch

from areal_core.config import ActorConfig
from areal_megatron.lora import Placement


class AdapterSlot:
    """An adapter on the engine's frozen base.

    ``key`` names its modules in every adapted layer (``<layer>.lora.<key>``): its position in the
    run, so any adapter name is usable. ``legacy`` marks a run's only adapter of a run without
    ``adapters:``, whose checkpoints keep the one-adapter layout they always had.
    """

    def __init__(self, name: str, position: int, actor: ActorConfig, placements: list[Placement],
                 legacy: bool):
        self.name = name  # the run's name of it (``adapter=``, ``adapter_name``)
        self.position = position
        self.key = str(position)
        self.actor = actor  # its LoRA settings and its optimizer
        self.placements = placements
        self.legacy = legacy
        self.parameters: dict[str, torch.nn.Parameter] = {}  # by local (megatron-bridge) name
        self.optimizer: torch.optim.Optimizer | None = None
        self.steps = 0  # its optimizer steps taken (restored by load_checkpoint)

    @property
    def target_modules(self) -> list[str]:
        """The HF short names of the modules it adapts, sorted (as its export lists them)."""
        return sorted({m for p in self.placements for m in p.hf_modules})

    def build_optimizer(self) -> None:
        opt = self.actor.optimizer
        self.optimizer = torch.optim.AdamW(list(self.parameters.values()), lr=opt.lr, betas=tuple(opt.betas),
                                           eps=opt.eps, weight_decay=opt.weight_decay)
