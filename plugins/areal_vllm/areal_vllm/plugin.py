"""Entry point of the areal-vllm plugin (group ``areal.plugins``): the ``vllm`` rollout server.

Light on purpose: the registry imports it to list plugins and build the support matrix, so the
HTTP client and the launcher are imported inside the hooks, and vLLM itself never is.
"""

from areal_core import hookimpl
from areal_core.declarations import PEFT_DIRECTORY, BackendDeclaration, LoraStatus, LoraSupport

from areal_vllm import __version__
from areal_vllm.capabilities import ALLOWED_RANKS, MAX_RANK, UNSERVABLE_MODULES

BACKEND = "vllm"


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name=BACKEND,
            kind="server",
            version=__version__,
            description="vLLM OpenAI-compatible server with runtime LoRA loading (launched or given by address)",
            lora=LoraSupport(
                status=LoraStatus.READY,
                peft_types=("lora",),
                moe=False,
                max_rank=MAX_RANK,
                allowed_ranks=ALLOWED_RANKS,
                transports=(PEFT_DIRECTORY,),
                unservable_modules=UNSERVABLE_MODULES,
                target_module_syntax="names",
                # Several adapters on one base: vLLM holds up to --max-loras adapters in slots of
                # one stacked weight per layer (each padded to --max-lora-rank, so ranks may
                # differ) and batches requests naming different adapters together, each token
                # picking its own slot: the Punica kernels on GPU, their PyTorch fallback
                # (bgmv/sgmv gathers by slot index) on CPU. The fallback is right for tokens
                # with an adapter; tokens without one (index -1) would pick the last slot, which
                # mixed_batch_fix.py corrects on CPU, so base-model requests may share those
                # batches too. The launch flags hold every adapter (largest rank, the sum of their
                # live versions); tests/vllm/test_multi_adapter.py checks mixed batches against
                # one adapter per request on a real server.
                multi_adapter=True,
            ),
        )
    ]


@hookimpl
def areal_validate_config(backend, config):
    if backend != BACKEND:
        return None
    from areal_vllm.validation import validate_config

    return validate_config(config)


@hookimpl
def areal_build_rollout_server(backend, config):
    if backend != BACKEND:
        return None
    from areal_vllm.rollout_server import VllmRolloutServer

    # The core's loop keeps the version bookkeeping (what to unload when); the server follows it.
    return VllmRolloutServer(config, unload_stale_versions=False)


@hookimpl
def areal_load_rollout_adapter(backend, server, adapter, lora_name):
    if backend != BACKEND:
        return None
    server.load_adapter(adapter, lora_name)
    return lora_name
