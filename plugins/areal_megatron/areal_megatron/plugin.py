"""Entry point of the areal-megatron plugin: the ``megatron`` training engine.

Kept light: declaring imports no torch or megatron-core; the hooks import the engine when called.

It declares ``multi_adapter``: several adapters train on one frozen base, each injected by its own
``areal_inject_adapter`` call and exported by name (``adapter_name``; None for a run's only
adapter), each split over tensor parallelism like the base weights.
"""

from __future__ import annotations

from areal_core import hookimpl
from areal_core.declarations import PEFT_DIRECTORY, BackendDeclaration, LoraStatus, LoraSupport

from areal_megatron import __version__

NAME = "megatron"


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name=NAME,
            kind="engine",
            version=__version__,
            description="megatron-core engine: LoRA on tensor-parallel layers (TP x DP, no pipeline yet), "
                        "dense Llama/Qwen2, several adapters on one base",
            lora=LoraSupport(
                status=LoraStatus.READY,
                peft_types=("lora",),
                moe=False,
                transports=(PEFT_DIRECTORY,),
                target_module_syntax="names",
                multi_adapter=True,
            ),
        )
    ]


def _engine(engine):
    from areal_megatron.engine import MegatronEngine

    if not isinstance(engine, MegatronEngine):
        raise TypeError(f"the megatron plugin got a {type(engine).__name__}, not the engine it built")
    return engine


@hookimpl
def areal_build_engine(backend, config):
    if backend != NAME:
        return None
    from areal_megatron.engine import MegatronEngine

    return MegatronEngine(config)


@hookimpl
def areal_validate_config(backend, config):
    if backend != NAME:
        return None
    from areal_megatron.validation import check_config

    return check_config(config)


@hookimpl
def areal_inject_adapter(backend, engine, actor, adapter_name):
    if backend != NAME:
        return None
    _engine(engine).inject_lora(actor, adapter_name)
    return engine


@hookimpl
def areal_shard_model(backend, engine, actor):
    if backend != NAME:
        return None
    _engine(engine).setup_training(actor)
    return engine


@hookimpl
def areal_export_adapter(backend, engine, directory, version, adapter_name):
    if backend != NAME:
        return None
    return _engine(engine).export_adapter(directory, version, adapter_name)
