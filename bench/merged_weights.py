"""The merged-weights baseline's trainer side: merge the LoRA adapter into the base, gather it all.

What a TRL-style trainer does before each weight update of the inference server, written for the
fsdp2 engine's sharded peft model. FSDP2 shards every parameter on its first dimension, so a
rank's rows of a base weight W and of lora_B line up: the rank merges its own rows,
``W_rows + scaling * B_rows @ A`` (A, a few rows, is gathered whole), into a new tensor (the
trained base stays untouched, so nothing needs unmerging), and the merged weights are then
gathered like any other parameter.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

PEFT_PREFIX = "base_model.model."
ADAPTER_NAME = "default"


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft's LoRA layers by module name (those with a ``base_layer`` and ``lora_A``)."""
    return {name: module for name, module in model.named_modules()
            if hasattr(module, "base_layer") and hasattr(module, "lora_A")}


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _merged_rows(layer: torch.nn.Module) -> torch.Tensor:
    """The merged weight of one LoRA layer, as the same kind of (sharded) tensor as its base."""
    weight = layer.base_layer.weight
    a = _full(layer.lora_A[ADAPTER_NAME].weight).to(torch.float32)
    b = layer.lora_B[ADAPTER_NAME].weight
    scaling = layer.scaling[ADAPTER_NAME]
    if not isinstance(weight, DTensor):
        return (weight.float() + scaling * b.float() @ a).to(weight.dtype)
    rows, b_rows = weight.to_local(), b.to_local()
    if rows.shape[0] != b_rows.shape[0]:
        raise RuntimeError(f"base weight rows {tuple(rows.shape)} and lora_B rows "
                           f"{tuple(b_rows.shape)} are sharded differently")
    merged = (rows.float() + scaling * b_rows.float() @ a).to(rows.dtype)
    return DTensor.from_local(merged, weight.device_mesh, weight.placements,
                              shape=weight.shape, stride=weight.stride())


def hf_name(parameter_name: str) -> str:
    """The Hugging Face checkpoint name of a parameter of the peft model."""
    name = parameter_name.removeprefix(PEFT_PREFIX)
    return name.replace(".base_layer.", ".")


def merge_and_gather(model: torch.nn.Module, keep: bool) -> dict[str, torch.Tensor]:
    """The merged model's full weights in HF naming (collective: every rank calls it).

    Every rank takes part in every gather; only a rank with ``keep`` keeps the CPU copies
    (the others get ``{}``). Tied weights appear once, as ``named_parameters`` lists them.
    """
    layers = _lora_layers(model)
    base_weights = {f"{name}.base_layer.weight": layer for name, layer in layers.items()}
    gathered: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if ".lora_" in name:
            continue
        source = _merged_rows(base_weights[name]) if name in base_weights else param.detach()
        full = _full(source).detach()
        if keep:
            # A gathered DTensor is a fresh tensor; an unsharded parameter must be copied.
            copy = not isinstance(source, DTensor)
            gathered[hf_name(name)] = full.to("cpu", copy=copy).contiguous()
        del full, source
    return gathered
