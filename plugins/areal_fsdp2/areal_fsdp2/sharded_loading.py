"""Loading the base model straight into each rank's shards: no rank ever holds the whole model.

The model is built with its parameters on the meta device (buffers stay real: rotary tables are
computed at construction and are not in checkpoints), the adapter is injected and
materialised, FSDP2 shards the meta parameters, ``to_empty`` allocates each rank's shards, and
each rank reads only its rows of each weight from the safetensors files. A rank's peak during
loading is its shard plus one weight's rows, instead of the whole model (a memory-mapped
checkpoint counts in the resident set of every rank that reads it).

Used when every parameter of the built model has a tensor of the same shape in the checkpoint
under its own name (Llama/Qwen-style checkpoints); otherwise the engine loads the whole model
on every rank and shards it, as before.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor

from areal_core.config import ActorConfig

from areal_fsdp2.safetensors_rows import CheckpointTensors
from areal_fsdp2.shard_layout import local_rows

PEFT_BASE_LAYER = ".base_layer"


@contextlib.contextmanager
def parameters_on_meta():
    """Within the block, every parameter a module registers is put on the meta device."""
    original = torch.nn.Module.register_parameter

    def register_parameter(module, name, param):
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    torch.nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = original


def checkpoint_key(parameter_name: str) -> str:
    """The checkpoint key of a (possibly peft-wrapped) base parameter of the HF model."""
    return parameter_name.replace(PEFT_BASE_LAYER, "")


def build_meta_model(actor: ActorConfig, dtype: torch.dtype):
    """``(hf_model on meta, CheckpointTensors)``, or None when the checkpoint cannot be read
    row by row for this model (then the caller loads the whole model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        checkpoint = CheckpointTensors(actor.path)
    except (OSError, ValueError, KeyError):
        return None
    config = AutoConfig.from_pretrained(
        actor.path, local_files_only=True, trust_remote_code=actor.trust_remote_code
    )
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, trust_remote_code=actor.trust_remote_code
        )
    model.config.use_cache = False
    keys = checkpoint.keys()
    for param, names in _aliases(model).items():
        found = [checkpoint_key(n) for n in names if checkpoint_key(n) in keys]
        if not found or checkpoint.shape(found[0]) != tuple(param.shape) or param.dim() == 0:
            return None
    return model, checkpoint


def _aliases(model: torch.nn.Module) -> dict[torch.nn.Parameter, list[str]]:
    """Every parameter of ``model`` with all the names it has (tied weights have several)."""
    names: dict[torch.nn.Parameter, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names.setdefault(param, []).append(name)
    return names


def materialise_meta_adapter(model: torch.nn.Module, adapter_name: str) -> None:
    """Allocate and initialise (peft's default init) LoRA weights that were created on meta."""
    from peft.tuners.lora import LoraLayer

    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        pair = (module.lora_A[adapter_name], module.lora_B[adapter_name])
        if any(p.is_meta for part in pair for p in part.parameters()):
            for part in pair:
                part.to_empty(device="cpu")
            module.reset_lora_parameters(adapter_name, True)


class MetaShardLoader:
    """Remembers what ``to_empty`` will wipe, then fills every rank's shards after sharding.

    Built after the adapter is injected and before ``fully_shard``; ``load`` runs after it.
    """

    def __init__(self, model: torch.nn.Module, hf_model: torch.nn.Module, checkpoint: CheckpointTensors):
        self.model, self.hf_model, self.checkpoint = model, hf_model, checkpoint
        # The adapter (the only real parameters) and the buffers, as full tensors.
        self.real_parameters = {
            name: param.detach().clone() for name, param in model.named_parameters() if not param.is_meta
        }
        self.buffers = {name: buffer.detach().clone() for name, buffer in model.named_buffers()}
        # ``to_empty`` gives each module its own new tensor: a tied weight kept whole would be
        # untied (and allocated twice). Its names are remembered to tie it again.
        self.tied_names = [names for names in _aliases(model).values() if len(names) > 1]
        keys = checkpoint.keys()
        # Names survive sharding (FSDP2 replaces the Parameter objects); tied names share a key.
        self.base_keys: dict[str, str] = {}
        for param, names in _aliases(hf_model).items():
            if param.is_meta:
                key = next(checkpoint_key(n) for n in names if checkpoint_key(n) in keys)
                self.base_keys.update({name: key for name in names})

    def load(self, device: torch.device) -> None:
        """Allocate this rank's shards on ``device`` and fill them (after ``fully_shard``)."""
        self.model.to_empty(device=device)
        _retie(self.model, self.tied_names)
        with torch.no_grad():
            for name, buffer in self.model.named_buffers():
                buffer.copy_(self.buffers[name])
            for name, param in self.model.named_parameters():
                if name in self.real_parameters:
                    start, stop = local_rows(param, name)
                    _local(param).copy_(self.real_parameters[name][start:stop])
            done = set()
            for name, param in self.hf_model.named_parameters(remove_duplicate=False):
                if name not in self.base_keys or id(param) in done:
                    continue
                done.add(id(param))
                start, stop = local_rows(param, name)
                _local(param).copy_(self.checkpoint.read_rows(self.base_keys[name], start, stop))
        self.real_parameters, self.buffers = {}, {}


def _retie(model: torch.nn.Module, tied_names: list[list[str]]) -> None:
    for first, *others in tied_names:
        shared = model.get_parameter(first)
        if isinstance(shared, DTensor):
            continue  # FSDP2 manages it (and keeps it tied)
        for name in others:
            owner, _, leaf = name.rpartition(".")
            module = model.get_submodule(owner)
            if module._parameters[leaf] is not shared:
                module._parameters[leaf] = shared


def _local(param: torch.Tensor) -> torch.Tensor:
    return param.to_local() if isinstance(param, DTensor) else param
