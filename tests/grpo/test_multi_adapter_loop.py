"""A run with ``adapters:`` on in-process stand-ins: one step clock over every adapter, each its own
versions, records, checkpoints and resume (real engines and servers: their plugin tests)."""

import json

import attrs
import pytest
import torch

from areal_core.adapters import adapter_views
from areal_core.config import AdapterConfig, GenerationConfig, OptimizerConfig
from areal_core.config_loader import load_config_or_raise
from areal_core.grpo.comm import Comm
from areal_core.grpo.loop import GRPOLoop, RunInterrupted
from areal_core.grpo.multi_adapter_loop import MultiAdapterLoop
from areal_core.grpo.publisher import AdapterPublisher
from areal_core.grpo.run_dir import RunDirectory
from areal_core.registry import Registry

from .multi_standins import MultiStandInEngine, MultiStandInPlugin, first_token_is
from .standins import CountingDataset, StandInServer

STEPS = 8


def adapters_config(tmp_path, offpolicyness=1, **overrides):
    """Adapter "three" may train on batches of a version behind (offpolicyness 1), which makes the
    rollouts depend on timing: the resume tests ask for exact runs with 0."""
    config = load_config_or_raise(None, [
        "actor.backend=standin-multi", "rollout.backend=standin-server", "gconfig.max_new_tokens=3",
        "gconfig.n_samples=8", f"train.steps={STEPS}", "train.eval_every=4", "train.checkpoint_every=4",
        f"output_dir={tmp_path / 'run'}", "rollout.max_model_len=40",
        *[f"{k}={v}" for k, v in overrides.items()]])
    five = AdapterConfig(name="five", lora_rank=1, lora_alpha=1, optimizer=OptimizerConfig(lr=20.0),
                         batch_size=4, gconfig=attrs.evolve(config.gconfig))
    three = AdapterConfig(name="three", lora_rank=1, lora_alpha=1, optimizer=OptimizerConfig(lr=15.0),
                          batch_size=4, max_head_offpolicyness=offpolicyness,
                          gconfig=GenerationConfig(n_samples=6, max_new_tokens=3))
    return attrs.evolve(config, adapters=[five, three])


def make_multi_loop(tmp_path, config, server=None):
    engine, server = MultiStandInEngine(), server or StandInServer()
    engine.config = config
    registry = Registry(entry_points=[], extra_plugins=[("standin", MultiStandInPlugin(engine, server))])
    views = adapter_views(config)
    for adapter, view in views:
        registry.call("areal_inject_adapter", "standin-multi", engine=engine, actor=view.actor,
                      adapter_name=adapter.name)
    registry.call("areal_shard_model", "standin-multi", engine=engine, actor=views[0][1].actor)
    publishers = {a.name: AdapterPublisher(registry, "standin-server", server, a.name, a.max_head_offpolicyness)
                  for a, _ in views}
    tasks = {a.name: (CountingDataset(), first_token_is(token)) for (a, _), token in zip(views, (5, 3))}
    run_dir = RunDirectory(config.output_dir).create()
    loop = MultiAdapterLoop(config, registry, engine, Comm(), run_dir, tasks, publishers, progress=False)
    return loop, engine, server, run_dir


def test_every_adapter_trains_on_its_own_task_with_its_own_versions(tmp_path):
    loop, engine, server, run_dir = make_multi_loop(tmp_path, adapters_config(tmp_path))
    summary = loop.run()
    records = run_dir.read_metrics()
    assert [r["step"] for r in records] == list(range(STEPS + 1))  # one record per step, step 0 first
    for record in records[1:]:
        assert set(record) >= {"step", "five", "three", "step_seconds"}
        assert record["five"]["num_samples"] == 4 * 8 and record["three"]["num_samples"] == 4 * 6
        assert record["five"]["version"] == record["three"]["version"] == record["step"]
    # each adapter learnt its own task, at its own rate
    assert torch.argmax(engine.thetas["five"]) == 5 and torch.argmax(engine.thetas["three"]) == 3
    assert records[-1]["five"]["eval_accuracy"] == 1.0 and records[-1]["three"]["eval_accuracy"] == 1.0
    assert records[0]["five"]["eval_accuracy"] == 0.0 and records[0]["three"]["eval_accuracy"] == 0.0
    assert records[1]["five"]["lr"] == 20.0 and records[1]["three"]["lr"] == 15.0
    assert summary["adapters"]["five"]["last_eval"] == 1.0
    # one step clock: each step trains every adapter once, in the order listed
    trains = [c for c in engine.calls if isinstance(c, tuple) and c[0] == "train"]
    assert [c[1] for c in trains] == ["five", "three"] * STEPS
    # versions per adapter, on one server, each request naming its own adapter's version
    assert [n for n in server.seen_names if n.startswith("five-")] == [f"five-v{v}" for v in range(STEPS + 1)]
    assert [n for n in server.seen_names if n.startswith("three-")] == [f"three-v{v}" for v in range(STEPS + 1)]
    assert {name.rsplit("-v", 1)[0] for name, *_ in server.requests} == {"five", "three"}
    # "three" keeps one version more live (max_head_offpolicyness 1): its window, not five's
    assert sorted(server.loaded_adapters()) == ["five-v8", "three-v7", "three-v8"]
    for name in ("five", "three"):
        assert sorted(p.name for p in (run_dir.adapters / name).iterdir()) == sorted(f"v{v}" for v in range(STEPS + 1))
    assert not list(run_dir.adapters.glob("v*"))
    events = [json.loads(line) for line in run_dir.events_path.read_text().splitlines()]
    assert {e["adapter"] for e in events} == {"five", "three"}
    assert all(e["name"].startswith(e["adapter"] + "-v") for e in events if e.get("name"))
    assert (run_dir.root / "plot.png").stat().st_size > 0


