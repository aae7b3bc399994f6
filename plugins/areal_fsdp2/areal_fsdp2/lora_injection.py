"""Adapter injection (LoRA step 1 of 4): wrap the target linear modules with peft LoRA layers.

Done before sharding, on the plain Hugging Face model. The adapter is float32 whatever dtype
the base was loaded in (peft's ``autocast_adapter_dtype``), so a bfloat16 frozen base trains a
float32 adapter with float32 optimizer state. Every rank starts from the same adapter: it is
initialised from ``train.seed`` and then broadcast from rank 0.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from areal_core.config import ActorConfig
from areal_core.errors import AdapterError

from areal_fsdp2.model_inspection import moe_refusal
from areal_fsdp2.target_modules import TargetModuleError, resolve_target_modules

ADAPTER_NAME = "default"


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted short names of the ``nn.Linear`` modules of ``model``."""
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if isinstance(module, torch.nn.Linear)}
    )


def refuse_unadaptable(model: torch.nn.Module, actor: ActorConfig) -> None:
    """Raise AdapterError for a peft type other than LoRA, a bad rank/alpha, or an MoE model."""
    if str(actor.peft_type).lower() != "lora":
        raise AdapterError(
            f"actor.peft_type is {actor.peft_type!r}: the fsdp2 engine trains LoRA adapters only; "
            f"set actor.peft_type: lora"
        )
    if not isinstance(actor.lora_rank, int) or actor.lora_rank < 1:
        raise AdapterError(f"actor.lora_rank must be an integer >= 1 (got {actor.lora_rank!r})")
    if not actor.lora_alpha > 0:
        raise AdapterError(f"actor.lora_alpha must be positive (got {actor.lora_alpha!r})")
    config = getattr(model, "config", None)
    refusal = moe_refusal(config.to_dict()) if config is not None else ""
    if not refusal and any(name.endswith(".experts") for name, _ in model.named_modules()):
        refusal = (
            "the model has expert modules (mixture-of-experts); the fsdp2 engine trains LoRA on "
            "dense models only"
        )
    if refusal:
        raise AdapterError(f"{refusal}; choose a dense model")


def inject_lora(model: torch.nn.Module, actor: ActorConfig, *, seed: int) -> torch.nn.Module:
    """``model`` wrapped as a peft model with a LoRA adapter on ``actor.target_modules``.

    Only the adapter is trainable. The adapter's random part (lora_A) is drawn from a generator
    seeded with ``seed`` without disturbing the global random state. Raises AdapterError
    (before touching the model) for target modules that match no linear module, listing the
    model's linear modules.
    """
    refuse_unadaptable(model, actor)
    try:
        targets = resolve_target_modules(actor.target_modules, linear_module_names(model))
    except TargetModuleError as exc:
        raise AdapterError(str(exc)) from None
    from peft import LoraConfig, get_peft_model

    lora_config = LoraConfig(
        r=actor.lora_rank,
        lora_alpha=actor.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, lora_config, adapter_name=ADAPTER_NAME)
    if not any(p.requires_grad for p in peft_model.parameters()):
        raise AdapterError(f"LoRA bound no module for target_modules {actor.target_modules}")
    return peft_model


def make_all_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains, no adapter."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def broadcast_trainable_from_rank0(model: torch.nn.Module, device: torch.device) -> None:
    """Copy rank 0's trainable parameters to every rank (collective, before sharding).

    Tensors travel through ``device`` (nccl cannot send CPU tensors) and come back in place.
    """
    if dist.get_world_size() == 1:
        return
    for param in model.parameters():
        if param.requires_grad:
            buffer = param.detach().to(device)
            dist.broadcast(buffer, src=0)
            param.data.copy_(buffer.to(param.device))
