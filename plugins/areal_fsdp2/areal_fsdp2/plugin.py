"""Entry point of the areal-fsdp2 plugin: the ``fsdp2`` training engine and its LoRA steps.

Kept light: ``areal plugins`` and ``areal matrix`` import this module, so torch and the engine
modules are imported inside the hook bodies only. Every hook answers None for other backends.
"""

from __future__ import annotations

from areal_core import hookimpl
from areal_core.declarations import ENGINE, PEFT_DIRECTORY, BackendDeclaration, LoraStatus, LoraSupport

from areal_fsdp2 import __version__

BACKEND = "fsdp2"


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name=BACKEND,
            kind=ENGINE,
            version=__version__,
            description="PyTorch FSDP2 (fully_shard) over Hugging Face causal LMs with peft LoRA; "
            "CPU/gloo and CUDA/nccl",
            lora=LoraSupport(
                status=LoraStatus.READY,
                peft_types=("lora",),
                moe=False,
                max_rank=None,
                transports=(PEFT_DIRECTORY,),
                target_module_syntax="names",
                multi_adapter=True,
            ),
        )
    ]


@hookimpl
def areal_validate_config(backend, config):
    if backend != BACKEND:
        return None
    from areal_fsdp2.validation import validate_actor

    return validate_actor(config.actor)


@hookimpl
def areal_build_engine(backend, config):
    if backend != BACKEND:
        return None
    from areal_fsdp2.engine import FSDP2Engine

    return FSDP2Engine(config)


def _own_engine(engine, hook: str):
    from areal_fsdp2.engine import FSDP2Engine

    if not isinstance(engine, FSDP2Engine):
        raise TypeError(f"{hook} for backend {BACKEND!r} got a {type(engine).__name__}, not an FSDP2Engine")
    return engine


@hookimpl
def areal_inject_adapter(backend, engine, actor, adapter_name):
    if backend != BACKEND:
        return None
    _own_engine(engine, "areal_inject_adapter").inject_adapter(actor, adapter_name)
    return engine


@hookimpl
def areal_shard_model(backend, engine, actor):
    if backend != BACKEND:
        return None
    _own_engine(engine, "areal_shard_model").shard(actor)
    return engine


@hookimpl
def areal_export_adapter(backend, engine, directory, version, adapter_name):
    if backend != BACKEND:
        return None
    from areal_fsdp2.adapter_export import export_adapter

    return export_adapter(_own_engine(engine, "areal_export_adapter"), directory, version, adapter_name)
