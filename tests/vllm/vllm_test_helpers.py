"""Helpers of the vLLM plugin's tests: adapters built with peft, HF+PEFT log-probabilities, configs."""

from __future__ import annotations

from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig


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


def hf_prompt_logprobs(model_dir, token_ids, adapter_dir=None) -> list[float]:
    """``log p(t_i | t_<i)`` for i >= 1 from HF transformers (+ PEFT from ``adapter_dir``), float32."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ids = torch.tensor([list(token_ids)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1].float()
    logprobs = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
    return logprobs.tolist()


def client_config(server_address: str, output_dir, *, lora_name: str, window: int = 0,
                  **rollout) -> RunConfig:
    """A configuration that connects to the session's server by address (LoRA rank 8)."""
    return RunConfig(
        actor=ActorConfig(lora_rank=8),
        rollout=RolloutConfig(backend="vllm", servers=[server_address], max_head_offpolicyness=window,
                              max_model_len=512, **rollout),
        gconfig=GenerationConfig(lora_name=lora_name),
        output_dir=str(output_dir),
    )
