"""Several LoRA adapters on one frozen base in the fsdp2 engine.

Two real gloo ranks (one launch of ``fsdp2_multi_adapter_cases.py``): gradients never cross adapters,
two adapters of other ranks and target modules train, export (each checked against peft loading
it on the plain HF model), resume bit-for-bit, and follow their own learning-rate schedules.
One rank in this process: the first adapter starts like a run's only adapter, routing never
changes ``requires_grad``, and the refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from areal_core.testing.numerics import assert_close_to_norm
from tests.fsdp2.two_rank_launch import TwoRankRun, free_ports

pytestmark = pytest.mark.slow

torch = pytest.importorskip("torch")

from areal_core.adapters import adapter_views  # noqa: E402
from areal_core.config import ActorConfig, AdapterConfig, RunConfig, TrainConfig  # noqa: E402
from areal_core.errors import AdapterError  # noqa: E402
from areal_core.registry import Registry  # noqa: E402

CASES_SCRIPT = Path(__file__).with_name("fsdp2_multi_adapter_cases.py")
LAUNCH_TIMEOUT_S = 300
FLOAT32_U = 2.0**-24


@pytest.fixture(scope="module")
def multi_run(tiny_qwen2, tmp_path_factory) -> TwoRankRun:
    """Every two-rank multi-adapter case in one launch of two real processes (gloo, CPU)."""
    out = tmp_path_factory.mktemp("fsdp2-multi-adapter")
    ports = ",".join(str(p) for p in free_ports(2))
    command = [sys.executable, str(CASES_SCRIPT), "--out", str(out), "--qwen2", str(tiny_qwen2), "--ports", ports]
    processes, logs = [], []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [process.wait(timeout=LAUNCH_TIMEOUT_S) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        codes = ["timed out"] * 2
    finally:
        for log in logs:
            log.close()
    if codes != [0, 0]:
        tails = "\n".join(f"--- rank {r} ({codes[r]}) ---\n" + (out / f"rank{r}.log").read_text()[-4000:]
                          for r in (0, 1))
        pytest.fail(f"the two-rank multi-adapter launch failed:\n{tails}")
    return TwoRankRun(out)


def _of(state: dict, peft_name: str) -> dict:
    return {k: v for k, v in state.items() if f".{peft_name}." in k}


# --- two ranks -----------------------------------------------------------------------------------


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["isolation", "isolation_replicated", "isolation_bf16_base"])
def test_gradients_never_cross_adapters(multi_run, case):
    initial = multi_run.tensors(case, "initial")
    after_alpha = multi_run.tensors(case, "after_alpha")
    after_beta = multi_run.tensors(case, "after_beta")
    alpha, beta = _of(initial, "alpha"), _of(initial, "beta")
    assert alpha and beta and len(alpha) + len(beta) == len(initial)
    for rank in (0, 1):
        result = multi_run.result(case, rank)
        assert result["peft_names"] == {"alpha": "alpha", "beta": "beta"}
        # Exact observations, no tolerance: alpha's step leaves beta without any gradient at all,
        # and beta's zero-advantage batch gives it exactly zero (alpha none).
        stepping_alpha, stepping_beta = result["gradients"]
        assert stepping_alpha["stepping"] == "alpha" and stepping_alpha["beta"] is None
        assert stepping_beta["stepping"] == "beta" and stepping_beta["alpha"] is None
        assert stepping_beta["beta"] == 0.0 and stepping_beta["beta_count"] == len(beta)
        assert stepping_alpha["alpha_count"] == len(alpha)
        metrics_alpha, metrics_beta = result["metrics"]
        assert metrics_beta["grad_norm"] == 0.0 and metrics_beta["update_skipped"] == 0
        # alpha's gradient is a real one: its norm is O(1) (measured 1.0), and its shards on
        # each rank are O(0.1) where rounding noise would be ~1e-8.
        assert metrics_alpha["grad_norm"] > 0.1
        assert stepping_alpha["alpha"] > 1e-3
        assert result["requires_grad_unchanged"]  # routing and disable_adapter never touch it
        assert {n.split(".")[-2] for n in result["trainable"]} == {"alpha", "beta"}
        assert "alpha" in result["unnamed_error"] and "beta" in result["unnamed_error"]
        assert result["unnamed_error"].startswith("AdapterError")
    # alpha's step moved every lora_B of alpha off zero (its lora_A has no gradient yet while
    # lora_B is zero) and left beta's every bit.
    assert [k for k in beta if not torch.equal(initial[k], after_alpha[k])] == []
    moved = [k for k in alpha if not torch.equal(initial[k], after_alpha[k])]
    assert sorted(moved) == sorted(k for k in alpha if "lora_B" in k)
    # beta's first step on a zero gradient with weight decay 0 leaves it, and alpha, unchanged.
    assert [k for k in after_alpha if not torch.equal(after_alpha[k], after_beta[k])] == []


@pytest.mark.distributed
def test_each_adapter_follows_its_own_learning_rate_schedule(multi_run):
    from areal_core.lr_schedule import learning_rate

    import fsdp2_multi_adapter_cases as cases  # noqa: F401  (beside this file: pytest puts it on sys.path)

    optimizers = {a.name: a.optimizer for a in cases.ADAPTERS}
    counts = {name: 0 for name in optimizers}
    lrs = {name: [] for name in optimizers}
    for metrics in multi_run.result("train")["metrics"]:
        name = metrics["adapter"]
        assert metrics["lr"] == learning_rate(optimizers[name], counts[name], cases.TOTAL_STEPS)
        lrs[name].append(metrics["lr"])
        counts[name] += 1
    # alpha decays linearly over ITS steps (0, 1, 2 of 6), not the engine's (0, 2, 4).
    assert lrs["alpha"] == pytest.approx([1e-2, 1e-2 * 5 / 6, 1e-2 * 4 / 6], rel=1e-12)
    assert lrs["beta"] == [5e-3] * 3
    assert multi_run.result("train")["steps"] == {"alpha": 3, "beta": 3}


def reference_logits(model_dir, adapter_dir, sequences, max_tokens):
    """The HF base with the exported adapter loaded by peft, batched like the engine's micro-batches."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from areal_core.microbatching import plan_microbatches

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    lengths = [len(s) for s in sequences]
    out = [None] * len(sequences)
    for batch in plan_microbatches(lengths, max_tokens):
        ids = torch.zeros((len(batch), max(lengths[i] for i in batch)), dtype=torch.long)
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
    return torch.log_softmax(logits[:-1], dim=-1).gather(-1, torch.tensor(sequence[1:]).unsqueeze(-1)).squeeze(-1)


