"""Adapter injection (LoRA step 1 of 4): wrap the target linear modules with peft LoRA layers.

Done before sharding, on the plain Hugging Face model. The adapter is float32 whatever dtype
the base was loaded in (peft's ``autocast_adapter_dtype``), so a bfloat16 frozen base trains a
float32 adapter with float32 optimizer state. Every rank starts from the same adapter: it is
initialised from ``train.seed`` and then broadcast from rank 0.

Several adapters on one base: the first is made with ``get_peft_model``, each further one with
peft's ``add_adapter`` and its own ``LoraConfig`` (its own rank, alpha and target modules), each
initialised from ``adapter_seed(train.seed, position)``. Every adapter's parameters stay
trainable for FSDP2 (``make_adapters_trainable``); which adapter a forward uses is set on the
tuner layers by ``route`` and ``adapters_disabled``, never by peft's ``set_adapter`` or
``disable_adapter``, which toggle ``requires_grad`` (after ``fully_shard`` that would leave FSDP2's
unsharded parameters disagreeing with the sharded ones).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from typing import Iterable

import torch
import torch.distributed as dist

from areal_core.config import ActorConfig
from areal_core.errors import AdapterError

from areal_fsdp2.model_inspection import moe_refusal
from areal_fsdp2.target_modules import TargetModuleError, resolve_target_modules

ADAPTER_NAME = "default"  # the peft name of a run's only adapter (runs without ``adapters:``)


def adapter_seed(seed: int, position: int) -> int:
    """The seed of the adapter at ``position``: ``seed`` itself for the first, so the first adapter of
    several starts where a run's only adapter starts."""
    return seed if position == 0 else seed + 1_000_003 * position


def parameter_pattern(peft_name: str) -> re.Pattern:
    """Matches the names of the LoRA parameters of the peft adapter ``peft_name``."""
    return re.compile(r"(^|\.)lora_[AB]\." + re.escape(peft_name) + r"\.")


def adapter_parameter_names(model: torch.nn.Module, peft_name: str) -> list[str]:
    """The names of ``peft_name``'s LoRA parameters in ``model`` (kept by FSDP2)."""
    pattern = parameter_pattern(peft_name)
    return [name for name, _ in model.named_parameters() if pattern.search(name)]


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Sorted short names of the ``nn.Linear`` modules of ``model`` (a peft model's base modules:
    its LoRA layers count under the name of the module they wrap)."""
    names = set()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or re.search(r"(^|\.)lora_[A-Za-z_]+\.", name):
            continue
        names.add(name.removesuffix(".base_layer").rsplit(".", 1)[-1])
    return sorted(names)


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


def inject_lora(model: torch.nn.Module, actor: ActorConfig, *, seed: int,
                adapter_name: str = ADAPTER_NAME) -> torch.nn.Module:
    """``model`` wrapped as a peft model with a LoRA adapter ``adapter_name`` on ``actor.target_modules``.

    Only the adapter is trainable. The adapter's random part (lora_A) is drawn from a generator
    seeded with ``seed`` without disturbing the global random state. Raises AdapterError
    (before touching the model) for target modules that match no linear module, listing the
    model's linear modules. ``model`` may already be a peft model: the adapter is then added
    beside its adapters (``add_adapter``), and peft leaves the new one untrainable until
    ``make_adapters_trainable``.
    """
    refuse_unadaptable(model, actor)
    try:
        targets = resolve_target_modules(actor.target_modules, linear_module_names(model))
    except TargetModuleError as exc:
        raise AdapterError(str(exc)) from None
    from peft import LoraConfig, PeftModel, get_peft_model

    lora_config = LoraConfig(
        r=actor.lora_rank,
        lora_alpha=actor.lora_alpha,
        target_modules=targets,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns about a name inside its "lora_" prefix (such as "a"): that only matters to
        # loading adapters through peft's state-dict functions, which the engine never uses.
        warnings.filterwarnings("ignore", message="Adapter name .* should not be contained in the prefix")
        torch.manual_seed(seed)
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, lora_config)
            peft_model = model
        else:
            peft_model = get_peft_model(model, lora_config, adapter_name=adapter_name)
    if not adapter_parameter_names(peft_model, adapter_name):
        raise AdapterError(f"LoRA bound no module for target_modules {actor.target_modules}")
    return peft_model


def _tuner_layers(model: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in model.modules() if isinstance(module, BaseTunerLayer)]


def make_adapters_trainable(model: torch.nn.Module, peft_names: Iterable[str]) -> None:
    """Every LoRA parameter of the adapters ``peft_names`` trainable (peft trains only the
    active one), the rest of the model frozen as peft left it."""
    patterns = [parameter_pattern(name) for name in peft_names]
    for name, param in model.named_parameters():
        if any(pattern.search(name) for pattern in patterns):
            param.requires_grad_(True)


def route(model: torch.nn.Module, peft_name: str) -> None:
    """Make every forward of ``model`` use the adapter ``peft_name`` only (layers without it add
    nothing), without touching any parameter's ``requires_grad``."""
    for layer in _tuner_layers(model):
        layer._active_adapter = [peft_name]
    base = getattr(model, "base_model", None)
    if base is not None and hasattr(base, "active_adapter"):
        base.active_adapter = peft_name  # what peft's model-level forward reads its config from


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Within the block ``model`` computes the base model (no adapter), ``requires_grad`` untouched."""
    layers = _tuner_layers(model)
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, was in zip(layers, before):
            layer._disable_adapters = was


def make_all_trainable(model: torch.nn.Module) -> torch.nn.Module:
    """Full fine-tuning: every parameter trains, no adapter."""
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def broadcast_trainable_from_rank0(model: torch.nn.Module, device: torch.device,
                                   names: Iterable[str] | None = None) -> None:
    """Copy rank 0's trainable parameters (or those named ``names``) to every rank (collective,
    before sharding).

    Tensors travel through ``device`` (nccl cannot send CPU tensors) and come back in place.
    """
    if dist.get_world_size() == 1:
        return
    wanted = None if names is None else set(names)
    for name, param in model.named_parameters():
        if param.requires_grad if wanted is None else name in wanted:
            buffer = param.detach().to(device)
            dist.broadcast(buffer, src=0)
            param.data.copy_(buffer.to(param.device))
