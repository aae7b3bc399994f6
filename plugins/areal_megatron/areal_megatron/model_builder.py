"""Build the megatron-core GPTModel of a dense HF checkpoint and load this rank's weight shards.

The model uses megatron-core's own (local) layer spec: ColumnParallelLinear/RowParallelLinear,
RMSNorm, rotary embeddings, SwiGLU, no Transformer Engine or Apex. The output layer gathers the
logits over the tensor-parallel group (``parallel_output=False``) so every rank sees the full
vocabulary.
"""

from __future__ import annotations

from pathlib import Path

import torch

from areal_core.errors import ArealError
from areal_megatron import tensor_parallel
from areal_megatron.distributed import ParallelLayout
from areal_megatron.models import DecoderSpec, state_dict_adapter

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def transformer_config(spec: DecoderSpec, tp_size: int, dtype: torch.dtype):
    """megatron-core's TransformerConfig for ``spec``: every fusion off, dropout 0, no init."""
    import torch.nn.functional as F
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.head_dim,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=tp_size,
        use_cpu_initialization=True,
        perform_initialization=False,  # every weight is loaded from the checkpoint
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        attention_softmax_in_fp32=True,
    )


def build_model(spec: DecoderSpec, layout: ParallelLayout, dtype: torch.dtype):
    """An uninitialised GPTModel holding this rank's tensor-parallel part, on the CPU."""
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    config = transformer_config(spec, layout.tp_size, dtype)
    return GPTModel(
        config=config,
        transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
        vocab_size=tensor_parallel.padded_vocab_size(spec.vocab_size, layout.tp_size),
        max_sequence_length=spec.max_position_embeddings,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,
        parallel_output=False,
    )


def read_hf_state(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the ``*.safetensors`` files of an HF model directory (CPU)."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ArealError(f"{model_dir} holds no *.safetensors weights; save the model with "
                         f"save_pretrained(safe_serialization=True)")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def load_hf_weights(model, spec: DecoderSpec, hf_state: dict, layout: ParallelLayout) -> None:
    """Convert HF weights to megatron-core's layout, cut this rank's shards, copy them in.

    Every parameter of the model must receive a tensor of its exact shape, and every converted
    tensor must find its parameter; otherwise ArealError names the mismatch.
    """
    whole = state_dict_adapter(spec).to_megatron(hf_state)
    params = dict(model.named_parameters())
    if spec.tie_word_embeddings:
        params.pop("output_layer.weight", None)  # the embedding itself (shared)
    missing = sorted(set(params) - set(whole))
    unexpected = sorted(set(whole) - set(params))
    if missing or unexpected:
        raise ArealError(f"weight conversion does not match the megatron model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, param in params.items():
            part = tensor_parallel.shard(name, whole[name], layout.tp_rank, layout.tp_size)
            if part.shape != param.shape:
                raise ArealError(f"{name}: converted shard has shape {tuple(part.shape)}, the model "
                                 f"expects {tuple(param.shape)}")
            param.copy_(part)


def megatron_state(model, spec: DecoderSpec, layout: ParallelLayout, gather) -> dict[str, torch.Tensor]:
    """The whole-model megatron-core state (base weights only), gathered over TP on every rank.

    ``gather(tensor) -> list of every TP rank's tensor``. Collective over the TP group.
    """
    out = {}
    for name, param in model.named_parameters():
        if ".adapter" in name:
            continue
        name = name.replace(".to_wrap.", ".")
        out[name] = tensor_parallel.unshard(name, gather(param.detach()), vocab_size=spec.vocab_size)
    return out
