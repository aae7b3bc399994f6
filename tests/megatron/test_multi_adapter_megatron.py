"""Several LoRA adapters on one frozen base in the megatron engine, at tensor-parallel size 2.

One launch of two real processes (gloo, CPU mode; ``megatron_multi_adapter_cases.py``): gradients
never cross adapters, each adapter is split over TP like the base weights and exports its own
PEFT directory (checked against its own weights and against peft loading it on the HF model),
follows its own learning-rate schedule, and a checkpoint resumes every adapter bit for bit. In
this process: the declaration and the per-adapter configuration checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from areal_core.config import ActorConfig, AdapterConfig, RunConfig
from areal_core.testing.numerics import assert_close_to_norm
from megatron_multi_adapter_cases import ADAPTERS, NAMES, SAVED_AFTER, TOTAL_STEPS, TURNS
from megatron_worker import DATA

#: As test_layouts' ACROSS_ULPS: megatron-core against transformers/peft, of the largest logit.
ACROSS_ULPS = 512
TP = 2
TARGETS = {"alpha": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
           "beta": ["down_proj", "q_proj", "v_proj"]}
RANKS = {"alpha": (4, 8.0), "beta": (2, 6.0)}


def launched(test):
    """A test reading the two-process launch: marked like the other multi-process megatron tests."""
    return pytest.mark.slow(pytest.mark.distributed(test))


@pytest.fixture
def run(run_multi_adapter_tp2):
    result = run_multi_adapter_tp2["results"]["multi_adapter"]
    assert result["ok"], result.get("error")
    return {"result": result, "dir": run_multi_adapter_tp2["out"] / "multi_adapter"}


@launched
def test_gradients_never_cross_adapters(run):
    result = run["result"]["isolation"]
    tensors = torch.load(run["dir"] / "isolation.pt")
    initial, after_alpha, after_beta = tensors["initial"], tensors["after_alpha"], tensors["after_beta"]
    # Exact observations, no tolerance: alpha's step leaves beta without any gradient at all,
    # and beta's zero-advantage batch gives it exactly zero (alpha none).
    stepping_alpha, stepping_beta = result["gradients"]
    assert stepping_alpha["stepping"] == "alpha" and stepping_alpha["beta"] is None
    assert stepping_beta["stepping"] == "beta" and stepping_beta["alpha"] is None
    assert stepping_beta["beta"] == 0.0 and stepping_beta["beta_count"] == len(initial["beta"])
    assert stepping_alpha["alpha_count"] == len(initial["alpha"])
    metrics_alpha, metrics_beta = result["metrics"]
    assert metrics_beta["grad_norm"] == 0.0
    assert metrics_alpha["grad_norm"] > 0.1 and stepping_alpha["alpha"] > 1e-3  # a real gradient
    assert result["requires_grad_unchanged"]  # routing and disable_adapter never touch it
    assert all(".lora." in n for n in result["trainable"])  # the base stays frozen
    assert "2 adapters ['alpha', 'beta']" in result["unnamed_error"] and "adapter=" in result["unnamed_error"]
    # alpha's step moved its every lora_B (linear_out) off zero and left beta's every bit.
    assert [k for k in initial["beta"] if not torch.equal(initial["beta"][k], after_alpha["beta"][k])] == []
    moved = [k for k in initial["alpha"] if not torch.equal(initial["alpha"][k], after_alpha["alpha"][k])]
    assert sorted(moved) == sorted(k for k in initial["alpha"] if "linear_out" in k)
    # beta's first step on a zero gradient with weight decay 0 leaves it, and alpha, unchanged.
    for name in NAMES:
        assert [k for k in after_alpha[name] if not torch.equal(after_alpha[name][k], after_beta[name][k])] == []


@launched
def test_each_adapter_is_split_over_tensor_parallel_ranks_like_the_base(run):
    shapes = run["result"]["isolation"]["local_shapes"]
    whole = torch.load(run["dir"] / "isolation.pt")["initial"]
    qkv = "decoder.layers.0.self_attention.linear_qkv"
    proj = "decoder.layers.0.self_attention.linear_proj"
    for name in NAMES:
        assert set(shapes[name]) == set(whole[name])
    hidden = whole["alpha"][f"{qkv}.adapter.linear_in.weight"].shape[1]
    # alpha (rank 4, all-linear): A of linear_qkv split along the rank, A of linear_proj along its input
    assert shapes["alpha"][f"{qkv}.adapter.linear_in.weight"] == [4 // TP, hidden]
    proj_in = whole["alpha"][f"{proj}.adapter.linear_in.weight"].shape[1]
    assert shapes["alpha"][f"{proj}.adapter.linear_in.weight"] == [4, proj_in // TP]
    # beta (rank 2, q and v only): per-projection adapters, each A split along its rank
    assert shapes["beta"][f"{qkv}.adapter_q.linear_in.weight"] == [2 // TP, hidden]
    assert not any(".linear_proj." in k for k in shapes["beta"])
    for name in NAMES:
        for key, local in shapes[name].items():
            assert torch.Size(local).numel() * TP == whole[name][key].numel(), key


@launched
def test_each_adapter_follows_its_own_learning_rate_schedule(run):
    from areal_core.lr_schedule import learning_rate

    train = run["result"]["train"]
    optimizers = {a.name: a.optimizer for a in ADAPTERS}
    counts = {name: 0 for name in NAMES}
    for metrics in train["metrics"]:
        name = metrics["adapter"]
        assert metrics["lr"] == learning_rate(optimizers[name], counts[name], TOTAL_STEPS)
        counts[name] += 1
    lrs = [m["lr"] for m in train["metrics"] if m["adapter"] == "alpha"]
    # alpha decays linearly over ITS steps (0, 1, 2 of 6), not the engine's (0, 2, 4)
    assert lrs == pytest.approx([1e-2, 1e-2 * 5 / 6, 1e-2 * 4 / 6], rel=1e-12)
    assert [m["lr"] for m in train["metrics"] if m["adapter"] == "beta"] == [5e-3] * 3
    assert train["steps"] == {"engine": 6, "alpha": 3, "beta": 3}


def _peft_tensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "adapter_model.safetensors"))


@launched
@pytest.mark.parametrize("name", NAMES)
def test_each_adapter_exports_its_own_weights_in_peft_naming(run, name):
    from areal_core.adapter_format import verify_adapter_dir

    exported = run["result"]["train"]["exported"][name]
    rank, alpha = RANKS[name]
    config = verify_adapter_dir(exported["path"])
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (rank, alpha, TARGETS[name])
    assert (exported["rank"], exported["alpha"], exported["target_modules"]) == (rank, alpha, TARGETS[name])
    assert Path(exported["path"]).parts[-2:] == (name, "v3")
    tensors = _peft_tensors(exported["path"])
    own = torch.load(run["dir"] / "train.pt")["final"][name]  # the adapter in megatron layout
    assert len(tensors) == 2 * len(TARGETS[name]) * 2  # A and B, each target, two layers
    for layer in (0, 1):
        prefix = f"base_model.model.model.layers.{layer}."
        meg = f"decoder.layers.{layer}."
        # unfused layers map one to one
        for which, ab in (("linear_in", "A"), ("linear_out", "B")):
            assert torch.equal(tensors[prefix + f"mlp.down_proj.lora_{ab}.weight"],
                               own[meg + f"mlp.linear_fc2.adapter.{which}.weight"])
        if name == "alpha":  # one adapter over the fused linear_qkv: q, k and v share its A
            a = own[meg + "self_attention.linear_qkv.adapter.linear_in.weight"]
            for hf in ("q_proj", "k_proj", "v_proj"):
                assert torch.equal(tensors[prefix + f"self_attn.{hf}.lora_A.weight"], a)
            assert tensors[prefix + "self_attn.q_proj.lora_A.weight"].shape[0] == 4
        else:  # per-projection adapters: their own A and B
            for part in ("q", "v"):
                for which, ab in (("linear_in", "A"), ("linear_out", "B")):
                    assert torch.equal(tensors[prefix + f"self_attn.{part}_proj.lora_{ab}.weight"],
                                       own[meg + f"self_attention.linear_qkv.adapter_{part}.{which}.weight"])
            assert tensors[prefix + "self_attn.q_proj.lora_A.weight"].shape[0] == 2


@launched
@pytest.mark.parametrize("name", NAMES)
def test_each_exported_adapter_reproduces_its_megatron_logits_in_peft(run, name, megatron_models):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    logits = torch.load(run["dir"] / "train.pt")["logits"]
    base = AutoModelForCausalLM.from_pretrained(megatron_models["qwen2"], dtype=torch.float32).eval()
    model = PeftModel.from_pretrained(base, run["result"]["train"]["exported"][name]["path"]).eval()
    with torch.no_grad():
        expected = [model(torch.tensor([s])).logits[0].float() for s in DATA]
    ours = logits[name][: len(DATA)]
    assert_close_to_norm(ours, expected, ulps=ACROSS_ULPS, norm="max", msg=f"{name} logits against peft")
    other = "beta" if name == "alpha" else "alpha"
    # the adapters really differ from each other and from the base, so the agreement is this adapter's
    for different in (logits[other][: len(DATA)], logits["base"][: len(DATA)]):
        assert max(float((a - b).abs().max()) for a, b in zip(ours, different)) > 1e-3


@launched
def test_several_adapters_resume_bit_for_bit(run):
    train = run["result"]["train"]
    tensors = torch.load(run["dir"] / "train.pt")
    assert train["files"] == ["meta.json", "tp0.pt", "tp1.pt"]
    assert train["restored_steps"] == {"engine": SAVED_AFTER, "alpha": 2, "beta": 2}
    for name in NAMES:
        saved, restored = tensors["saved"][name], tensors["restored"][name]
        assert [k for k in saved if not torch.equal(saved[k], restored[k])] == []
        final, resumed = tensors["final"][name], tensors["after_resume"][name]
        assert [k for k in final if not torch.equal(final[k], resumed[k])] == []
    # The same operations on the same values: the metrics are equal exactly.
    assert train["metrics"][SAVED_AFTER:] == train["resumed_metrics"]
    assert [m["adapter"] for m in train["resumed_metrics"]] == [n for n, _ in TURNS[SAVED_AFTER:]]


@launched
def test_misuse_of_several_adapters_is_refused_clearly(run):
    found = run["result"]["misuse"]
    assert found["first"] == ""
    assert "'alpha' is injected already" in found["duplicate"]
    assert "second adapter needs a name" in found["unnamed_second"]
    assert "before areal_shard_model" in found["after_setup"]
    assert "no adapter 'gamma'" in found["unknown_adapter"] and "['alpha']" in found["unknown_adapter"]
    assert "no adapter 'gamma'" in found["unknown_export"]
    # a run without adapters: keeps the one-adapter checkpoint layout, and it is not mistaken for a list
    assert found["legacy_adapter"] == [RunConfig().gconfig.lora_name]
    assert found["legacy_meta_keys"] == ["architecture", "data_parallel_size", "format", "lora_alpha",
                                         "lora_rank", "steps", "target_modules", "tensor_parallel_size"]
    assert "run's only adapter" in found["legacy_into_listed"] and "lists adapters" in found["legacy_into_listed"]


# --- in this process -----------------------------------------------------------------------------


def test_the_megatron_declaration_says_several_adapters():
    from areal_core.registry import Registry

    assert Registry().declaration("megatron").lora.multi_adapter is True


def test_each_adapters_rank_and_targets_are_checked_for_the_megatron_layout(tiny_qwen2):
    from areal_megatron.validation import check_config

    config = RunConfig(
        actor=ActorConfig(backend="megatron", path=str(tiny_qwen2), tensor_parallel_size=2, world_size=2,
                          lora_rank=4),
        adapters=[AdapterConfig(name="good", lora_rank=4), AdapterConfig(name="odd", lora_rank=3),
                  AdapterConfig(name="far", lora_rank=2, target_modules=["lm_head"])])
    found = {e.key: str(e) for e in check_config(config)}
    assert sorted(found) == ["adapters.far.target_modules", "adapters.odd.lora_rank"]
    assert "multiple of 2" in found["adapters.odd.lora_rank"]
    assert "['lm_head']" in found["adapters.far.target_modules"]
