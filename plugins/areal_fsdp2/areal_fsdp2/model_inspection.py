"""What a local Hugging Face model directory holds, read cheaply (config.json and file names).

Used by the configuration checks (``validation.py``) and again before loading
(``model_loading.py``), so both refuse the same directories with the same words. Nothing here
imports torch, except ``linear_module_names`` for architectures outside the known table, which
builds the model on the meta device (no weights are read or allocated).
"""

from __future__ import annotations

import json
from pathlib import Path

CONFIG_FILE = "config.json"

#: Config keys that count experts in the mixture-of-experts models of transformers
#: (Mixtral, Qwen2-MoE/Qwen3-MoE, DeepSeek, DBRX, OLMoE, ...).
EXPERT_COUNT_KEYS = (
    "num_experts",
    "num_local_experts",
    "n_routed_experts",
    "moe_num_experts",
    "num_experts_per_tok",
)

_SEVEN_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: Short names of the ``nn.Linear`` modules of dense architectures whose layout is known, so
#: that ``areal check`` answers without importing torch. ``tests/fsdp2`` checks this table
#: against the models transformers builds.
KNOWN_LINEAR_MODULES: dict[str, tuple[str, ...]] = {
    "LlamaForCausalLM": _SEVEN_PROJECTIONS + ("lm_head",),
    "MistralForCausalLM": _SEVEN_PROJECTIONS + ("lm_head",),
    "Qwen2ForCausalLM": _SEVEN_PROJECTIONS + ("lm_head",),
    "Qwen3ForCausalLM": _SEVEN_PROJECTIONS + ("lm_head",),
}


class ModelDirError(Exception):
    """A model directory cannot be used; ``key``-free text, the caller adds the config key."""

    def __init__(self, problem: str, fix: str):
        super().__init__(f"{problem}; {fix}")
        self.problem, self.fix = problem, fix


def read_model_config(path: str | Path) -> dict:
    """The parsed ``config.json`` of the model directory ``path``.

    Raises ``ModelDirError`` when the directory is missing, has no ``config.json`` (or an
    unreadable one), or holds no ``*.safetensors`` weights (pickled ``.bin`` weights are not
    loaded: they can run code when unpickled).
    """
    if not str(path):
        raise ModelDirError(
            "no model directory is set", "set actor.path to a local Hugging Face model directory"
        )
    directory = Path(path)
    if not directory.is_dir():
        raise ModelDirError(
            f"model directory {directory} does not exist",
            "set actor.path to a local directory holding config.json and *.safetensors",
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise ModelDirError(
            f"{directory} has no {CONFIG_FILE}",
            "point actor.path at a Hugging Face model directory (save_pretrained output)",
        )
    try:
        config = json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelDirError(f"{config_path} is not readable JSON ({exc})", "repair or re-save it")
    if not isinstance(config, dict):
        raise ModelDirError(f"{config_path} does not hold a JSON object", "repair or re-save it")
    if not any(directory.glob("*.safetensors")):
        pickled = sorted(p.name for p in directory.glob("*.bin"))
        found = f" (it has {', '.join(pickled)})" if pickled else ""
        raise ModelDirError(
            f"{directory} holds no *.safetensors weights{found}",
            "save the model with save_pretrained(..., safe_serialization=True); "
            "pickled .bin weights are not loaded",
        )
    return config


def _configs_within(config: dict):
    """The config and every nested sub-config (``text_config`` of multimodal models, ...)."""
    yield config
    for value in config.values():
        if isinstance(value, dict):
            yield from _configs_within(value)


def expert_evidence(config: dict) -> str:
    """Why ``config`` describes a mixture-of-experts model ("" when it is dense)."""
    for sub in _configs_within(config):
        for key in EXPERT_COUNT_KEYS:
            value = sub.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return f"{key}={value}"
    for architecture in config.get("architectures") or []:
        if "moe" in str(architecture).lower():
            return f"architecture {architecture}"
    return ""


def moe_refusal(config: dict) -> str:
    """The refusal message for a mixture-of-experts config, or "" for a dense one."""
    evidence = expert_evidence(config)
    if not evidence:
        return ""
    return (
        f"the model is a mixture-of-experts model ({evidence}); the fsdp2 engine trains LoRA on "
        f"dense models only"
    )


def architecture(config: dict) -> str:
    architectures = config.get("architectures") or []
    return str(architectures[0]) if architectures else ""


def needs_remote_code(config: dict) -> bool:
    """Whether the directory ships its own modelling code for causal LMs (``auto_map``)."""
    auto_map = config.get("auto_map") or {}
    return isinstance(auto_map, dict) and "AutoModelForCausalLM" in auto_map


def linear_module_names(path: str | Path, config: dict, *, trust_remote_code: bool) -> list[str]:
    """Sorted short names of the model's ``nn.Linear`` modules (``lm_head`` included).

    Known architectures are answered from ``KNOWN_LINEAR_MODULES``; any other is built on the
    meta device from its config (imports torch and transformers; with ``trust_remote_code``
    it runs the directory's own code, as loading would). Raises ``ModelDirError`` when
    transformers cannot build it.
    """
    known = KNOWN_LINEAR_MODULES.get(architecture(config))
    if known is not None and not needs_remote_code(config):
        return sorted(known)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.from_pretrained(
            str(path), trust_remote_code=trust_remote_code, local_files_only=True
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises ValueError, KeyError, ImportError, OSError...
        fix = (
            "set actor.trust_remote_code: true if you trust the code in the model directory"
            if needs_remote_code(config) and not trust_remote_code
            else "use a causal LM architecture your transformers version knows"
        )
        raise ModelDirError(f"transformers cannot build the model in {path} ({exc})", fix) from exc
    return sorted(
        {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
         if isinstance(module, torch.nn.Linear)}
    )
