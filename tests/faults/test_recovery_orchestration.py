"""The loop's server-loss handling, branch by branch, against in-process stand-ins (fast).

What these cannot show, the real runs do (test_training_faults.py, test_sglang_server_restart.py):
here a "dead" server is a stand-in that refuses every call until it is started again.
"""

import json

import pytest

from areal_core.errors import AdapterError, ServerUnreachableError
from areal_core.grpo.server_recovery import ServerLostError

from grpo.standins import StandInServer
from grpo.test_loop_orchestration import make_loop


class DyingServer(StandInServer):
    """Dies (every call refused, adapters gone) at the calls listed in ``die_at``:
    ``("generate", 3)`` is the third generate call. ``start()`` brings it back empty, unless
    ``comes_back_after`` probes are asked first (a server given by address coming back by itself).
    """

    def __init__(self, die_at=(), comes_back_after=None):
        super().__init__()
        self.die_at = set(die_at)
        self.calls = {}
        self.dead = False
        self.starts = 0
        self.comes_back_after = comes_back_after
        self.probes_while_dead = 0

    def _call(self, what):
        self.calls[what] = self.calls.get(what, 0) + 1
        if (what, self.calls[what]) in self.die_at:
            self.dead = True
            self.adapters = {}
        if self.dead:
            raise ServerUnreachableError(f"stand-in server is dead ({what})")

    def start(self):
        super().start()
        self.starts += 1
        self.dead = False

    def load_adapter(self, adapter, lora_name):
        self._call("load")
        super().load_adapter(adapter, lora_name)

    def generate(self, prompts, **kwargs):
        self._call("generate")
        return super().generate(prompts, **kwargs)

    def prompt_logprobs(self, token_ids, *, lora_name):
        self._call("prompt_logprobs")
        return super().prompt_logprobs(token_ids, lora_name=lora_name)

    def loaded_adapters(self):
        if self.dead:
            self.probes_while_dead += 1
            if self.comes_back_after is not None and self.probes_while_dead > self.comes_back_after:
                self.dead = False  # back, with its adapters gone
        if self.dead:
            raise ServerUnreachableError("stand-in server is dead (list)")
        return super().loaded_adapters()


def events(run_dir):
    return [json.loads(line) for line in run_dir.events_path.read_text().splitlines()]


def steps(run_dir):
    return [r for r in run_dir.read_metrics() if r["step"] > 0]


@pytest.mark.parametrize("die_at", [("generate", 3), ("load", 3), ("prompt_logprobs", 2)],
                         ids=["during-rollouts", "during-a-load", "during-the-agreement-check"])
def test_a_managed_server_lost_anywhere_is_restarted_and_the_run_completes(tmp_path, die_at):
    server = DyingServer(die_at=[die_at])
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, **{"train.steps": 6, "train.eval_every": 0})
    summary = loop.run()
    assert server.starts == 1  # restarted once (the first start is the worker's, not made here)
    recovered = [e for e in events(run_dir) if e["event"] == "server_recovered"]
    assert len(recovered) == 1 and recovered[0]["restarted"]
    records = steps(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["num_samples"] == 4 * 8 for r in records)  # whole batches only
    versions = [r["version"] for r in records]
    assert versions == sorted(set(versions)) and summary["version"] == versions[-1]
    assert len(server.seen_names) == len(set(server.seen_names))  # a name is never loaded twice
    assert any(r["rollout_versions"] == [recovered[0]["version"]] for r in records)
    assert records[-1]["server_recoveries"] == 1


def test_the_batch_in_the_making_is_generated_again_in_full_by_the_new_version(tmp_path):
    server = DyingServer(die_at=[("generate", 3)])  # the rollouts of step 2 (eval_every=0: 1 is v0's)
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, **{"train.steps": 3, "train.eval_every": 0})
    loop.run()
    recovered = [e for e in events(run_dir) if e["event"] == "server_recovered"][0]
    second = steps(run_dir)[1]
    assert second["rollout_versions"] == [recovered["version"]] and second["num_samples"] == 32
    assert recovered["source_version"] == 1 and recovered["version"] == 2
    assert second["data_position"] == 8  # the same prompts, drawn once


