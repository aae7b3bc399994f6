"""Helpers of the vLLM plugin's tests: adapters built with peft, HF+PEFT log-probabilities, configs."""

from __future__ import annotations

from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig
from areal_core.testing.peft_adapters import build_peft_adapter  # noqa: F401 - the vLLM tests' import


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
