"""Entry point of the areal-vllm plugin: declares the vllm server (its LoRA code is not written yet)."""

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport

from areal_vllm import __version__


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name="vllm",
            kind="server",
            version=__version__,
            description="vLLM rollout server plugin for areal (an HTTP client; vLLM runs as its own server)",
            lora=LoraSupport(status=LoraStatus.NOT_IMPLEMENTED, reason="the vllm plugin's LoRA steps are not written yet"),
        )
    ]
