"""One-rank fsdp2 engines in this process: runtime refusals, atomic writes, lifecycle.

The engine starts its own one-process gloo group (none exists here) and destroys it on close.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from areal_core.config import ActorConfig  # noqa: E402
from areal_core.errors import AdapterError, ArealError, ConfigInvalid  # noqa: E402


def policy_gradient_loss(logprobs, indices):
    loss = torch.stack([-lp.sum() for lp in logprobs]).sum() / 20.0
    return loss, {"sequences": float(len(indices))}


SEQUENCES = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 4, 4, 4, 4, 4, 4, 2]]


# --- refusals at run time (the same rules as the configuration checks) ----------------------


def test_missing_model_directory_is_refused_before_loading(one_rank_engine, tmp_path):
    with pytest.raises(ConfigInvalid, match="does not exist"):
        one_rank_engine(path=str(tmp_path / "nowhere"))


def test_model_without_safetensors_is_refused(one_rank_engine, tiny_qwen2, tmp_path):
    copy = tmp_path / "pickled"
    shutil.copytree(tiny_qwen2, copy)
    (copy / "model.safetensors").rename(copy / "pytorch_model.bin")
    with pytest.raises(ConfigInvalid, match=r"no \*\.safetensors weights \(it has pytorch_model\.bin\)"):
        one_rank_engine(path=str(copy))


def test_mixture_of_experts_directory_is_refused(one_rank_engine, tiny_qwen2, tmp_path):
    copy = tmp_path / "moe"
    shutil.copytree(tiny_qwen2, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "num_experts": 4}))
    with pytest.raises(ConfigInvalid, match="mixture-of-experts"):
        one_rank_engine(path=str(copy))


def test_mixture_of_experts_model_is_refused_by_injection():
    from transformers import AutoModelForCausalLM, MixtralConfig

    from areal_fsdp2.lora_injection import inject_lora

    config = MixtralConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, num_local_experts=2)
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match="mixture-of-experts.*dense models only"):
        inject_lora(model, ActorConfig(), seed=0)


def test_target_modules_matching_nothing_list_the_models_linear_modules(one_rank_engine):
    engine = one_rank_engine(shard=False)
    actor = ActorConfig(path=engine.actor.path, target_modules=["q_proj", "qkv_proj"])
    with pytest.raises(AdapterError) as caught:
        one_rank_engine.registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor)
    message = str(caught.value)
    assert "['qkv_proj'] match no linear module" in message
    assert "['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj']" in message
    assert engine.stage == "loaded"  # refused before the model was touched


def test_peft_type_other_than_lora_is_refused_by_injection(one_rank_engine):
    engine = one_rank_engine(shard=False)
    actor = ActorConfig(path=engine.actor.path, peft_type="ia3")
    with pytest.raises(AdapterError, match="LoRA adapters only.*peft_type: lora"):
        one_rank_engine.registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor)


def test_known_architecture_table_matches_transformers(tmp_path, monkeypatch):
    """The torch-free table of linear modules says what transformers really builds."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    from areal_fsdp2 import model_inspection

    small = dict(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1)
    for config_class in (LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config):
        config = config_class(**small)
        config.architectures = [config_class.__name__.replace("Config", "ForCausalLM")]
        directory = tmp_path / config_class.__name__
        config.save_pretrained(directory)
        as_dict = json.loads((directory / "config.json").read_text())
        from_table = model_inspection.linear_module_names(directory, as_dict, trust_remote_code=False)
        with monkeypatch.context() as patch:
            patch.setattr(model_inspection, "KNOWN_LINEAR_MODULES", {})
            built = model_inspection.linear_module_names(directory, as_dict, trust_remote_code=False)
        assert from_table == built, config_class.__name__


def test_remote_code_needs_trust_remote_code(tmp_path):
    from areal_core.config import RunConfig
    from areal_core.registry import Registry

    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["WeirdForCausalLM"], "model_type": "weird-unknown",
        "auto_map": {"AutoConfig": "modeling_weird.WeirdConfig",
                     "AutoModelForCausalLM": "modeling_weird.WeirdForCausalLM"},
    }))
    (tmp_path / "model.safetensors").write_bytes(b"placeholder")
    config = RunConfig(actor=ActorConfig(path=str(tmp_path)))
    errors = Registry().call("areal_validate_config", "fsdp2", config=config)
    assert [e.key for e in errors] == ["actor.trust_remote_code"]
    assert "set actor.trust_remote_code: true" in str(errors[0])


# --- lifecycle and bad calls -------------------------------------------------------------------


