"""Real FSDP2 over gloo with two processes: export equivalence, resume, gradient semantics.

Everything two-rank runs in ONE launch (fixture ``two_rank_run``, script
``distributed_cases.py``); these tests check what the processes recorded against independent
references built here: the Hugging Face base model with the exported adapter loaded by
``peft.PeftModel.from_pretrained``.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from areal_core.testing.numerics import assert_close_to_norm, relative_error

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# Unit roundoffs. Every bound below is in these units, relative to the size of what is compared
# (``areal_core.testing.numerics``); next to each, the figures measured under ATEN_CPU_CAPABILITY
# default, avx2 and avx512.
FLOAT32_U = 2.0**-24
BFLOAT16_U = 2.0**-8
EXPORT_CASES = {
    # case: (model fixture, rank, alpha, target modules in the file)
    "qwen2_r16_all": ("tiny_qwen2", 16, 32, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    "qwen2_r16_all_replicated": ("tiny_qwen2", 16, 32, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    "qwen2_r16_all_whole_base": ("tiny_qwen2", 16, 32, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    "qwen2_r16_all_all_whole": ("tiny_qwen2", 16, 32, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    "llama_r1_subset": ("tiny_llama", 1, 3, ["down_proj", "q_proj", "v_proj"]),
}
PEFT_KEY = re.compile(r"^base_model\.model\.model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+\.lora_[AB]\.weight$")


def reference_model(model_dir, adapter_dir, dtype_name="float32"):
    """The HF base model in ``dtype_name`` with the exported adapter loaded by peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype_name))
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    return model


def logits_of(model, sequences, max_tokens=None):
    """Logits of each sequence: one at a time, or batched as the engine batches them.

    With ``max_tokens`` the sequences are grouped and right-padded exactly like the engine's
    micro-batches (same budget), so both sides run the same matrix shapes; batching alone
    moves float32 logits by up to ~1e-6.
    """
    import torch

    from areal_core.microbatching import plan_microbatches

    lengths = [len(s) for s in sequences]
    plan = plan_microbatches(lengths, max_tokens) if max_tokens else [[i] for i in range(len(sequences))]
    out = [None] * len(sequences)
    for batch in plan:
        longest = max(lengths[i] for i in batch)
        ids = torch.zeros((len(batch), longest), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, i in enumerate(batch):
            ids[row, : lengths[i]] = torch.tensor(sequences[i])
            mask[row, : lengths[i]] = 1
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
        for row, i in enumerate(batch):
            out[i] = logits[row, : lengths[i]]
    return out


def logprobs_from_logits(logits, sequence):
    import torch

    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(sequence[1:]).unsqueeze(-1)).squeeze(-1)


