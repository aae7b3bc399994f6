"""The loop's RL options and stops, against the in-process stand-ins (fast): minibatches with the
recomputed proximal policy, the decoupled loss on stale rollouts, dynamic sampling, the schedule
across a resume, periodic checkpoints and the stops that write one. The real runs are in
tests/train/test_rl_options.py."""

import math

import pytest
import torch

from areal_core.config import OptimizerConfig
from areal_core.grpo.loop import RunInterrupted
from areal_core.grpo.server_recovery import ServerLostError
from areal_core.grpo.stop_request import STOP
from areal_core.lr_schedule import learning_rate

from .standins import StandInEngine, StandInServer
from .test_loop_orchestration import make_loop


def steps(run_dir):
    return [r for r in run_dir.read_metrics() if r["step"] > 0]


def test_minibatches_take_several_optimizer_steps_against_the_recomputed_policy(tmp_path):
    engine = StandInEngine()
    computed = []
    original = engine.compute_logprobs
    engine.compute_logprobs = lambda seqs, **kw: computed.append((len(seqs), kw)) or original(seqs, **kw)
    loop, engine, server, run_dir = make_loop(tmp_path, engine=engine, **{
        "actor.ppo_n_minibatches": 4, "train.steps": 3, "train.eval_every": 0})
    loop.run()
    trains = [c for c in engine.calls if isinstance(c, tuple) and c[0] == "train"]
    assert [n for _, n in trains] == [8] * 12  # 32 samples a step in 4 minibatches, 3 steps
    assert engine.step == 12
    # one recompute per step over the whole batch (the probe's scoring is the other calls)
    assert [n for n, kw in computed if n == 32 and not kw] == [32, 32, 32]
    records = steps(run_dir)
    assert all(r["recompute_seconds"] >= 0 and r["mismatch_tokens"] == 32 * 3 for r in records)
    assert all(r["mismatch_max_abs"] < 1e-5 for r in records)  # the recomputed pre-update policy


def test_decoupled_loss_on_stale_rollouts_reports_its_behaviour_weights(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, engine=StandInEngine(train_delay=0.1),
                                              server=StandInServer(generate_delay=0.05), **{
        "rollout.max_head_offpolicyness": 2, "actor.use_decoupled_loss": "true",
        "actor.behav_imp_weight_cap": 1.5, "train.steps": 6, "train.eval_every": 0})
    loop.run()
    records = steps(run_dir)
    assert any(r["rollout_versions"][0] < r["version"] - 1 for r in records)  # some rollouts were stale
    for r in records:
        assert r["behav_weight_mean"] > 0 and 0 <= r["behav_capped_fraction"] <= 1
    # a stale batch weighs its tokens by proximal/behaviour: not all 1, and some above the cap
    assert any(abs(r["behav_weight_mean"] - 1) > 1e-3 for r in records)
    assert any(r["behav_capped_fraction"] > 0 for r in records)


def test_dynamic_sampling_drops_equal_groups_refills_and_resumes_exactly(tmp_path):
    options = {"actor.dynamic_sampling": "true", "train.steps": 6, "train.eval_every": 0,
               "train.checkpoint_every": 3}
    straight, _, _, straight_dir = make_loop(tmp_path / "a", **options)
    straight.run()
    records = steps(straight_dir)
    assert sum(r["dropped_groups"] for r in records) > 0  # the stand-in learns: groups become all-5
    for r in records:
        assert r["num_samples"] == (4 - r["dynamic_sampling_short"]) * 8
        assert r["refill_rounds"] <= 4
    positions = [r["data_position"] for r in records]
    assert positions[-1] > 4 * 6  # refills drew more prompts from the stream
    # killed after step 3 (its checkpoint), resumed: the same positions and the same batches
    first, _, _, run_dir = make_loop(tmp_path / "b", **{**options, "train.steps": 3})
    first.run()
    resumed, _, _, _ = make_loop(tmp_path / "b", **{**options, "resume": "true"})
    resumed.run()
    again = steps(run_dir)
    assert [r["data_position"] for r in again] == positions
    assert [r["dropped_groups"] for r in again] == [r["dropped_groups"] for r in records]
    assert [r["reward_mean"] for r in again] == [r["reward_mean"] for r in records]


def test_dynamic_sampling_short_of_a_batch_trains_on_what_it_has_and_warns_once(tmp_path, capsys):
    # a reward that is always 0: every group is dropped, every round
    loop, engine, _, run_dir = make_loop(tmp_path, **{"actor.dynamic_sampling": "true",
                                                     "actor.dynamic_sampling_max_rounds": 2,
                                                     "train.steps": 3, "train.eval_every": 0})
    loop.reward_fn = lambda record, completion: 0.0
    loop.run()
    records = steps(run_dir)
    assert all(r["dynamic_sampling_short"] == 4 and r["num_samples"] == 0 for r in records)
    assert all(r["refill_rounds"] == 2 and r["dropped_groups"] == 4 + 4 + 4 for r in records)
    assert all(r["data_position"] == 12 * r["step"] for r in records)
    assert capsys.readouterr().err.count("dynamic sampling: step 1 trains on 0 of 4 groups") == 1


