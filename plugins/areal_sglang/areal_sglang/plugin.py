"""Entry point of the areal-sglang plugin: declares the sglang server (its LoRA code is not written yet)."""

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport

from areal_sglang import __version__


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name="sglang",
            kind="server",
            version=__version__,
            description="SGLang rollout server plugin for areal (an HTTP client; SGLang runs as its own server)",
            lora=LoraSupport(status=LoraStatus.NOT_IMPLEMENTED, reason="the sglang plugin's LoRA steps are not written yet"),
        )
    ]