def max_diff(first, second) -> float:
    return max(float((a - b).abs().max()) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_exported_adapter_reproduces_sharded_logits(two_rank_run, case, request):
    model_fixture, _, _, _ = EXPORT_CASES[case]
    model_dir = request.getfixturevalue(model_fixture)
    exported = two_rank_run.result(case)["export"]
    reference = reference_model(model_dir, exported["path"])
    budget = two_rank_run.result(case)["max_tokens_per_microbatch"]
    for rank in (0, 1):
        sequences = two_rank_run.result(case, rank)["eval_sequences"]
        sharded = two_rank_run.tensor_list(case, "logits", rank)
        expected = logits_of(reference, sequences, budget)
        # The same matrix shapes on both sides: measured equal bits; 16 u of the largest logit
        # (|logit| <= 2.9) leaves room for other kernels on the gathered weights, while a wrong
        # or missing adapter moves the logits by its effect below (>= 1.6e6 u).
        assert_close_to_norm(sharded, expected, ulps=16, norm="max", msg="batched logits")
        # Unbatched, one sequence at a time: other matrix shapes round otherwise, measured up to
        # 7.6 u of the largest logit; bound 128 u.
        assert_close_to_norm(sharded, logits_of(reference, sequences), ulps=128, norm="max", msg="unbatched logits")
        with reference.disable_adapter():
            base = logits_of(reference, sequences, budget)
        # The trained adapter must matter, or the comparison above proves nothing (measured
        # >= 0.19, against rounding noise <= 1e-6).
        assert max_diff(expected, base) > 1e-3
        # The engine's log-probabilities (the chunked head) against log_softmax of the logits:
        # measured at most 4.8e-7, 1.5 u of the largest |log p| (<= 5.7), one float32 step
        # there; bound 64 u. A log-probability of the wrong token or model is O(0.1) off.
        base_logprobs = [logprobs_from_logits(l, s) for l, s in zip(base, sequences)]
        assert_close_to_norm(two_rank_run.tensor_list(case, "base_logprobs", rank), base_logprobs,
                             ulps=64, norm="max", msg="base log-probabilities")
        policy_logprobs = [logprobs_from_logits(l, s) for l, s in zip(expected, sequences)]
        engine_logprobs = two_rank_run.tensor_list(case, "logprobs", rank)
        assert [len(lp) for lp in engine_logprobs] == [len(s) - 1 for s in sequences]
        assert_close_to_norm(engine_logprobs, policy_logprobs, ulps=64, norm="max", msg="policy log-probabilities")


@pytest.mark.parametrize("case", sorted(EXPORT_CASES))
def test_adapter_directory_holds_only_peft_lora_tensors(two_rank_run, case):
    from safetensors import safe_open

    from areal_core.adapter_format import verify_adapter_dir

    _, rank, alpha, targets = EXPORT_CASES[case]
    exported = two_rank_run.result(case)["export"]
    assert two_rank_run.result(case, 1)["export"] == exported  # every rank returns the same
    path = Path(exported["path"])
    assert sorted(p.name for p in path.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", "areal_manifest.json"
    ]
    assert not [p.name for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left
    config = verify_adapter_dir(path)
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (rank, alpha, targets)
    assert (exported["rank"], exported["alpha"], exported["target_modules"]) == (rank, alpha, targets)
    assert exported["version"] == 3 and exported["num_bytes"] == (path / "adapter_model.safetensors").stat().st_size
    assert exported["seconds"] > 0
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        dtypes = {str(handle.get_tensor(k).dtype) for k in keys}
    assert keys and all(PEFT_KEY.match(k) for k in keys), keys
    assert not any(".default" in k or "base_layer" in k for k in keys)
    modules = {k.rsplit(".", 3)[1] for k in keys}
    assert sorted(modules) == targets
    num_layers = 2
    assert len(keys) == 2 * len(targets) * num_layers
    assert dtypes == {"torch.float32"}


def test_gradient_checkpointing_gives_the_same_update(two_rank_run):
    from safetensors.torch import load_file

    plain = load_file(str(Path(two_rank_run.result("qwen2_r16_all")["export"]["path"]) / "adapter_model.safetensors"))
    checkpointed = load_file(
        str(Path(two_rank_run.result("qwen2_r16_all_gc")["export"]["path"]) / "adapter_model.safetensors")
    )
    assert sorted(plain) == sorted(checkpointed)
    # Recomputed activations, the same gradients: measured equal bits. Bound 64 u of the whole
    # adapter's norm (|adapter| = 9); one optimizer step moves it by 6e5 u (grad_equiv's step 1,
    # with a 20 times smaller clip), so a gradient lost in a recomputed layer shows far above.
    assert_close_to_norm([checkpointed[k] for k in sorted(plain)], [plain[k] for k in sorted(plain)], ulps=64)


def test_a_replicated_adapter_gets_the_sharded_update(two_rank_run):
    from safetensors.torch import load_file

    def adapter(case):
        return load_file(str(Path(two_rank_run.result(case)["export"]["path"]) / "adapter_model.safetensors"))

    # The gradients are the same sums, reduced otherwise (an all-reduce of the whole gradient,
    # or FSDP's reduce-scatter), and the gradient norm's squares are summed in another order.
    # With the smooth AdamW of these cases (distributed_cases.SMOOTH_ADAMW, which says why) the
    # adapters after 3 steps differ by 1.4 u to 1.5 u of the adapter's norm; gradients not summed
    # over the ranks move it by 3e6 u (both measured). Bound 256 u.
    sharded, replicated = adapter("qwen2_r16_all"), adapter("qwen2_r16_all_replicated")
    assert sorted(sharded) == sorted(replicated)
    keys = sorted(sharded)
    assert_close_to_norm([replicated[k] for k in keys], [sharded[k] for k in keys], ulps=256)
    steps = zip(two_rank_run.result("qwen2_r16_all_replicated")["metrics"],
                two_rank_run.result("qwen2_r16_all")["metrics"], strict=True)
    # Gradient norm and loss: measured within 5.3 u; unsummed gradients are 2e6 u (norm) and
    # 2e5 u (loss, from step 2) off. Bound 64 u.
    for replicated_step, sharded_step in steps:
        assert replicated_step["grad_norm"] == pytest.approx(sharded_step["grad_norm"], rel=64 * FLOAT32_U)
        assert replicated_step["loss"] == pytest.approx(sharded_step["loss"], rel=64 * FLOAT32_U)


@pytest.mark.parametrize("case", ["qwen2_r16_all_whole_base", "qwen2_r16_all_all_whole"])
def test_a_base_kept_whole_gets_the_sharded_update(two_rank_run, case):
    from safetensors.torch import load_file

    def adapter(name):
        return load_file(str(Path(two_rank_run.result(name)["export"]["path"]) / "adapter_model.safetensors"))

    # actor.replicate_base: no frozen weight is sharded; the adapter is, unless replicated too.
    sharded = two_rank_run.result(case)["sharded"]
    assert sharded["frozen"] == 0
    assert (sharded["trainable"] == 0) == case.endswith("all_whole")
    assert two_rank_run.result("qwen2_r16_all")["sharded"]["frozen"] > 0
    # The same weights in the same forward: the update is the sharded run's, the gradients reduced
    # as in the sharded or the replicated-adapter run (bounds and their reasons as there). Measured
    # (ATEN_CPU_CAPABILITY default, avx2, avx512): 0 u with the adapter sharded (the same sums),
    # 1.4-1.5 u with it replicated (as test_a_replicated_adapter_gets_the_sharded_update).
    reference, whole = adapter("qwen2_r16_all"), adapter(case)
    keys = sorted(reference)
    assert sorted(whole) == keys
    assert_close_to_norm([whole[k] for k in keys], [reference[k] for k in keys], ulps=256)
    for whole_step, sharded_step in zip(two_rank_run.result(case)["metrics"],
                                        two_rank_run.result("qwen2_r16_all")["metrics"], strict=True):
        assert whole_step["grad_norm"] == pytest.approx(sharded_step["grad_norm"], rel=64 * FLOAT32_U)
        assert whole_step["loss"] == pytest.approx(sharded_step["loss"], rel=64 * FLOAT32_U)


def test_a_sharded_checkpoint_resumes_with_a_replicated_adapter(two_rank_run):
    straight = two_rank_run.tensors("resume_straight", "final")
    resumed = two_rank_run.tensors("resume_second_half_replicated", "final")
    assert two_rank_run.result("resume_second_half_replicated")["restored_step"] == 2
    assert sorted(straight) == sorted(resumed)
    # Steps 3 and 4 with the adapter replicated instead of sharded: measured within 0.7 u of the
    # adapter's norm; a step lost or repeated moves it by >= 6e5 u (one step of grad_equiv, whose
    # clip is 20 times smaller). Bound 64 u.
    keys = sorted(straight)
    assert_close_to_norm([resumed[k] for k in keys], [straight[k] for k in keys], ulps=64)


def test_bfloat16_base_trains_a_float32_adapter(two_rank_run, tiny_qwen2):
    from safetensors import safe_open

    result = two_rank_run.result("qwen2_bf16_base")
    path = Path(result["export"]["path"])
    with safe_open(str(path / "adapter_model.safetensors"), framework="pt") as handle:
        assert {str(handle.get_tensor(k).dtype) for k in handle.keys()} == {"torch.float32"}
    # peft on a bfloat16 base keeps the adapter in float32 too: the very same computation, in
    # the same shapes. Measured equal bits; the bound, 16 float32 u of the largest logit, is
    # 1/4096 of one bfloat16 rounding, so it asks for the same computation, not a close one.
    reference = reference_model(tiny_qwen2, path, "bfloat16")
    for rank in (0, 1):
        sequences = two_rank_run.result("qwen2_bf16_base", rank)["eval_sequences"]
        budget = two_rank_run.result("qwen2_bf16_base")["max_tokens_per_microbatch"]
        assert_close_to_norm(two_rank_run.tensor_list("qwen2_bf16_base", "logits", rank),
                             logits_of(reference, sequences, budget), ulps=16, norm="max")


def test_bfloat16_compute_policy_trains(two_rank_run, tiny_qwen2):
    result = two_rank_run.result("qwen2_param_bf16")
    losses = [m["loss"] for m in result["metrics"]]
    assert all(m["update_skipped"] == 0 and m["grad_norm"] > 0 for m in result["metrics"])
    assert all(abs(loss) < 100 for loss in losses)
    # Computed in bfloat16 from float32 shards: close to the float32 reference, not equal.
    # Measured 3.1 to 3.4 bfloat16 u (2^-8) of the logits' norm; float32 compute would give
    # about 1e-4 of one (a few float32 u, as unbatched above), serving without the adapter 143.
    # Bounds 0.25 and 16.
    reference = reference_model(tiny_qwen2, result["export"]["path"])
    sequences = result["eval_sequences"]
    difference = relative_error(two_rank_run.tensor_list("qwen2_param_bf16", "logits"), logits_of(reference, sequences))
    assert 0.25 * BFLOAT16_U < difference <= 16 * BFLOAT16_U, difference / BFLOAT16_U


def test_full_finetuning_trains_every_parameter_and_exports_nothing(two_rank_run):
    result = two_rank_run.result("full_ft")
    assert result["trainable"] == result["total"]
    # Tied embeddings appear once; every parameter moved.
    assert result["changed"] == result["parameters"] and "model.embed_tokens.weight" in result["changed"]
    for rank in (0, 1):
        other = two_rank_run.result("full_ft", rank)
        assert other["export_error"].startswith("AdapterError") and "full_finetune" in other["export_error"]
        assert other["disable_adapter_error"].startswith("AdapterError")


def test_an_error_on_one_rank_is_raised_on_both(two_rank_run):
    for rank in (0, 1):
        result = two_rank_run.result("collective_errors", rank)
        assert "rank 1" in result["bad_tokens"] and "999" in result["bad_tokens"]
        assert "advantage missing" in result["failing_loss"]
        assert result["step_after_errors"] == 0  # the failed step took no optimizer step
        assert result["metrics_after_errors"][0]["update_skipped"] == 0


def test_a_non_finite_gradient_skips_the_update_on_every_rank(two_rank_run):
    for rank in (0, 1):
        found = two_rank_run.result("collective_errors", rank)["non_finite"]
        assert found["update_skipped"] == 1 and not math.isfinite(found["grad_norm"])
        assert found["weights_unchanged"] and found["step_counted"] == 1  # the schedule still advances
        after = two_rank_run.result("collective_errors", rank)["metrics_after_errors"][0]
        assert after["update_skipped"] == 0 and math.isfinite(after["grad_norm"])


def test_two_ranks_with_half_the_data_update_like_one_rank_with_all(two_rank_run):
    two, one = two_rank_run.result("grad_equiv_2rank"), two_rank_run.result("grad_equiv_1rank")
    assert (two["world_size"], one["world_size"]) == (2, 1)
    assert two_rank_run.ranks[0]["group_after_close"] is False  # the engine's own group is gone
    rank1 = two_rank_run.result("grad_equiv_2rank", 1)
    # Ranks held different numbers of micro-batches (and rank 1 none at all in step 1).
    assert [m["dummy_microbatches"] for m in rank1["metrics"]] == [2.0, 3.0]
    assert [m["local_sequences"] for m in rank1["metrics"]] == [1, 0]
    # The same sums in another order (two ranks' halves, or one rank's whole): gradient norms,
    # losses and adapters measured within 3.9 u (adapters: 0.3 u of their norm); a gradient not
    # summed over the ranks, or scaled by the world size, is O(1) off. Bounds 64 u.
    for step in (0, 1):
        m2, m1, m2_rank1 = two["metrics"][step], one["metrics"][step], rank1["metrics"][step]
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=64 * FLOAT32_U)
        assert m2["grad_norm"] > 0.05  # the clip (0.05) was active
        assert m2_rank1["grad_norm"] == m2["grad_norm"]
        # Losses and loss_fn metrics are per rank: the two ranks add up to the one rank.
        assert m2["loss"] + m2_rank1["loss"] == pytest.approx(m1["loss"], rel=64 * FLOAT32_U)
        assert m2.get("sequences_seen", 0) + m2_rank1.get("sequences_seen", 0) == m1["sequences_seen"] == 4
        sharded = two_rank_run.tensors("grad_equiv_2rank", f"step{step}")
        single = two_rank_run.tensors("grad_equiv_1rank", f"step{step}")
        assert sorted(sharded) == sorted(single)
        keys = sorted(single)
        assert_close_to_norm([sharded[k] for k in keys], [single[k] for k in keys], ulps=64, msg=f"step {step}")
        # lora_B starts at zero: a moved lora_B shows the update happened.
        assert any(float(single[k].abs().max()) > 0 for k in single if "lora_B" in k)


def test_resume_continues_bit_for_bit(two_rank_run):
    straight = two_rank_run.tensors("resume_straight", "final")
    resumed = two_rank_run.tensors("resume_second_half", "final")
    second = two_rank_run.result("resume_second_half")
    assert second["restored_step"] == 2 and second["step"] == 4
    assert second["rng_after_load"] == two_rank_run.result("resume_first_half")["rng_at_save"]
    assert sorted(straight) == sorted(resumed)
    # The same operations on the same values in the same layout: equal bits on any CPU (measured
    # under all three capabilities), as the metrics below are compared exactly.
    import torch

    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
    assert two_rank_run.result("resume_straight")["metrics"][2:] == second["metrics"]
    checkpoint = two_rank_run.out / "resume" / "checkpoint"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert (meta["step"], meta["world_size"], meta["lora_rank"]) == (2, 2, 4)
    assert sorted(p.name for p in (checkpoint / "rng").iterdir()) == ["rank0.json", "rank1.json"]
    # Only the adapter and its AdamW state were saved, no frozen base weight.
    import torch.distributed.checkpoint as dcp

    keys = list(dcp.FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)
    assert any(k.startswith("optim.state.") and k.endswith("exp_avg_sq") for k in keys)
    assert not [p.name for p in checkpoint.parent.iterdir() if p.name.startswith(".")]