def test_a_cosine_schedule_with_warmup_continues_exactly_after_a_resume(tmp_path):
    options = {"actor.optimizer.lr_scheduler_type": "cosine", "actor.optimizer.warmup_steps_proportion": 0.25,
               "actor.optimizer.min_lr_ratio": 0.1, "train.steps": 8, "train.eval_every": 0,
               "train.checkpoint_every": 3}
    straight, engine_a, _, straight_dir = make_loop(tmp_path / "a", **options)
    straight.run()
    expected = [learning_rate(OptimizerConfig(lr=20.0, lr_scheduler_type="cosine", warmup_steps_proportion=0.25,
                                              min_lr_ratio=0.1), k, 8) for k in range(8)]
    assert [r["lr"] for r in steps(straight_dir)] == expected
    assert expected[:2] == [10.0, 20.0] and expected[-1] < 20.0 * 0.2
    first, _, _, run_dir = make_loop(tmp_path / "b", **{**options, "train.steps": 8})
    first.engine.train_delay = 0.0
    STOP.requested = False
    stop_after = 5  # Ctrl-C while step 6 is generated: the checkpoint of step 5 is written
    original = first.publisher.generate

    def generate(*args, **kwargs):
        if first.completed_step == stop_after:
            STOP.request()
        return original(*args, **kwargs)

    first.publisher.generate = generate
    try:
        with pytest.raises(RunInterrupted, match=r"interrupted \(Ctrl-C\) before step 6.*a checkpoint of step 5 "
                                                 r"\(the last completed\) is written; continue with: .*resume=true"):
            first.run()
    finally:
        STOP.requested = False
    assert (run_dir.checkpoints / "latest").read_text().strip() == "step-000005"
    resumed, engine_b, _, _ = make_loop(tmp_path / "b", **{**options, "resume": "true"})
    resumed.run()
    records = steps(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    assert [r["lr"] for r in records] == expected
    assert torch.equal(engine_a.theta.detach(), engine_b.theta.detach())  # the same seeded arithmetic


def test_an_engine_that_ignores_the_schedule_is_refused(tmp_path):
    engine = StandInEngine()
    loop, engine, _, _ = make_loop(tmp_path, engine=engine, **{"actor.optimizer.lr_scheduler_type": "linear"})
    engine.config = None  # the stand-in then steps at its constant rate
    with pytest.raises(Exception, match=r"stepped at lr 20.0 where actor.optimizer's schedule \(linear"):
        loop.run()


def test_periodic_checkpoints_keep_the_newest(tmp_path):
    loop, _, _, run_dir = make_loop(tmp_path, **{"train.steps": 7, "train.checkpoint_every": 2,
                                                "train.keep_checkpoints": 2, "train.eval_every": 0})
    loop.run()
    assert sorted(p.name for p in run_dir.checkpoints.glob("step-*")) == ["step-000006", "step-000007"]


def test_checkpoint_every_seconds(tmp_path):
    loop, _, _, run_dir = make_loop(tmp_path, engine=StandInEngine(train_delay=0.3), **{
        "train.steps": 4, "train.checkpoint_every": 0, "train.checkpoint_every_seconds": 0.5,
        "train.keep_checkpoints": 0, "train.eval_every": 0})
    loop.run()
    written = sorted(p.name for p in run_dir.checkpoints.glob("step-*"))
    assert 2 <= len(written) <= 4 and written[-1] == "step-000004", written
    # a checkpoint step waits for its version's agreement verdict, which its record carries
    records = {r["step"]: r for r in run_dir.read_metrics()}
    assert all("agreement_version" in records[int(name[5:])] for name in written)


@pytest.mark.parametrize("die_at", [("generate", 4), ("load", 4)], ids=["while-generating", "while-loading"])
def test_a_server_lost_past_its_restarts_stops_with_a_checkpoint_of_the_last_step(tmp_path, die_at):
    """Lost while the next batch is generated (the step before is complete), or while a trained
    step's version is loaded (that step is checkpointed, its record marked unpublished)."""
    from faults.test_recovery_orchestration import DyingServer

    server = DyingServer(die_at=[die_at])
    loop, _, _, run_dir = make_loop(tmp_path, server=server, **{"train.steps": 6, "train.eval_every": 0,
                                                                "rollout.max_restarts": 0,
                                                                "train.checkpoint_every": 0})
    with pytest.raises(ServerLostError, match=r"used up.*a checkpoint of step (\d+) \(the last completed\) is "
                                              r"written; continue with: .*resume=true") as caught:
        loop.run()
    step = int(caught.value.args[0].split("a checkpoint of step ")[1].split()[0])
    assert step >= 2 and (run_dir.checkpoints / "latest").read_text().strip() == f"step-{step:06d}"
    records = run_dir.read_metrics()
    assert [r["step"] for r in records] == list(range(step + 1))  # its record is written too
    assert records[-1].get("published", True) is (die_at[0] == "generate")
    resumed, _, _, _ = make_loop(tmp_path, **{"train.steps": 6, "train.eval_every": 0, "resume": "true"})
    resumed.run()
    assert [r["step"] for r in steps(run_dir)] == list(range(1, 7))
    assert all(r["data_position"] == 4 * r["step"] for r in steps(run_dir))
    versions = [r["version"] for r in run_dir.read_metrics()]
    assert versions == sorted(set(versions))  # the unpublished version's number is never reused


def test_clip_variants_and_aggregations_run_through_the_loop(tmp_path):
    loop, _, _, run_dir = make_loop(tmp_path, **{
        "actor.eps_clip_higher": 0.28, "actor.c_clip": 3.0, "actor.loss_agg_mode": "seq-mean-token-sum-norm",
        "actor.reward_norm.std_level": "null", "actor.overlong_reward_penalty": "true",
        "actor.overlong_tokens": 1, "actor.overlong_penalty_factor": 0.5, "actor.kl_ctl": 0.01,
        "train.steps": 4})
    summary = loop.run()
    records = steps(run_dir)
    assert all(math.isfinite(r["loss"]) and r["kl"] >= 0 and "dual_clip_fraction" in r for r in records)
    assert summary["last_eval"] >= summary["first_eval"]
