"""Helpers of the SGLang tests: client configurations, adapters written offline, payload recording."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def client_config(model_dir, address: str, lora_name: str, output_dir, *, window: int = 0,
                  lora_rank: int = 8) -> RunConfig:
    """A run configuration whose rollout server is the session's SGLang server, given by address."""
    return RunConfig(
        actor=ActorConfig(path=str(model_dir), lora_rank=lora_rank, lora_alpha=16, device="cpu"),
        rollout=RolloutConfig(backend="sglang", servers=[address], max_head_offpolicyness=window,
                              max_loras=8, max_model_len=256, request_timeout=60.0),
        gconfig=GenerationConfig(lora_name=lora_name),
        output_dir=str(output_dir),
    )


def module_shapes(model_dir) -> dict[str, tuple[int, int]]:
    """``(in_features, out_features)`` of each LoRA target module of a tiny model."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def write_adapter(directory, model_dir, *, version: int, rank: int = 8, seed: int = 0,
                  scale: float = 0.3, zero_b: bool = False):
    """Write a random LoRA adapter over every projection in the interchange format.

    ``zero_b`` gives peft's initial adapter (lora_B = 0): exactly the base model.
    """
    import torch

    from areal_core.adapter_format import peft_key, write_peft_adapter

    config = json.loads((Path(model_dir) / "config.json").read_text())
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module, (fan_in, fan_out) in module_shapes(model_dir).items():
            group = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            path = f"model.layers.{layer}.{group}.{module}"
            tensors[peft_key(path, "A")] = torch.randn(rank, fan_in, generator=generator) * scale
            b = torch.randn(fan_out, rank, generator=generator) * scale
            tensors[peft_key(path, "B")] = torch.zeros_like(b) if zero_b else b
    return write_peft_adapter(directory, tensors, rank=rank, alpha=16, version=version,
                              base_model_path=str(model_dir))


def record_posts(server) -> list[tuple[str, dict]]:
    """Record every ``(path, payload)`` the client POSTs from now on (the requests still go out)."""
    sent: list[tuple[str, dict]] = []
    for http in server.clients:
        def post_json(path, payload, _original=http.post_json):
            sent.append((path, copy.deepcopy(payload)))
            return _original(path, payload)

        http.post_json = post_json
    return sent


def hf_greedy(model_dir, prompts, max_new_tokens: int) -> list[tuple[int, ...]]:
    """Greedy continuations of ``prompts`` by HF transformers (float32), EOS included."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outputs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = list(prompt)
            for _ in range(max_new_tokens):
                token = int(model(torch.tensor([ids])).logits[0, -1].argmax())
                ids.append(token)
                if token == model.config.eos_token_id:
                    break
            outputs.append(tuple(ids[len(prompt):]))
    return outputs
