"""A managed SGLang server SIGKILLed during a real `areal train` run (2 FSDP2 ranks over gloo):
detected, restarted, the newest adapter loaded under a new name, rollouts resumed, the run done."""

import os
import signal

import pytest

from .train_process import TrainRun, is_alive, listening_addresses

pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]

SGLANG_SERVER = "sglang.launch_server"


def test_a_killed_sglang_server_is_restarted_and_the_run_completes(vllm_model, tmp_path):
    from areal_core.errors import ArealError
    from areal_sglang.launcher import find_server_python

    try:
        find_server_python()
    except ArealError as exc:
        pytest.fail(f"this test needs the SGLang server venv: {exc}")
    # 8 steps: the kill lands up to ~1 s after step 1 (0.5 s polls) and a step can take 0.2 s,
    # so steps must remain for rollouts to come from the recovered version.
    run = TrainRun(vllm_model, tmp_path / "run", [
        "rollout.backend=sglang", "actor.world_size=2", "train.steps=8", "train.batch_size=4",
        "gconfig.n_samples=4", "train.eval_every=0", "train.eval_size=8", "gconfig.lora_name=sgl",
        "rollout.max_num_seqs=16", "train.checkpoint_every=2", "train.collective_timeout=60"]).start()
    run.wait_for_step(1, 900)
    first = run.server_pids(SGLANG_SERVER)
    assert len(first) == 1, first
    argv = open(f"/proc/{first[0]}/cmdline").read().split("\0")
    port = int(argv[argv.index("--port") + 1])
    assert listening_addresses(port) == {"127.0.0.1"}  # loopback only, as configured by default
    os.kill(first[0], signal.SIGKILL)
    code = run.wait(900)
    assert code == 0, run.output()[-4000:]
    run.wait_until_no_process_left(60)

    events = run.events()
    recovered = [e for e in events if e["event"] == "server_recovered"]
    assert len(recovered) == 1 and recovered[0]["restarted"], [e for e in events if e["event"] != "generate"]
    loads = [e["name"] for e in events if e["event"] == "load"]
    assert len(loads) == len(set(loads)) and recovered[0]["name"] in loads
    assert not is_alive(first[0])
    records = [r for r in run.metrics() if r["step"] > 0]
    assert [r["step"] for r in records] == list(range(1, 9))
    assert all(r["num_samples"] == 16 for r in records)
    assert any(r["rollout_versions"] == [recovered[0]["version"]] for r in records)
    versions = [r["version"] for r in run.metrics()]
    assert versions == sorted(set(versions))
    assert "the rollout server is back after" in run.output()
