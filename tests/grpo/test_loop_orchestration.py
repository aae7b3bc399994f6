"""The GRPO loop's orchestration, against in-process stand-ins (real engines/servers: plugin tests)."""

import json

import attrs

import pytest
import torch

from areal_core.config_loader import load_config_or_raise
from areal_core.grpo.comm import Comm
from areal_core.grpo.loop import AgreementStopped, GRPOLoop
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.grpo.run_dir import RunDirectory
from areal_core.grpo.server_recovery import ServerLostError
from areal_core.registry import Registry

from .standins import CountingDataset, StandInEngine, StandInPlugin, StandInServer, first_token_is_five


def make_loop(tmp_path, server=None, engine=None, **overrides):
    config = load_config_or_raise(None, [
        "actor.backend=standin", "rollout.backend=standin-server", "gconfig.max_new_tokens=3",
        "gconfig.n_samples=8", "train.batch_size=4", "train.steps=12", "train.eval_every=4",
        "rollout.max_head_offpolicyness=0", f"output_dir={tmp_path / 'run'}", "rollout.max_model_len=40",
        *[f"{k}={v}" for k, v in overrides.items()]])
    engine, server = engine or StandInEngine(), server or StandInServer()
    if "actor.optimizer.lr" not in overrides:
        config = attrs.evolve(config, actor=attrs.evolve(
            config.actor, optimizer=attrs.evolve(config.actor.optimizer, lr=engine.lr)))
    engine.config = config
    registry = Registry(entry_points=[], extra_plugins=[("standin", StandInPlugin(engine, server))])
    registry.call("areal_inject_adapter", "standin", engine=engine, actor=config.actor)
    registry.call("areal_shard_model", "standin", engine=engine, actor=config.actor)
    publisher = AdapterPublisher(registry, "standin-server", server, config.gconfig.lora_name,
                                 config.rollout.max_head_offpolicyness)
    run_dir = RunDirectory(config.output_dir).create()
    loop = GRPOLoop(config, registry, engine, Comm(), run_dir, CountingDataset(), first_token_is_five,
                    publisher, progress=False)
    return loop, engine, server, run_dir


def test_versions_rollouts_and_run_directory(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path)
    summary = loop.run()
    records = run_dir.read_metrics()
    steps = [r for r in records if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["version"] for r in steps] == list(range(1, 13))
    # every step's batch came from the version before it, and every request named its version
    assert all(r["rollout_versions"] == [r["version"] - 1] for r in steps)
    assert all(name == f"lora-v{version}" for name, version, _, _ in server.requests)
    assert server.seen_names == [f"lora-v{v}" for v in range(13)]
    # synchronous: only the live version stays loaded, older ones were unloaded in order
    assert server.unloaded == [f"lora-v{v}" for v in range(12)]
    assert server.loaded_adapters() == ["lora-v12"]
    for key in ("reward_mean", "accuracy", "loss", "kl", "clip_fraction", "sync_seconds", "mismatch_kl",
                "mismatch_mean_abs", "mismatch_max_abs", "mismatch_ratio_outside", "mismatch_tokens"):
        assert all(key in r for r in steps), key
    # every version's check lands in exactly one record, naming the version
    checked = [r["agreement_version"] for r in records if "agreement_version" in r]
    assert checked == list(range(13))
    assert all(not r["agreement_alarm"] and r["agreement_gap"] <= r["agreement_threshold"]
               for r in records if "agreement_version" in r)
    # synchronous: every token of a batch comes from the trainer's current version
    assert all(r["mismatch_tokens"] == r["num_samples"] * 3 for r in steps)
    assert all(r["mismatch_max_abs"] < 1e-5 for r in steps)  # float32, the same arithmetic both sides
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 4, 8, 12]
    assert sorted(p.name for p in run_dir.adapters.iterdir()) == sorted(f"v{v}" for v in range(13))
    assert run_dir.plot_path.stat().st_size > 0
    events = [json.loads(line) for line in run_dir.events_path.read_text().splitlines()]
    assert [e["name"] for e in events if e["event"] == "load"] == [f"lora-v{v}" for v in range(13)]
    # and the policy learned the stand-in task
    assert summary["first_eval"] == 0.0 and summary["last_eval"] == 1.0
    assert steps[-1]["reward_mean"] > steps[0]["reward_mean"]


def test_a_server_serving_the_wrong_weights_is_reloaded_once_then_stops_with_a_checkpoint(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, server=StandInServer(corrupt_from_version=2))
    with pytest.raises(AgreementStopped, match=r"adapter version 3: the server serves the base model.*"
                                               r"resume with: .*resume=true"):
        loop.run()
    records = run_dir.read_metrics()
    assert max(r["step"] for r in records) == 2  # step 2 made version 2; nothing trained on it
    assert all(2 not in r.get("rollout_versions", []) and 3 not in r.get("rollout_versions", [])
               for r in records)
    assert (run_dir.checkpoints / "latest").read_text().strip() == "step-000002"
    happened = [(e["event"], e["version"]) for e in events(run_dir) if e["event"].startswith("agreement_")]
    assert happened == [("agreement_alarm", 2), ("agreement_reload", 3), ("agreement_alarm", 3)]


def test_a_wrong_load_that_a_reload_fixes_is_never_trained_on_and_the_run_goes_on(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, server=StandInServer(corrupt_versions={2}),
                                              **{"train.steps": 5})
    loop.run()
    records = [r for r in run_dir.read_metrics() if r["step"] > 0]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert records[2]["rollout_versions"] == [3]  # step 3's batch came from the reloaded copy
    assert all(2 not in r["rollout_versions"] for r in records)
    assert [e["event"] for e in events(run_dir) if e["event"].startswith("agreement_")] == [
        "agreement_alarm", "agreement_reload"]


