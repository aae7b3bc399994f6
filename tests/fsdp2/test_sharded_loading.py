"""The base model is read into each rank's shards (meta build), or loaded whole as a fallback."""

from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from areal_fsdp2.safetensors_rows import CheckpointTensors  # noqa: E402


def reference_weights(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return {name: p.detach() for name, p in model.named_parameters()}, dict(model.named_buffers())


def base_state(engine):
    """Full copies of the base weights of a sharded one-rank engine, under HF names."""
    state = {}
    for name, param in engine.hf_model.named_parameters():
        if "lora_" in name:
            continue
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        state[name.replace(".base_layer", "")] = full.detach().clone()
    return state


@pytest.mark.parametrize("options", [{}, {"full_finetune": True}, {"dtype": "bfloat16"}])
def test_the_shards_hold_the_checkpoint_weights(one_rank_engine, tiny_qwen2, options):
    engine = one_rank_engine(shard=False, **options)
    assert engine._checkpoint is not None  # built on meta, waiting for its shards
    assert all(p.is_meta for p in engine.hf_model.parameters())
    from areal_core.config import ActorConfig

    actor = ActorConfig(backend="fsdp2", device="cpu", path=str(tiny_qwen2), **options)
    one_rank_engine.registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor)
    one_rank_engine.registry.call("areal_shard_model", "fsdp2", engine=engine, actor=actor)
    expected, buffers = reference_weights(tiny_qwen2)
    got = base_state(engine)
    assert got.keys() == expected.keys()
    dtype = torch.bfloat16 if options.get("dtype") == "bfloat16" else torch.float32
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, expected[name].to(dtype), rtol=0, atol=0, msg=name)
    assert engine.hf_model.lm_head.weight is engine.hf_model.model.embed_tokens.weight  # still tied
    kept_whole = not options.get("full_finetune")  # frozen embeddings are not sharded under LoRA
    assert isinstance(engine.hf_model.lm_head.weight, torch.distributed.tensor.DTensor) != kept_whole
    for name, buffer in engine.hf_model.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0, msg=name)
    if not options.get("full_finetune"):
        lora_b = [p for n, p in engine.model.named_parameters() if "lora_B" in n]
        lora_a = [p for n, p in engine.model.named_parameters() if "lora_A" in n]
        assert lora_b and all(float(p.detach().full_tensor().abs().max()) == 0 for p in lora_b)
        assert all(float(p.detach().full_tensor().abs().max()) > 0 for p in lora_a)
        assert all(p.dtype == torch.float32 for p in lora_a + lora_b)


def test_a_checkpoint_under_other_names_is_loaded_whole(one_rank_engine, tiny_qwen2, tmp_path):
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_qwen2, renamed)
    tensors = load_file(renamed / "model.safetensors")
    tensors = {name.replace("model.", "transformer.", 1): t for name, t in tensors.items()}
    save_file(tensors, renamed / "model.safetensors", metadata={"format": "pt"})
    engine = one_rank_engine(shard=False, path=str(renamed))
    assert engine._checkpoint is None  # the fallback: whole model, real parameters
    assert not any(p.is_meta for p in engine.hf_model.parameters())


def test_rows_are_read_without_the_rest(tiny_qwen2):
    checkpoint = CheckpointTensors(tiny_qwen2)
    from safetensors.torch import load_file

    tensors = load_file(tiny_qwen2 / "model.safetensors")
    for key, tensor in tensors.items():
        rows = tensor.shape[0]
        assert torch.equal(checkpoint.read_rows(key, 0, rows), tensor)
        assert torch.equal(checkpoint.read_rows(key, rows // 3, rows - 1), tensor[rows // 3: rows - 1])
        assert checkpoint.read_rows(key, rows, rows).shape[0] == 0
