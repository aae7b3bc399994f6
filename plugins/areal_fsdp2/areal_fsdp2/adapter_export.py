"""Weight export (LoRA step 3 of 4): gather the adapter, and only it, from the shards.

Parameter names under peft + FSDP2 keep their usual form
(``base_model.model.<module path>.lora_A.<peft adapter name>.weight``); the PEFT file key is
the same without the adapter name. With several adapters only the one named is gathered. Rank 0 writes the directory with ``areal_core.adapter_format``
(temporary directory, then rename) and every rank returns the same ``ExportedAdapter``.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import attrs
import torch

from areal_core.adapter_format import KEY_PREFIX, peft_key, write_peft_adapter
from areal_core.errors import AdapterError
from areal_core.interfaces import ExportedAdapter

from areal_fsdp2.coalesced_gather import gather_full_tensors
from areal_fsdp2.distributed import broadcast_object

if TYPE_CHECKING:  # pragma: no cover
    from areal_fsdp2.engine import FSDP2Engine

_LORA_PARAMETER = re.compile(
    r"^" + re.escape(KEY_PREFIX) + r"(?P<module>.+)\.lora_(?P<ab>[AB])\.(?P<adapter>[^.]+)\.weight$"
)


def peft_file_key(parameter_name: str) -> str:
    """The PEFT file key of a LoRA parameter name; AdapterError for any other parameter."""
    match = _LORA_PARAMETER.match(parameter_name)
    if not match:
        raise AdapterError(
            f"trainable parameter {parameter_name} is not a LoRA weight; only lora_A/lora_B "
            f"parameters can be exported as an adapter"
        )
    return peft_key(match["module"], match["ab"])


def gather_trainable(model: torch.nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """Full copies (on the CPU, rank 0 only; ``{}`` elsewhere) of the trainable parameters (of
    those named ``names``).

    Collective, in a few coalesced gathers (see ``coalesced_gather``). Frozen parameters are
    never gathered.
    """
    return gather_full_tensors(
        (name, param) for name, param in model.named_parameters()
        if param.requires_grad and (names is None or name in names)
    )


def export_adapter(engine: "FSDP2Engine", directory: str, version: int,
                   adapter_name: str | None = None) -> ExportedAdapter:
    """Write ``engine``'s adapter ``adapter_name`` (None: its only one) to ``directory`` as a PEFT
    LoRA directory (collective), with that adapter's rank and alpha.

    Raises AdapterError on every rank when the engine trains every parameter (no adapter),
    when ``directory`` already exists (a version is written once), or when writing fails.
    """
    engine.require_sharded("export the adapter")
    if engine.actor.full_finetune:
        raise AdapterError(
            "actor.full_finetune is true: every parameter is trained and there is no adapter "
            "to export; set actor.full_finetune: false to train and export a LoRA adapter"
        )
    slot = engine.slot(adapter_name)
    final = Path(directory).absolute()
    problem = None
    if engine.rank == 0 and final.exists():
        problem = f"adapter directory {final} already exists; versions are never rewritten"
    problem = broadcast_object(problem)
    if problem:
        raise AdapterError(problem)

    start = time.perf_counter()
    engine.reshard()
    parameters = gather_trainable(engine.model, set(slot.parameter_names))
    outcome: tuple[ExportedAdapter | None, str | None] = (None, None)
    if engine.rank == 0:
        try:
            tensors = {peft_file_key(name): tensor for name, tensor in parameters.items()}
            written = write_peft_adapter(
                final, tensors, rank=slot.actor.lora_rank, alpha=slot.actor.lora_alpha,
                version=version, base_model_path=str(engine.actor.path),
            )
            outcome = (attrs.evolve(written, seconds=time.perf_counter() - start), None)
        except Exception as exc:  # any failure must reach the other ranks, or they wait forever
            outcome = (None, f"exporting the adapter to {final} failed: {exc}")
    exported, error = broadcast_object(outcome)
    if error:
        raise AdapterError(error)
    return exported
