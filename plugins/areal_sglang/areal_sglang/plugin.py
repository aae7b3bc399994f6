"""Entry point of the areal-sglang plugin: the SGLang rollout server's hooks.

Light on purpose: the registry imports this module to list plugins, so the client code is
imported inside the hook bodies, and SGLang itself never (it runs as its own server).
"""

from __future__ import annotations

from areal_core import hookimpl
from areal_core.declarations import PEFT_DIRECTORY, BackendDeclaration, LoraStatus, LoraSupport

from areal_sglang import __version__

BACKEND = "sglang"
SGLANG_VERSION = "0.5.23"


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name=BACKEND,
            kind="server",
            version=__version__,
            description=(
                f"SGLang {SGLANG_VERSION} rollout server over its native HTTP API "
                "(runtime LoRA loading; SGLang runs as its own process)"
            ),
            lora=LoraSupport(
                status=LoraStatus.READY,
                peft_types=("lora",),
                moe=False,
                # SGLang sizes its LoRA buffers from --max-lora-rank, which areal sets to
                # actor.lora_rank: any rank is accepted, there is no fixed list.
                max_rank=None,
                allowed_ranks=None,
                transports=(PEFT_DIRECTORY,),
                # --lora-target-modules takes a fixed list of names; config_checks refuses others.
                unservable_modules=(),
                target_module_syntax="names",
            ),
        )
    ]


@hookimpl
def areal_build_rollout_server(backend, config):
    if backend != BACKEND:
        return None
    from areal_sglang.server import SGLangRolloutServer

    return SGLangRolloutServer(config)


@hookimpl
def areal_validate_config(backend, config):
    if backend != BACKEND:
        return None
    from areal_sglang.config_checks import validate

    return validate(config)


@hookimpl
def areal_load_rollout_adapter(backend, server, adapter, lora_name):
    if backend != BACKEND:
        return None
    server.load_adapter(adapter, lora_name)
    return lora_name