def test_recoveries_are_bounded_by_max_restarts(tmp_path):
    server = DyingServer(die_at=[("generate", 2), ("generate", 4)])
    loop, *_ = make_loop(tmp_path, server=server, **{"train.steps": 6, "train.eval_every": 0,
                                                    "rollout.max_restarts": 1})
    with pytest.raises(ServerLostError, match=r"max_restarts=1 recoveries are used up.*resume=true"):
        loop.run()


def test_max_restarts_zero_stops_at_the_first_loss(tmp_path):
    server = DyingServer(die_at=[("generate", 2)])
    loop, *_ = make_loop(tmp_path, server=server, **{"rollout.max_restarts": 0})
    with pytest.raises(ServerLostError, match="used up"):
        loop.run()
    assert server.starts == 0


def test_a_server_given_by_address_is_waited_for_then_reported(tmp_path):
    server = DyingServer(die_at=[("generate", 2)])
    loop, *_ = make_loop(tmp_path, server=server, **{"rollout.servers": "[127.0.0.1:9]",
                                                    "rollout.startup_timeout": 2})
    with pytest.raises(ServerLostError, match=r"did not answer again within rollout.startup_timeout=2 s"):
        loop.run()
    assert server.starts == 0  # never restarted: it is not ours
    assert server.probes_while_dead >= 2  # probed again, with backoff, not once


def test_a_server_given_by_address_that_comes_back_gets_the_adapter_again(tmp_path):
    server = DyingServer(die_at=[("generate", 2)], comes_back_after=1)
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, **{
        "rollout.servers": "[127.0.0.1:9]", "rollout.startup_timeout": 30, "train.steps": 4, "train.eval_every": 0})
    loop.run()
    recovered = [e for e in events(run_dir) if e["event"] == "server_recovered"]
    assert len(recovered) == 1 and not recovered[0]["restarted"] and server.starts == 0
    assert [r["step"] for r in steps(run_dir)] == [1, 2, 3, 4]


def test_a_refused_adapter_is_not_a_server_loss(tmp_path):
    loop, engine, server, run_dir = make_loop(tmp_path, **{"train.steps": 3, "train.eval_every": 0})
    real_publish = loop.publisher.publish

    def publish(adapter):
        if adapter.version == 2:
            (run_dir.adapter_dir(2) / "adapter_model.safetensors").write_bytes(b"changed")
        return real_publish(adapter)

    loop.publisher.publish = publish
    with pytest.raises(AdapterError, match=r"adapter version 2 was refused before reaching the server "
                                           r"\(version 1 stays live\).*differs from its manifest"):
        loop.run()
    assert "lora-v2" not in server.seen_names and server.loaded_adapters() == ["lora-v1"]


def test_a_loss_while_generating_ahead_of_training_is_recovered_too(tmp_path):
    """With max_head_offpolicyness=1 the next batch is generated while a step trains."""
    from grpo.standins import StandInEngine

    server = DyingServer(die_at=[("generate", 4)])
    server.generate_delay = 0.05
    loop, engine, server, run_dir = make_loop(tmp_path, server=server, engine=StandInEngine(train_delay=0.1), **{
        "rollout.max_head_offpolicyness": 1, "train.steps": 6, "train.eval_every": 0})
    loop.run()
    records = steps(run_dir)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(r["num_samples"] == 32 for r in records)
    recovered = [e for e in events(run_dir) if e["event"] == "server_recovered"]
    assert len(recovered) == 1
    # staleness is still bounded by the window, counted in steps: the version a recovery loads
    # holds the weights of its source, the update of the same step
    update_of = {0: 0, **{r["version"]: r["step"] for r in records}}
    update_of.setdefault(recovered[0]["source_version"], update_of.get(recovered[0]["version"]))
    update_of.setdefault(recovered[0]["version"], update_of[recovered[0]["source_version"]])
    for r in records:
        assert all(r["step"] - 2 <= update_of[v] <= r["step"] - 1 for v in r["rollout_versions"]), r