@pytest.mark.distributed
@pytest.mark.parametrize("name,rank,alpha,targets", [
    ("alpha", 4, 8, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    ("beta", 2, 6, ["down_proj", "q_proj", "v_proj"]),
])
def test_each_adapter_exports_its_own_peft_directory(multi_run, tiny_qwen2, name, rank, alpha, targets):
    from safetensors import safe_open

    from areal_core.adapter_format import verify_adapter_dir

    import fsdp2_multi_adapter_cases as cases

    exported = multi_run.result("train")["export"][name]
    assert multi_run.result("train", 1)["export"][name] == exported
    config = verify_adapter_dir(exported["path"])
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (rank, alpha, targets)
    assert (exported["rank"], exported["alpha"], exported["target_modules"]) == (rank, alpha, targets)
    with safe_open(str(Path(exported["path"]) / "adapter_model.safetensors"), framework="pt") as handle:
        keys = sorted(handle.keys())
        shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in keys}
    assert len(keys) == 2 * len(targets) * 2  # A and B, each target, two layers
    assert not any(".alpha." in k or ".beta." in k or ".default." in k for k in keys)
    assert {k.rsplit(".", 3)[1] for k in keys} == set(targets)
    assert all(s[0] == rank for k, s in shapes.items() if "lora_A" in k)
    assert all(s[1] == rank for k, s in shapes.items() if "lora_B" in k)
    other = "beta" if name == "alpha" else "alpha"
    for r in (0, 1):
        sequences = multi_run.result("train", r)["eval_sequences"]
        expected = reference_logits(tiny_qwen2, exported["path"], sequences, cases.MAX_TOKENS)
        # The same matrix shapes on both sides (the engine's micro-batches); as in
        # test_two_ranks, 16 u of the largest logit allows other kernels, while the other
        # adapter's, or no adapter's, logits are >= 1e-3 (>= 1.6e4 u of |logit| <= 4) off.
        assert_close_to_norm(multi_run.tensor_list("train", f"logits_{name}", r), expected, ulps=16,
                             norm="max", msg=f"{name} logits")
        policy = [logprobs_from_logits(l, s) for l, s in zip(expected, sequences)]
        engine = multi_run.tensor_list("train", f"logprobs_{name}", r)
        # The chunked head against log_softmax: one float32 step of the largest |log p| measured
        # in test_two_ranks; bound 64 u.
        assert_close_to_norm(engine, policy, ulps=64, norm="max", msg=f"{name} log-probabilities")
        base = multi_run.tensor_list("train", "base_logprobs", r)
        others = multi_run.tensor_list("train", f"logprobs_{other}", r)
        assert max(float((a - b).abs().max()) for a, b in zip(engine, base)) > 1e-3
        assert max(float((a - b).abs().max()) for a, b in zip(engine, others)) > 1e-3


