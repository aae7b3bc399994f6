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
                # actor.lora_rank (the largest adapter's): any rank is accepted, no fixed list.
                max_rank=None,
                allowed_ranks=None,
                transports=(PEFT_DIRECTORY,),
                # --lora-target-modules takes a fixed list of names; config_checks refuses others.
                unservable_modules=(),
                target_module_syntax="names",
                # Several adapters on one base: SGLang keeps up to --max-loaded-loras adapters
                # resident and builds each batch from up to --max-loras-per-batch of them, each
                # request's tokens computed with its own adapter's slot of buffers sized for
                # --max-lora-rank and --lora-target-modules (a smaller rank uses the first rows of
                # its slot, a module an adapter lacks is zero there). A launched server gets the
                # largest rank (areal sets --max-lora-rank to it), the union of the adapters'
                # modules and room for the sum of their live versions; the client keeps each
                # adapter's versions apart (server.py).
                # tests/sglang/test_multi_adapter_sglang.py checks, on a real server, that a batch mixing
                # two adapters of different ranks and modules answers each request as it is
                # answered alone.
                multi_adapter=True,
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
