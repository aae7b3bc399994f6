"""Random LoRA adapters with a sizeable effect, built with peft on a model directory."""

from __future__ import annotations


def build_peft_adapter(model_dir, directory, *, rank: int, seed: int, version: int,
                       scale: float = 0.3, target_modules="all-linear"):
    """A LoRA adapter with a sizeable random effect, written in the interchange format.

    peft's ``get_peft_model`` initialises lora_A; lora_B (zero at init) is drawn from
    N(0, ``scale``) so that the adapter moves log-probabilities by whole units.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from areal_core.adapter_format import write_peft_adapter

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    alpha = 2 * rank
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                             target_modules=target_modules))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, scale)
    tensors = get_peft_model_state_dict(model, save_embedding_layers=False)
    return write_peft_adapter(directory, tensors, rank=rank, alpha=alpha,
                              version=version, base_model_path=str(model_dir))
