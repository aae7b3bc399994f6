"""Entry point of the areal-megatron plugin: declares the megatron engine (its LoRA code is not written yet)."""

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport

from areal_megatron import __version__


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name="megatron",
            kind="engine",
            version=__version__,
            description="Megatron-core training engine for areal",
            lora=LoraSupport(status=LoraStatus.NOT_IMPLEMENTED, reason="the megatron plugin's LoRA steps are not written yet"),
        )
    ]