@pytest.mark.distributed
def test_several_adapters_resume_bit_for_bit(multi_run):
    import torch.distributed.checkpoint as dcp

    straight = multi_run.tensors("train", "final")
    resumed = multi_run.tensors("resume", "final")
    result = multi_run.result("resume")
    assert result["restored_step"] == 4 and result["restored_steps"] == {"alpha": 2, "beta": 2}
    assert sorted(straight) == sorted(resumed)
    # The same operations on the same values: equal bits (CPU, float32), metrics equal exactly.
    assert [k for k in straight if not torch.equal(straight[k], resumed[k])] == []
    assert multi_run.result("train")["metrics"][4:] == result["metrics"]
    checkpoint = multi_run.out / "checkpoint"
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert [(a["name"], a["lora_rank"], a["step"], a["optimizer"]) for a in meta["adapters"]] == [
        ("alpha", 4, 2, True), ("beta", 2, 2, True)]
    keys = list(dcp.FileSystemReader(str(checkpoint / "state")).read_metadata().state_dict_metadata)
    for name in ("alpha", "beta"):
        assert any(k.startswith(f"optim_{name}.state.") and k.endswith("exp_avg_sq") for k in keys)
        # each adapter's AdamW holds its own parameters' state only
        other = "beta" if name == "alpha" else "alpha"
        assert not [k for k in keys if k.startswith(f"optim_{name}.state.") and f".{other}." in k]


# --- one rank, in this process ---------------------------------------------------------------


@pytest.fixture
def engines(tiny_qwen2):
    """A factory of one-rank engines with the given ``adapters:`` (empty: a run's only adapter)."""
    registry = Registry()
    built = []

    def build(adapters=(), seed=7, path=None, **actor_options):
        actor = ActorConfig(backend="fsdp2", device="cpu", path=str(path or tiny_qwen2), **actor_options)
        config = RunConfig(actor=actor, train=TrainConfig(seed=seed), adapters=list(adapters))
        engine = registry.build_engine("fsdp2", config)
        built.append(engine)
        engine.load_base_model()
        views = adapter_views(config)
        for entry, view in views:
            name = entry.name if adapters else None  # a run without adapters: names none
            registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=view.actor, adapter_name=name)
        registry.call("areal_shard_model", "fsdp2", engine=engine, actor=views[0][1].actor)
        return engine

    build.registry = registry
    yield build
    for engine in reversed(built):
        engine.close()


TWO = [AdapterConfig(name="a", lora_rank=4, lora_alpha=8), AdapterConfig(name="b", lora_rank=4, lora_alpha=8)]


def _whole_load_copy(tiny_qwen2, tmp_path):
    """The tiny model under other tensor names: the engine loads it whole (no meta build)."""
    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "renamed"
    shutil.copytree(tiny_qwen2, renamed)
    tensors = load_file(renamed / "model.safetensors")
    save_file({n.replace("model.", "transformer.", 1): t for n, t in tensors.items()},
              renamed / "model.safetensors", metadata={"format": "pt"})
    return renamed


