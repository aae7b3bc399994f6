"""Entry point of the areal-fsdp2 plugin: declares the fsdp2 engine (its LoRA code is not written yet)."""

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport

from areal_fsdp2 import __version__


@hookimpl
def areal_declare_backends():
    return [
        BackendDeclaration(
            name="fsdp2",
            kind="engine",
            version=__version__,
            description="PyTorch FSDP2 training engine for areal",
            lora=LoraSupport(status=LoraStatus.NOT_IMPLEMENTED, reason="the fsdp2 plugin's LoRA steps are not written yet"),
        )
    ]
