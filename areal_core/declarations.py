"""What a plugin declares about a backend it provides: cheap data, no heavy imports.

Every plugin answers the ``areal_declare_backends`` hook with a list of ``BackendDeclaration``.
The registry builds the LoRA support matrix from these alone, so declaring must never import
torch, vLLM or any other runtime.
"""

from __future__ import annotations

import enum

import attrs

ENGINE = "engine"
SERVER = "server"

#: The adapter transport every built-in backend speaks: a PEFT LoRA directory
#: (``adapter_config.json`` + ``adapter_model.safetensors``) on a filesystem the server can read.
PEFT_DIRECTORY = "peft-directory"


class LoraStatus(enum.Enum):
    """How far a backend's LoRA support goes."""

    READY = "ready"
    NOT_IMPLEMENTED = "not implemented yet"
    UNSUPPORTED = "no LoRA support"


@attrs.frozen
class LoraSupport:
    """A backend's LoRA capabilities.

    ``status`` is READY only when the code behind it exists. ``reason`` explains any other status
    in words a user can act on. ``transports`` lists what an engine produces or a server accepts.
    ``multi_adapter``: the backend handles several adapters on one base at once.
    ``max_rank`` is the largest adapter rank the backend handles (None: no limit); ``allowed_ranks``
    the ranks a server's start-up flag may take (None: any integer). ``unservable_modules`` names
    module kinds a server cannot carry LoRA on (``lm_head``, embeddings, ...).
    """

    status: LoraStatus = LoraStatus.NOT_IMPLEMENTED
    reason: str = ""
    peft_types: tuple[str, ...] = ("lora",)
    moe: bool = False
    max_rank: int | None = None
    allowed_ranks: tuple[int, ...] | None = None
    transports: tuple[str, ...] = (PEFT_DIRECTORY,)
    unservable_modules: tuple[str, ...] = ()
    target_module_syntax: str = "names"  # "names" (exact short names) or "regex" accepted
    # several adapters at once on one base: an engine trains them in one step, a server serves
    # every one's versions side by side (hookspecs: "Several adapters"); False refuses `adapters:`
    # lists of more than one
    multi_adapter: bool = False

    @property
    def ready(self) -> bool:
        return self.status is LoraStatus.READY

    def why_not_ready(self) -> str:
        if self.ready:
            return ""
        return self.reason or self.status.value


@attrs.frozen
class BackendDeclaration:
    """One engine or inference server a plugin provides.

    ``name`` is what users write in ``actor.backend`` or ``rollout.backend``; ``kind`` is
    ``"engine"`` or ``"server"``; ``version`` is the plugin's (or runtime's) version string.
    """

    name: str
    kind: str = attrs.field(validator=attrs.validators.in_((ENGINE, SERVER)))
    version: str = ""
    description: str = ""
    lora: LoraSupport = LoraSupport()
    plugin: str = ""  # filled in by the registry: the entry point that declared it

    def why_not_multi_adapter(self) -> str:
        """Why this backend does not handle several adapters at once ("" when it declares
        ``multi_adapter``); the matrix and ``areal check`` both say it in these words."""
        if self.lora.multi_adapter:
            return ""
        does = ("train several adapters at once" if self.kind == ENGINE
                else "serve several adapters' versions side by side")
        return f"{self.kind} {self.name} does not {does} yet (its declaration has no multi_adapter)"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "version": self.version,
            "plugin": self.plugin,
            "description": self.description,
            "lora": {
                "status": self.lora.status.value,
                "reason": self.lora.why_not_ready(),
                "peft_types": list(self.lora.peft_types),
                "moe": self.lora.moe,
                "max_rank": self.lora.max_rank,
                "allowed_ranks": list(self.lora.allowed_ranks) if self.lora.allowed_ranks else None,
                "transports": list(self.lora.transports),
                "unservable_modules": list(self.lora.unservable_modules),
                "multi_adapter": self.lora.multi_adapter,
            },
        }