def test_warn_records_every_alarm_and_goes_on(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, server=StandInServer(corrupt_from_version=2),
                                              **{"train.steps": 4, "train.agreement": "warn"})
    loop.run()
    alarms = [e["version"] for e in events(run_dir) if e["event"] == "agreement_alarm"]
    assert alarms == [2, 3, 4]
    assert all(e["reason"] for e in events(run_dir) if e["event"] == "agreement_alarm")


def test_off_runs_no_check(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, server=StandInServer(corrupt_from_version=2),
                                              **{"train.steps": 4, "train.agreement": "off"})
    loop.run()
    assert not any(e["event"].startswith("agreement") for e in events(run_dir))
    assert not any("agreement_gap" in r for r in run_dir.read_metrics())
    # the mismatch of the rollouts shows what went wrong, every step
    assert max(r["mismatch_mean_abs"] for r in run_dir.read_metrics() if r["step"] > 2) > 0.1


def events(run_dir):
    return [json.loads(line) for line in run_dir.events_path.read_text().splitlines()]


def test_keep_adapters_prunes_old_directories(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, **{"train.keep_adapters": 2, "train.steps": 5})
    loop.run()
    assert sorted(p.name for p in run_dir.adapters.iterdir()) == ["v4", "v5"]


def test_offpolicy_window_bounds_staleness_and_overlaps_generation(tmp_path):
    engine, server = StandInEngine(train_delay=0.3), StandInServer(generate_delay=0.2)
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, engine=engine, **{
        "rollout.max_head_offpolicyness": 1, "train.steps": 6, "train.eval_every": 0})
    loop.run()
    steps = [r for r in run_dir.read_metrics() if r["step"] > 0]
    for r in steps:
        trained_against = r["version"] - 1
        assert all(trained_against - 1 <= v <= trained_against for v in r["rollout_versions"]), r
    overlapped = [b for a, b in zip(steps, steps[1:]) if b["generation_started_at"] < a["train_finished_at"]]
    assert overlapped, "with K=1 the next batch must be generated while the current step trains"
    assert any(r["rollout_versions"] == [r["version"] - 2] for r in steps)
    # a version in use is never unloaded under a request: the server saw every name it was asked for
    assert all(name in server.seen_names for name, *_ in server.requests)


def test_synchronous_loop_never_generates_ahead(tmp_path):
    engine, server = StandInEngine(train_delay=0.1), StandInServer(generate_delay=0.05)
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, engine=engine,
                                              **{"train.steps": 4, "train.eval_every": 0})
    loop.run()
    steps = [r for r in run_dir.read_metrics() if r["step"] > 0]
    assert all(r["rollout_versions"] == [r["version"] - 1] for r in steps)
    assert all(b["generation_started_at"] >= a["train_finished_at"] for a, b in zip(steps, steps[1:]))


def test_resume_continues_steps_and_versions_and_matches_a_straight_run(tmp_path):
    straight, engine_a, _, _ = make_loop(tmp_path / "a", **{"train.steps": 4, "train.eval_every": 0})
    straight.run()

    first, _, _, run_dir = make_loop(tmp_path / "b", **{"train.steps": 2, "train.eval_every": 0})
    first.run()
    # the crashed run had gone on past its checkpoint: one more version was published
    (run_dir.adapters / "v3").mkdir()
    resumed, engine_b, server_b, _ = make_loop(tmp_path / "b", **{"train.steps": 4, "train.eval_every": 0,
                                                                  "resume": "true"})
    resumed.run()
    records = run_dir.read_metrics()
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    versions = [r["version"] for r in records]
    assert versions == [0, 1, 2, 5, 6] and server_b.seen_names[0] == "lora-v4"
    assert (run_dir.checkpoints / "latest").read_text().strip() == "step-000004"
    assert torch.allclose(engine_a.theta, engine_b.theta, atol=1e-6, rtol=0)


class LosesItsServerDuringACheck(StandInServer):
    """The agreement check of one version finds the server gone for good (past its restarts)."""

    def __init__(self, lost_at: str):
        super().__init__()
        self.lost_at = lost_at

    def prompt_logprobs(self, token_ids, *, lora_name):
        if lora_name == self.lost_at:
            raise ServerLostError(f"the server went away during the check of {lora_name}")
        return super().prompt_logprobs(token_ids, lora_name=lora_name)


@pytest.mark.parametrize("eval_every", [0, 3])
def test_a_stop_while_a_step_waits_for_its_check_keeps_that_steps_record_with_its_checkpoint(tmp_path, eval_every):
    """Step 3 trained and published version 3; the server is lost while version 3 is checked.
    The checkpoint of step 3 is written, so its record must be too: a resume continues after it."""
    overrides = {"train.steps": 5, "train.eval_every": eval_every, "train.checkpoint_every": 1}
    loop, _, _, run_dir = make_loop(tmp_path, server=LosesItsServerDuringACheck("lora-v3"), **overrides)
    with pytest.raises(ServerLostError, match="a checkpoint of step 3 .* is written"):
        loop.run()
    assert (run_dir.checkpoints / "latest").read_text().strip() == "step-000003"
    assert [r["step"] for r in run_dir.read_metrics()] == [0, 1, 2, 3]
    resumed, _, _, _ = make_loop(tmp_path, **overrides, resume="true")
    resumed.run()
    assert [r["step"] for r in run_dir.read_metrics()] == [0, 1, 2, 3, 4, 5]