def test_the_engine_owns_a_one_process_group_only_when_it_made_it(one_rank_engine):
    import torch.distributed as dist

    existed = dist.is_initialized()  # another test of the session may have left one
    engine = one_rank_engine()
    assert dist.is_initialized() and (engine.rank, engine.world_size) == (0, 1)
    assert engine.device == torch.device("cpu")
    engine.close()
    assert dist.is_initialized() == existed
    engine.close()  # idempotent


def test_calls_out_of_order_say_what_to_do_first(one_rank_engine):
    engine = one_rank_engine(shard=False)
    with pytest.raises(ArealError, match="areal_shard_model"):
        engine.train_step(SEQUENCES, policy_gradient_loss)
    with pytest.raises(ArealError, match="already|loaded"):
        engine.load_base_model()


def test_bad_sequences_and_bad_losses_are_refused_clearly(one_rank_engine):
    engine = one_rank_engine(lora_rank=4)
    with pytest.raises(ArealError, match="sequence 1 has 1 token"):
        engine.compute_logprobs([[1, 2], [3]])
    with pytest.raises(ArealError, match="not a scalar|scalar tensor"):
        engine.train_step(SEQUENCES, lambda lps, idx: (torch.stack([lp.sum() for lp in lps]), {}))
    with pytest.raises(ArealError, match="without gradient"):
        engine.train_step(SEQUENCES, lambda lps, idx: (torch.tensor(1.0), {}))
    assert engine.step == 0
    metrics = engine.train_step(SEQUENCES, policy_gradient_loss)
    assert engine.step == 1 and metrics["sequences"] == 3 and metrics["grad_norm"] > 0
    assert engine.compute_logprobs([]) == []


def test_exporting_twice_to_one_directory_is_refused(one_rank_engine, tmp_path):
    engine = one_rank_engine(lora_rank=4)
    engine.train_step(SEQUENCES, policy_gradient_loss)
    call = one_rank_engine.registry.call
    call("areal_export_adapter", "fsdp2", engine=engine, directory=str(tmp_path / "v1"), version=1)
    with pytest.raises(AdapterError, match="already exists; versions are never rewritten"):
        call("areal_export_adapter", "fsdp2", engine=engine, directory=str(tmp_path / "v1"), version=2)


# --- a reader never sees a partial adapter or checkpoint --------------------------------------