@pytest.mark.parametrize("loading", ["meta", "whole"])
def test_the_first_adapter_starts_like_a_runs_only_adapter(engines, tiny_qwen2, tmp_path, loading):
    path = _whole_load_copy(tiny_qwen2, tmp_path) if loading == "whole" else tiny_qwen2
    single = engines(path=path, lora_rank=4, lora_alpha=8)
    assert (single._checkpoint is None) == (loading == "whole") or single.stage == "sharded"
    assert [s.peft_name for s in single.adapters.values()] == ["default"]  # old checkpoints load
    only = single.trainable_state()
    assert only and all(".default." in k for k in only)
    several = engines(TWO, path=path)
    state = several.trainable_state()
    first, second = _of(state, "a"), _of(state, "b")
    assert {k.replace(".a.", ".default."): v for k, v in first.items()}.keys() == only.keys()
    assert all(torch.equal(first[k], only[k.replace(".a.", ".default.")]) for k in first)
    # The second adapter, of the same shape, is drawn from its own seed: another lora_A.
    for key, value in first.items():
        twin = second[key.replace(".a.", ".b.")]
        if "lora_A" in key:
            assert not torch.equal(value, twin)
        else:
            assert float(twin.abs().max()) == 0.0  # lora_B starts at zero


def _loss(logprobs, indices):
    return torch.stack([-lp.sum() for lp in logprobs]).sum() / 20.0, {}


SEQUENCES = [[1, 5, 6, 7, 8], [1, 9, 10, 11], [1, 4, 4, 4, 4, 4, 4, 2]]


def test_routing_never_changes_requires_grad_and_an_unnamed_adapter_is_refused(engines):
    engine = engines(TWO)
    flags = {n: p.requires_grad for n, p in engine.model.named_parameters()}
    assert {n.split(".")[-2] for n, f in flags.items() if f} == {"a", "b"}
    with pytest.raises(AdapterError, match=r"2 adapters \['a', 'b'\]: name the one meant with adapter="):
        engine.train_step(SEQUENCES, _loss)
    with pytest.raises(AdapterError, match="name the one meant"):
        engine.compute_logprobs(SEQUENCES)
    with pytest.raises(AdapterError, match=r"no adapter 'c'.*\['a', 'b'\]"):
        engine.train_step(SEQUENCES, _loss, adapter="c")
    assert engine.step == 0
    base = engine.compute_logprobs(SEQUENCES, disable_adapter=True)
    engine.train_step(SEQUENCES, _loss, adapter="a")
    engine.train_step(SEQUENCES, _loss, adapter="b")
    engine.train_step(SEQUENCES, _loss, adapter="a")
    assert {n: s.step for n, s in engine.adapters.items()} == {"a": 2, "b": 1} and engine.step == 3
    a, b = (engine.compute_logprobs(SEQUENCES, adapter=n) for n in ("a", "b"))
    assert torch.equal(torch.cat(engine.compute_logprobs(SEQUENCES, disable_adapter=True)), torch.cat(base))
    assert float((torch.cat(a) - torch.cat(b)).abs().max()) > 1e-3
    assert float((torch.cat(a) - torch.cat(base)).abs().max()) > 1e-3
    assert {n: p.requires_grad for n, p in engine.model.named_parameters()} == flags


def test_adapters_that_cannot_live_together_are_refused(engines, tiny_qwen2):
    registry = Registry()
    actor = ActorConfig(backend="fsdp2", device="cpu", path=str(tiny_qwen2))
    config = RunConfig(actor=actor, adapters=TWO)
    engine = registry.build_engine("fsdp2", config)
    try:
        engine.load_base_model()
        registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor, adapter_name="a")
        with pytest.raises(AdapterError, match="injected already"):
            registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor, adapter_name="a")
        with pytest.raises(AdapterError, match="second adapter needs a name"):
            registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor)
        with pytest.raises(AdapterError, match="without '.'"):
            registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor, adapter_name="x.y")
        with pytest.raises(AdapterError, match="full_finetune"):
            registry.call("areal_inject_adapter", "fsdp2", engine=engine,
                          actor=ActorConfig(backend="fsdp2", device="cpu", path=str(tiny_qwen2), full_finetune=True),
                          adapter_name="c")
        assert list(engine.adapters) == ["a"]
    finally:
        engine.close()


def test_the_declaration_says_several_adapters():
    declaration = Registry().declaration("fsdp2")
    assert declaration.lora.multi_adapter is True
