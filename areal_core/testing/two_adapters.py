"""Two adapters that differ in every setting an engine keeps per adapter: LoRA rank and alpha,
target modules, learning rate, schedule and gradient clip. An engine's several-adapter tests
train both on one base (the fsdp2 and megatron suites do), so a setting an engine shares by
mistake shows up as the other adapter's value.

No weight decay: a zero gradient leaves an adapter bit for bit. AdamW's eps is large (1e-3) so
that an update is a smooth function of the gradient: the tests compare trained adapters across
layouts and resumes, where a tiny eps would turn rounding noise in near-zero gradients into jumps
of up to lr.
"""

from __future__ import annotations

from areal_core.config import AdapterConfig, OptimizerConfig

TWO_ADAPTERS = (
    AdapterConfig(name="alpha", lora_rank=4, lora_alpha=8, target_modules=["all-linear"],
                  optimizer=OptimizerConfig(lr=1e-2, eps=1e-3, weight_decay=0.0, lr_scheduler_type="linear",
                                            grad_clip=1.0)),
    AdapterConfig(name="beta", lora_rank=2, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                  optimizer=OptimizerConfig(lr=5e-3, eps=1e-3, weight_decay=0.0, grad_clip=0.5)),
)