def test_adapter_appears_complete_or_not_at_all(one_rank_engine, tmp_path, monkeypatch):
    from areal_core import adapter_format

    engine = one_rank_engine(lora_rank=4)
    engine.train_step(SEQUENCES, policy_gradient_loss)
    final = tmp_path / "adapter-v1"
    seen = []
    real_rename = os.rename

    def watching_rename(source, destination):
        # At the moment the name appears, the directory must already be complete and valid.
        assert Path(destination) == final and not final.exists()
        assert Path(source).name.startswith(".adapter-v1.partial-")
        seen.append(adapter_format.verify_adapter_dir(source))
        real_rename(source, destination)

    monkeypatch.setattr(adapter_format.os, "rename", watching_rename)
    exported = one_rank_engine.registry.call(
        "areal_export_adapter", "fsdp2", engine=engine, directory=str(final), version=1
    )
    assert len(seen) == 1 and seen[0]["r"] == 4 and exported.path == str(final)

    # A writer that dies half-way leaves no directory under the final name.
    from areal_core import safetensors_writer

    def crash_after_writing(path, tensors, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_writer, "write_safetensors", crash_after_writing)
    with pytest.raises(AdapterError, match="disk full"):
        one_rank_engine.registry.call(
            "areal_export_adapter", "fsdp2", engine=engine, directory=str(tmp_path / "adapter-v2"), version=2
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter-v1"]


def _trainable(engine):
    return {k: v.clone() for k, v in engine.trainable_state().items()}


def test_checkpoint_swap_keeps_the_old_one_until_the_new_one_is_complete(one_rank_engine, tmp_path, monkeypatch):
    from areal_fsdp2 import checkpoint

    engine = one_rank_engine(lora_rank=4)
    engine.train_step(SEQUENCES, policy_gradient_loss)
    target = tmp_path / "checkpoint"
    engine.save_checkpoint(str(target))
    at_step_one = _trainable(engine)
    engine.train_step(SEQUENCES, policy_gradient_loss)

    # The new checkpoint is renamed into place only when complete; the old one is intact then.
    renames = []
    real_rename = os.rename

    def watching_rename(source, destination):
        source, destination = Path(source), Path(destination)
        if destination.parent != tmp_path:  # DCP's own renames inside the staging directory
            return real_rename(source, destination)
        if source.name.startswith(".checkpoint.partial-"):
            assert (source / "meta.json").is_file() and (source / "state" / ".metadata").is_file()
            assert (source / "rng" / "rank0.json").is_file()
            assert json.loads((source / "meta.json").read_text())["step"] == 2
        if destination == target:
            assert not target.exists()
        renames.append((source.name.split("-")[0], destination.name.split("-")[0]))
        real_rename(source, destination)

    monkeypatch.setattr(checkpoint.os, "rename", watching_rename)
    engine.save_checkpoint(str(target))
    assert renames == [("checkpoint", ".checkpoint.previous"), (".checkpoint.partial", "checkpoint")]
    monkeypatch.undo()

    # A writer failing half-way leaves the previous checkpoint in place, whole and loadable.
    def failing_fsync(root):
        raise OSError("device lost")

    monkeypatch.setattr(checkpoint, "fsync_files", failing_fsync)
    engine.train_step(SEQUENCES, policy_gradient_loss)
    with pytest.raises(checkpoint.CheckpointError, match="device lost"):
        engine.save_checkpoint(str(target))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    assert json.loads((target / "meta.json").read_text())["step"] == 2

    # A crash between the two renames leaves only the moved-aside one: it is still found.
    os.rename(target, tmp_path / ".checkpoint.previous-dead")
    assert checkpoint.find_checkpoint(target) == tmp_path / ".checkpoint.previous-dead"
    engine.load_checkpoint(str(target))
    assert engine.step == 2
    os.rename(tmp_path / ".checkpoint.previous-dead", target)

    # Loading restores the weights saved, not the ones trained since.
    fresh = one_rank_engine(lora_rank=4)
    fresh.load_checkpoint(str(target))
    assert fresh.step == 2
    engine.load_checkpoint(str(target))
    restored = _trainable(engine)
    assert all(torch.equal(restored[k], _trainable(fresh)[k]) for k in restored)
    assert any(not torch.equal(restored[k], at_step_one[k]) for k in restored)


def test_a_checkpoint_of_another_adapter_is_refused(one_rank_engine, tmp_path):
    engine = one_rank_engine(lora_rank=4)
    engine.train_step(SEQUENCES, policy_gradient_loss)
    engine.save_checkpoint(str(tmp_path / "ck"))
    other = one_rank_engine(lora_rank=8)
    with pytest.raises(ArealError, match="lora_rank: checkpoint 4, configuration 8"):
        other.load_checkpoint(str(tmp_path / "ck"))
    with pytest.raises(ArealError, match="no checkpoint at"):
        other.load_checkpoint(str(tmp_path / "absent"))


def test_a_checkpoint_before_any_step_does_not_touch_the_optimizer(one_rank_engine, tmp_path):
    """Saving at step 0 must not start AdamW's state (it would shift every later update)."""
    first, second = one_rank_engine(lora_rank=4), one_rank_engine(lora_rank=4)
    first.save_checkpoint(str(tmp_path / "ck0"))
    assert not first.optimizer.state
    for engine in (first, second):
        engine.train_step(SEQUENCES, policy_gradient_loss)
    a, b = _trainable(first), _trainable(second)
    assert all(torch.equal(a[k], b[k]) for k in a)
    first.load_checkpoint(str(tmp_path / "ck0"))
    assert first.step == 0 and not first.optimizer.state


def test_on_the_cpu_backward_holds_one_gathered_layer_at_a_time(one_rank_engine):
    """FSDP2's backward prefetch would gather the next layer while one is in backward; on the
    CPU that only costs memory (see parallelize.no_backward_prefetch)."""
    engine = one_rank_engine(lora_rank=4, gradient_checkpointing=True)
    layers = list(engine.hf_model.model.layers)
    in_backward, gathered_at_once = [False], []

    def count_gathered(module, args):
        # Under checkpointing a layer's forward runs again inside its backward. A layer is
        # gathered, or being gathered, when its FSDP group holds an all-gather's result or its
        # full parameters (FSDP2 internals: no public API tells).
        if in_backward[0]:
            groups = [layer._get_fsdp_state()._fsdp_param_group for layer in layers]
            gathered_at_once.append(sum(g._all_gather_result is not None or g.is_unsharded for g in groups))

    def loss_then_backward(logprobs, indices):
        in_backward[0] = True  # the forward is done; what follows is the backward
        return policy_gradient_loss(logprobs, indices)

    for layer in layers:
        layer.register_forward_pre_hook(count_gathered)
    engine.train_step(SEQUENCES, loss_then_backward)
    assert len(gathered_at_once) == len(layers) and len(layers) > 1
    assert max(gathered_at_once) == 1, gathered_at_once


@pytest.mark.parametrize("release", [True, False])
def test_release_freed_tensors_decides_the_allocator_setting(one_rank_engine, monkeypatch, release):
    import areal_fsdp2.engine as engine_module

    calls = []
    monkeypatch.setattr(engine_module, "return_freed_tensors_to_the_system", lambda: calls.append(1) or True)
    one_rank_engine(shard=False, release_freed_tensors=release)
    assert calls == ([1] if release else [])