def final_thetas(engine):
    return {name: theta.detach().clone() for name, theta in engine.thetas.items()}


def test_resume_continues_every_adapter_exactly(tmp_path):
    whole_dir, part_dir = tmp_path / "whole", tmp_path / "part"
    whole_dir.mkdir(), part_dir.mkdir()
    loop, engine, _, whole_run = make_multi_loop(whole_dir, adapters_config(whole_dir, 0))
    loop.run()
    expected, expected_records = final_thetas(engine), whole_run.read_metrics()

    loop, _, _, _ = make_multi_loop(part_dir, adapters_config(part_dir, 0, **{"train.steps": 4}))
    loop.run()
    loop, engine, _, part_run = make_multi_loop(part_dir, adapters_config(part_dir, 0, resume="true"))
    loop.run()
    got = final_thetas(engine)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    records = part_run.read_metrics()
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    for mine, theirs in zip(records[1:], expected_records[1:]):
        for name in ("five", "three"):
            assert mine[name]["reward_mean"] == theirs[name]["reward_mean"]
    for name in ("five", "three"):  # a resume publishes under new version numbers: they never go back
        versions = [r[name]["version"] for r in records]
        assert versions == sorted(set(versions))
    state = json.loads((part_run.checkpoints / "step-000008" / "loop.json").read_text())
    assert {name: s["step"] for name, s in state["adapters"].items()} == {"five": 8, "three": 8}


def test_a_stop_between_two_adapters_resumes_each_where_it_was(tmp_path, monkeypatch):
    whole_dir, part_dir = tmp_path / "whole", tmp_path / "part"
    whole_dir.mkdir(), part_dir.mkdir()
    loop, engine, _, _ = make_multi_loop(whole_dir, adapters_config(whole_dir, 0))
    loop.run()
    expected = final_thetas(engine)

    loop, engine, _, run_dir = make_multi_loop(part_dir, adapters_config(part_dir, 0))
    three = loop.tracks[1]
    original = GRPOLoop.step

    def stop_at_six(self, step):
        if self is three and step == 6:
            raise RunInterrupted("interrupted (Ctrl-C) before step 6")
        return original(self, step)

    monkeypatch.setattr(GRPOLoop, "step", stop_at_six)
    with pytest.raises(RunInterrupted, match="five 6, three 5"):
        loop.run()
    monkeypatch.setattr(GRPOLoop, "step", original)
    latest = (run_dir.checkpoints / "latest").read_text().strip()
    state = json.loads((run_dir.checkpoints / latest / "loop.json").read_text())
    assert {name: s["step"] for name, s in state["adapters"].items()} == {"five": 6, "three": 5}
    assert engine.steps == {"five": 6, "three": 5}
    assert "three" not in run_dir.read_metrics()[-1] and run_dir.read_metrics()[-1]["step"] == 6

    loop, engine, _, run_dir = make_multi_loop(part_dir, adapters_config(part_dir, 0, resume="true"))
    loop.run()
    got = final_thetas(engine)
    assert all(torch.equal(got[name], expected[name]) for name in expected)
    records = run_dir.read_metrics()
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert all("five" in r and "three" in r for r in records)


def test_a_checkpoint_of_other_adapters_is_refused_on_resume(tmp_path):
    config = adapters_config(tmp_path, **{"train.steps": 4})
    make_multi_loop(tmp_path, config)[0].run()
    renamed = attrs.evolve(config, resume=True, adapters=[attrs.evolve(config.adapters[0], name="six"),
                                                          config.adapters[1]])
    loop = make_multi_loop(tmp_path, renamed)[0]
    with pytest.raises(Exception, match=r"holds the adapters \['five', 'three'\], not this run's \['six', 'three'\]"):
        loop.run()


def test_a_list_of_one_runs_on_an_engine_written_for_one_adapter(tmp_path):
    """A third-party engine that knows nothing of adapters (no adapter_name, no adapter=) runs a
    list of one, laid out like a list of many."""
    from .standins import StandInEngine, StandInPlugin, first_token_is_five

    config = load_config_or_raise(None, [
        "actor.backend=standin", "rollout.backend=standin-server", "gconfig.max_new_tokens=3",
        "train.steps=4", "train.eval_every=2", f"output_dir={tmp_path / 'run'}", "rollout.max_model_len=40",
        "actor.optimizer.lr=20.0", "train.batch_size=4"])
    config = attrs.evolve(config, adapters=[AdapterConfig(name="only", lora_rank=1, lora_alpha=1,
                                                          optimizer=config.actor.optimizer, batch_size=4,
                                                          gconfig=config.gconfig)])
    engine, server = StandInEngine(), StandInServer()
    engine.config = config
    registry = Registry(entry_points=[], extra_plugins=[("standin", StandInPlugin(engine, server))])
    (adapter, view), = adapter_views(config)
    registry.call("areal_inject_adapter", "standin", engine=engine, actor=view.actor, adapter_name="only")
    registry.call("areal_shard_model", "standin", engine=engine, actor=view.actor)
    publishers = {"only": AdapterPublisher(registry, "standin-server", server, "only", 0)}
    run_dir = RunDirectory(config.output_dir).create()
    loop = MultiAdapterLoop(config, registry, engine, Comm(), run_dir,
                            {"only": (CountingDataset(), first_token_is_five)}, publishers, progress=False)
    loop.run()
    assert [r["step"] for r in run_dir.read_metrics()] == [0, 1, 2, 3, 4]
    assert run_dir.read_metrics()[-1]["only"]["eval_accuracy"] == 1.0
    assert sorted(p.name for p in (run_dir.adapters / "only").iterdir()) == [f"v{v}" for v in range(5)]
    assert server.seen_names == [f"only-v{v}" for v in range(5)]
