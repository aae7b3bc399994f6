"""Sharding (LoRA step 2 of 4): FSDP2 ``fully_shard`` per decoder layer and on the root.

Frozen base weights and the trainable adapter of a layer share one FSDP unit (mixed dtypes are
fine: a bfloat16 base and a float32 adapter). Gradients are SUMMED over ranks, not averaged:
the loop's loss is already divided by its global normaliser, so the update must be that of the
sum of every rank's micro-batch losses.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from areal_core.config import ActorConfig
from areal_core.errors import ArealError

from areal_fsdp2.model_loading import torch_dtype


def decoder_layers(hf_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks of a Hugging Face model: the classes in its ``_no_split_modules``."""
    block_names = set(getattr(hf_model, "_no_split_modules", None) or ())
    layers = [module for module in hf_model.modules() if type(module).__name__ in block_names]
    if not layers:
        raise ArealError(
            f"cannot find the decoder layers of {type(hf_model).__name__} (its _no_split_modules "
            f"is {sorted(block_names)}); the fsdp2 engine shards Hugging Face causal LMs that "
            f"declare their decoder layer class there"
        )
    return layers


def mixed_precision_policy(actor: ActorConfig) -> MixedPrecisionPolicy:
    """``actor.param_dtype`` ("" = the dtype each parameter has) and ``actor.reduce_dtype``."""
    param_dtype = torch_dtype(actor.param_dtype, "actor.param_dtype") if actor.param_dtype else None
    reduce_dtype = torch_dtype(actor.reduce_dtype, "actor.reduce_dtype")
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def kept_whole(model: torch.nn.Module, layers: list[torch.nn.Module], actor: ActorConfig) -> set:
    """The parameters FSDP2 leaves unsharded: ``frozen_outside_layers``; every frozen parameter
    under ``actor.replicate_base``; and the adapter itself under ``actor.replicate_adapter``
    (its gradients are then all-reduced by the engine)."""
    whole = frozen_outside_layers(model, layers, actor)
    if actor.replicate_base and not actor.full_finetune:
        whole |= {p for p in model.parameters() if not p.requires_grad}
    if actor.replicate_adapter and not actor.full_finetune:
        whole |= {p for p in model.parameters() if p.requires_grad}
    return whole


def frozen_outside_layers(
    model: torch.nn.Module, layers: list[torch.nn.Module], actor: ActorConfig
) -> set[torch.nn.Parameter]:
    """The frozen parameters outside the decoder layers (embeddings, final norm, output layer)
    that a LoRA model keeps whole on every rank instead of sharding.

    The root unit's parameters stay gathered from the start of the forward pass to the end of
    the backward pass, so sharding them saves nothing at the peak and costs an all-gather (and
    its copy) every pass. Not with ``actor.param_dtype``: a kept parameter is not cast.
    """
    if actor.full_finetune or actor.param_dtype:
        return set()
    in_layers = {id(param) for layer in layers for param in layer.parameters()}
    return {p for p in model.parameters() if id(p) not in in_layers and not p.requires_grad}


def no_backward_prefetch(layers: list[torch.nn.Module]) -> None:
    """Gather each layer in backward only when its own backward starts.

    By default FSDP2 gathers the next layer's weights as a layer's backward starts, so that on an
    accelerator the all-gather overlaps the compute on a stream of its own. On the CPU there are
    no streams: the prefetched all-gather runs before the compute anyway, and only holds a second
    layer's full weights at the peak (34 MB per rank for the 125M shape; the LoRA peak fell
    from 0.45x to 0.42x of full fine-tuning's). FSDP2 has no switch for it: a layer whose
    explicit prefetch list holds only itself (already gathered then, so a no-op) replaces the
    default prefetch.
    """
    for layer in layers:
        layer.set_modules_to_backward_prefetch([layer])


def shard_model(
    model: torch.nn.Module, hf_model: torch.nn.Module, actor: ActorConfig, mesh: DeviceMesh
) -> None:
    """Shard ``model`` (the peft wrapper, or the HF model itself) in place over ``mesh``.

    ``hf_model`` is the transformers model inside it (where the decoder layers and gradient
    checkpointing live). Parameters move to the mesh's device as they are sharded; those in
    ``kept_whole`` stay whole on every rank.
    """
    if actor.gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = mixed_precision_policy(actor)
    layers = decoder_layers(hf_model)
    whole = kept_whole(model, layers, actor)
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy, ignored_params=whole or None)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=whole or None)
    device = mesh.device_type
    if device == "cpu":
        no_backward_prefetch(layers)
    with torch.no_grad():
        for param in whole:
            if not param.is_meta and param.device.type != device:
                param.data = param.data.to(device)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            # SUM instead of FSDP's default average. gloo has no pre-multiplied sum, so the
            # divide factor of 1 must go through a plain SUM reduction.
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
