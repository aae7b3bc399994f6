"""Megatron's fused layouts and tensor-parallel splits, as pure tensor maths (no megatron-core)."""

from __future__ import annotations

import pytest
import torch

from areal_megatron import tensor_parallel
from areal_megatron.models import fused_layout, spec_from_config, state_dict_adapter

HEADS, GROUPS, HEAD_DIM = 4, 2, 3


def labelled(prefix: str, heads: int) -> torch.Tensor:
    """Rows named by (projection, head, row): value = code * 100 + head * 10 + row."""
    code = {"q": 1, "k": 2, "v": 3}[prefix]
    return torch.tensor([[code * 100 + h * 10 + r] for h in range(heads) for r in range(HEAD_DIM)],
                        dtype=torch.float32)


def test_qkv_is_interleaved_per_query_group():
    q, k, v = labelled("q", HEADS), labelled("k", GROUPS), labelled("v", GROUPS)
    fused = fused_layout.fuse_qkv(q, k, v, num_groups=GROUPS)
    heads_in_order = [int(x) // 10 for x in fused[::HEAD_DIM, 0]]
    # group 0: q heads 0 and 1, k head 0, v head 0; group 1: q heads 2 and 3, k 1, v 1
    assert heads_in_order == [10, 11, 20, 30, 12, 13, 21, 31]
    assert all(torch.equal(a, b) for a, b in zip(fused_layout.split_qkv(fused, HEADS, GROUPS, HEAD_DIM), (q, k, v)))


def test_qkv_split_works_on_biases_and_lora_b():
    generator = torch.Generator().manual_seed(0)
    for tail in ((), (5,)):
        q = torch.randn(HEADS * HEAD_DIM, *tail, generator=generator)
        k = torch.randn(GROUPS * HEAD_DIM, *tail, generator=generator)
        v = torch.randn(GROUPS * HEAD_DIM, *tail, generator=generator)
        back = fused_layout.split_qkv(fused_layout.fuse_qkv(q, k, v, GROUPS), HEADS, GROUPS, HEAD_DIM)
        assert all(torch.equal(a, b) for a, b in zip(back, (q, k, v)))


def test_a_tensor_parallel_shard_of_qkv_holds_whole_groups():
    q, k, v = labelled("q", HEADS), labelled("k", GROUPS), labelled("v", GROUPS)
    fused = fused_layout.fuse_qkv(q, k, v, GROUPS)
    second = tensor_parallel.shard("decoder.layers.0.self_attention.linear_qkv.weight", fused, 1, 2)
    local_q, local_k, local_v = fused_layout.split_qkv(second, HEADS // 2, GROUPS // 2, HEAD_DIM)
    assert torch.equal(local_q, q[2 * HEAD_DIM:]) and torch.equal(local_k, k[HEAD_DIM:])
    assert torch.equal(local_v, v[HEAD_DIM:])


def test_fc1_shards_hold_their_own_gate_and_up_rows():
    gate, up = torch.arange(8.0)[:, None], 100 + torch.arange(8.0)[:, None]
    fused = fused_layout.fuse_gate_up(gate, up)
    name = "decoder.layers.0.mlp.linear_fc1.weight"
    shards = [tensor_parallel.shard(name, fused, r, 2) for r in range(2)]
    assert shards[1][:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert torch.equal(tensor_parallel.unshard(name, shards), fused)


@pytest.mark.parametrize("name,rule", [
    ("embedding.word_embeddings.weight", "vocab"),
    ("output_layer.weight", "vocab"),
    ("decoder.layers.3.self_attention.linear_qkv.bias", "column"),
    ("decoder.layers.3.self_attention.linear_proj.weight", "row"),
    ("decoder.layers.3.mlp.linear_fc2.weight", "row"),
    ("decoder.layers.3.mlp.linear_fc1.weight", "gate_up"),
    ("decoder.layers.3.input_layernorm.weight", "replicated"),
    # LoRA splits like megatron-bridge: A along the rank on column-parallel layers ...
    ("decoder.layers.0.self_attention.linear_qkv.adapter.linear_in.weight", "column"),
    ("decoder.layers.0.mlp.linear_fc1.adapter.linear_in.weight", "column"),
    # ... along the input on row-parallel ones; B like the base weight's output
    ("decoder.layers.0.self_attention.linear_proj.adapter.linear_in.weight", "row"),
    ("decoder.layers.0.mlp.linear_fc2.adapter.linear_in.weight", "row"),
    ("decoder.layers.0.self_attention.linear_qkv.adapter.linear_out.weight", "column"),
    ("decoder.layers.0.mlp.linear_fc1.adapter.linear_out.weight", "gate_up"),
    ("decoder.layers.0.mlp.linear_fc2.adapter.linear_out.weight", "column"),
    ("decoder.layers.0.mlp.linear_fc1.adapter_gate.linear_out.weight", "column"),
])
def test_partition_rules(name, rule):
    assert tensor_parallel.partition_rule(name) == rule


def test_vocab_is_padded_to_the_tp_size_and_cut_back():
    embedding = torch.randn(7, 4)
    name = "embedding.word_embeddings.weight"
    shards = [tensor_parallel.shard(name, embedding, r, 2) for r in range(2)]
    assert [s.shape[0] for s in shards] == [4, 4] and torch.equal(shards[1][-1], torch.zeros(4))
    assert torch.equal(tensor_parallel.unshard(name, shards, vocab_size=7), embedding)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_hf_state_round_trips_through_the_megatron_layout(arch, tiny_qwen2, tiny_llama):
    from safetensors.torch import load_file

    from areal_megatron.models import read_hf_config

    path = tiny_qwen2 if arch == "qwen2" else tiny_llama
    spec = spec_from_config(read_hf_config(path))
    hf = load_file(str(path / "model.safetensors"))
    adapter = state_dict_adapter(spec)
    megatron = adapter.to_megatron(hf)
    layer = "decoder.layers.1."
    assert megatron[layer + "self_attention.linear_qkv.weight"].shape == (
        (spec.num_heads + 2 * spec.num_kv_heads) * spec.head_dim, spec.hidden_size)
    assert (layer + "self_attention.linear_qkv.bias" in megatron) == (arch == "qwen2")
    assert ("output_layer.weight" in megatron) == (not spec.tie_word_embeddings)
    back = adapter.to_hf(megatron)
    assert set(back) == set(hf)
    assert all(torch.equal(back[k], hf[k]) for k in hf)


def test_a_missing_hf_tensor_is_named(tiny_llama):
    from safetensors.torch import load_file

    from areal_megatron.models import read_hf_config

    hf = load_file(str(tiny_llama / "model.safetensors"))
    del hf["model.layers.0.self_attn.k_proj.weight"]
    with pytest.raises(KeyError, match="k_proj"):
        state_dict_adapter(spec_from_config(read_hf_config(tiny_llama))).to_megatron(hf)
