"""The megatron engine on real megatron-core, per parallel layout (TP=1, TP=2, DP=2).

Every assertion reads what one launch of ``megatron_worker.py`` measured (see conftest.py) and
checks it against Hugging Face ``transformers`` and ``peft`` in this process.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from areal_core.testing.numerics import assert_close_to_norm
from megatron_worker import DATA

#: float32 unit roundoff; the bounds below are in these units, relative to the size of what is
#: compared, with the figures measured under ATEN_CPU_CAPABILITY default, avx2 and avx512.
FLOAT32_U = 2.0**-24
#: Megatron-core against transformers/peft (other kernels, a fused QKV, other summation orders)
#: or one layout against another, logits and base log-probabilities: measured up to 9.6 u of the
#: largest logit against transformers, 10.2 u between layouts (|logit| <= 3.5) and 3.1 u of the
#: largest |log p| (<= 5.4). Bound 512 u, about the former 1e-4 at 3.5, since the CUDA path
#: (AREAL_TEST_DEVICE=cuda) was not measured; a missing adapter moves logits by >= 1.4e7 u (its
#: effect below), DP gradients not summed over the replicas by 6.3e6 u.
ACROSS_ULPS = 512
#: The engine's log-probabilities against log_softmax of its own logits: measured up to 3.0 u
#: of the largest |log p|, one float32 step there. Bound 64 u.
OWN_LOGPROBS_ULPS = 64
LAYOUTS = [
    pytest.param("run_tp1", marks=pytest.mark.slow, id="tp1"),
    pytest.param("run_tp2", marks=[pytest.mark.slow, pytest.mark.distributed], id="tp2"),
    pytest.param("run_dp2", marks=[pytest.mark.slow, pytest.mark.distributed], id="dp2"),
]
WITH_CONVERSION = LAYOUTS[:2]
TRAIN_CASES = ["train_qwen2_all_linear", "train_llama_subset"]
ARCH_OF = {"train_qwen2_all_linear": "qwen2", "train_llama_subset": "llama"}
EXPECTED_TARGETS = {
    "train_qwen2_all_linear": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "train_llama_subset": ["down_proj", "gate_proj", "q_proj", "v_proj"],
}


def hf_model(path: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].float() for seq in DATA]


def logprobs_from(logits: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.log_softmax(l[:-1], -1).gather(-1, torch.tensor(s[1:])[:, None]).squeeze(-1)
            for l, s in zip(logits, DATA)]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def case(run, name) -> dict:
    result = run["results"][name]
    assert result["ok"], result.get("error")
    return result


@pytest.mark.parametrize("layout", WITH_CONVERSION)
@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_weights_round_trip_exactly_and_logits_match_hf(layout, arch, request, megatron_models):
    run = request.getfixturevalue(layout)
    result = case(run, f"conversion_{arch}")
    assert result["keys_only_in_hf"] == [] and result["keys_only_in_roundtrip"] == []
    assert result["exact"], "HF -> megatron-core (sharded) -> HF changed some tensor"
    megatron = torch.load(run["out"] / f"conversion_{arch}" / "logits.pt")
    assert_close_to_norm(megatron, hf_logits(hf_model(megatron_models[arch])), ulps=ACROSS_ULPS, norm="max")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", TRAIN_CASES)
def test_exported_adapter_reproduces_megatron_logits_in_peft(layout, name, request, megatron_models):
    from peft import PeftModel

    run = request.getfixturevalue(layout)
    result = case(run, name)
    assert result["satisfies_protocol"]  # areal_core.interfaces.Engine
    exported = result["exported"]
    assert exported["version"] == 3 and exported["rank"] == 4 and exported["alpha"] == 8.0
    assert exported["target_modules"] == EXPECTED_TARGETS[name]
    config = json.loads((Path(exported["path"]) / "adapter_config.json").read_text())
    assert config["target_modules"] == EXPECTED_TARGETS[name]
    tensors = torch.load(run["out"] / name / "tensors.pt")
    base = hf_model(megatron_models[ARCH_OF[name]])
    plain = hf_logits(base)
    peft = hf_logits(PeftModel.from_pretrained(base, exported["path"]).eval())
    assert_close_to_norm(tensors["logits"], peft, ulps=ACROSS_ULPS, norm="max", msg="logits against peft")
    # The adapter really moved the model, so the agreement above is not that of two base models.
    assert max_diff(tensors["logits"], plain) > 1e-2
    # compute_logprobs agrees with the logits; disable_adapter gives the base model's.
    assert_close_to_norm(tensors["logprobs"], logprobs_from(tensors["logits"]), ulps=OWN_LOGPROBS_ULPS,
                         norm="max", msg="log-probabilities against the logits")
    assert_close_to_norm(tensors["base_logprobs"], logprobs_from(plain), ulps=ACROSS_ULPS, norm="max",
                         msg="base log-probabilities against transformers")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_training_reports_metrics_summed_over_own_microbatches(layout, request):
    run = request.getfixturevalue(layout)
    metrics = case(run, "train_qwen2_all_linear")["metrics"]
    assert all(m["grad_norm"] > 0.0 for m in metrics)  # B starts at zero, but its gradient does not
    assert all(m["lr"] == 1e-2 for m in metrics)
    # Metrics are this rank's own: rank 0 brings all 6 sequences alone, 4 of them with two ranks.
    first = metrics[0]
    assert first["sequences"] == {"run_tp1": 6.0, "run_tp2": 4.0, "run_dp2": 4.0}[layout]
    assert first["num_microbatches"] >= 2  # the 24-token budget splits the batch


@pytest.mark.parametrize("layout", ["run_tp2", "run_dp2"])
@pytest.mark.parametrize("name", TRAIN_CASES)
@pytest.mark.distributed
@pytest.mark.slow
def test_parallel_layouts_train_the_same_adapter_as_one_process(layout, name, request, run_tp1):
    """Same data, seed and steps: TP=2 and DP=2 must end where one process ends (up to rounding).

    The gradient norms (taken after the data-parallel sum and over the TP shards) must equal the
    single process's: Adam's update hides a wrongly scaled gradient, the norm does not.
    """
    run = request.getfixturevalue(layout)
    ours_result, reference_result = case(run, name), case(run_tp1, name)
    # The squares summed in another order (over TP shards, after the DP sum): measured within
    # 2.9 u; a gradient scaled by the world size is off by a factor. Bound 64 u.
    for ours_step, reference_step in zip(ours_result["metrics"], reference_result["metrics"]):
        assert ours_step["grad_norm"] == pytest.approx(reference_step["grad_norm"], rel=64 * FLOAT32_U)
    ours = torch.load(run["out"] / name / "tensors.pt")
    reference = torch.load(run_tp1["out"] / name / "tensors.pt")
    assert ours["initial_adapter"].keys() == reference["initial_adapter"].keys()
    for key, tensor in reference["initial_adapter"].items():
        assert torch.equal(ours["initial_adapter"][key], tensor), f"initial {key} differs"
    # The whole adapter against its norm, trained with megatron_worker.OPTIMIZER (whose text says
    # why its eps is large): measured within 6.1 u; DP=2 without the gradients' sum over the
    # replicas ends 2.6e6 u away (3 steps moved the adapter by 6e6 u). Bound 256 u.
    keys = sorted(reference["adapter"])
    assert_close_to_norm([ours["adapter"][k] for k in keys], [reference["adapter"][k] for k in keys], ulps=256)
    assert_close_to_norm(ours["logits"], reference["logits"], ulps=ACROSS_ULPS, norm="max", msg="logits")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_checkpoint_resume_continues_exactly(layout, request):
    run = request.getfixturevalue(layout)
    result = case(run, "checkpoint")
    tp = 2 if layout == "run_tp2" else 1
    assert result["files"] == ["meta.json"] + [f"tp{r}.pt" for r in range(tp)]
    assert result["restored_equals_saved"]
    assert result["changed_by_step"]
    assert result["resumed_equals_continuous"], f"max diff {result['max_diff']}"
    assert result["grad_norms"][0] == result["grad_norms"][1]
    assert "lora_rank=4" in result["mismatch_error"] and "8" in result["mismatch_error"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_non_finite_gradient_skips_the_update_on_every_rank(layout, request):
    # The NaN is in the last rank's loss; rank 0 reports, so over TP and DP it arrived by the reductions.
    found = case(request.getfixturevalue(layout), "non_finite")
    assert found["update_skipped"] == 1 and not found["grad_norm_finite"]
    assert found["weights_kept"] and found["moments_kept"] and found["moments_checked"] > 0
    assert found["steps_counted"] == 2  # the schedule still advances, as in the fsdp2 engine
    assert found["next_skipped"] == 0 and found["next_moved"]


@pytest.mark.parametrize("layout", [LAYOUTS[0], LAYOUTS[1]])
def test_misuse_raises_clear_errors_on_every_rank(layout, request):
    found = case(request.getfixturevalue(layout), "misuse")
    assert "areal_inject_adapter" in found["train_before_shard"]
    assert "inject" in found["export_before_inject"]
    assert "token id 99" in found["token_outside_vocab"]
    assert "at least 2" in found["one_token_sequence"]
    assert "already exists" in found["export_twice"]
