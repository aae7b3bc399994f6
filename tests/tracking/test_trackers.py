"""Each tracker, written through ``Trackers`` and read back with its own library's reader."""

import glob
from pathlib import Path

import pytest

from areal_core.config import MlflowConfig, TrackingConfig, WandbConfig
from areal_core.config_loader import load_config
from areal_core.tracking import Trackers
from areal_core.validation import check_tracking
from tests.tracking import wandb_records

CONFIG = {"actor": {"lora_rank": 8}, "train": {"steps": 3}}


def records(steps):
    return [{"step": s, "reward_mean": 0.1 * s, "generation_seconds": 0.5, "mismatch_kl": 1e-3 * s,
             "rollout_versions": [s - 1], "published": True} for s in steps]


def run(tmp_path, config, steps=(1, 2, 3), resume=False):
    warnings = []
    trackers = Trackers(config, tmp_path, CONFIG, resume, warnings.append)
    for record in records(steps):
        trackers.log(record)
    trackers.close()
    return warnings


def tensorboard_scalars(log_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def test_tensorboard_event_files_hold_every_step(tmp_path):
    assert run(tmp_path, TrackingConfig(tensorboard=True)) == []
    steps, values = zip(*tensorboard_scalars(tmp_path / "tensorboard", "reward/mean"))
    assert steps == (1, 2, 3) and values == pytest.approx((0.1, 0.2, 0.3))  # stored as float32
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard", "timing/generation")] == [1, 2, 3]


def test_a_resumed_run_hides_the_steps_after_its_checkpoint(tmp_path):
    run(tmp_path, TrackingConfig(tensorboard=True), steps=(1, 2, 3))
    run(tmp_path, TrackingConfig(tensorboard=True), steps=(3, 4), resume=True)  # resumed from step 2
    assert [s for s, _ in tensorboard_scalars(tmp_path / "tensorboard", "reward/mean")] == [1, 2, 3, 4]


def test_wandb_offline_run_holds_history_and_config(tmp_path):
    assert run(tmp_path, TrackingConfig(wandb=WandbConfig(mode="offline", project="p", name="n"))) == []
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_records.history(Path(run_file))
    assert [row["_step"] for row in history] == [1, 2, 3]
    assert [row["reward/mean"] for row in history] == pytest.approx([0.1, 0.2, 0.3])
    assert history[0]["mismatch/kl"] == pytest.approx(1e-3)
    config = wandb_records.config(Path(run_file))
    assert config["actor"] == {"lora_rank": 8} and config["train"] == {"steps": 3}


def test_mlflow_local_store_holds_history_and_config(tmp_path):
    from mlflow.tracking import MlflowClient

    assert run(tmp_path, TrackingConfig(mlflow=MlflowConfig(experiment_name="e"))) == []
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert found.info.run_name == tmp_path.name
    history = client.get_metric_history(found.info.run_id, "reward/mean")
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx([0.1, 0.2, 0.3])
    assert [a.path for a in client.list_artifacts(found.info.run_id)] == ["config.yaml"]
    assert Path(client.download_artifacts(found.info.run_id, "config.yaml", str(tmp_path))).read_text().count(
        "lora_rank: 8") == 1
    assert (tmp_path / "mlartifacts").is_dir()  # everything under output_dir


def test_a_resumed_run_continues_its_mlflow_run(tmp_path):
    from mlflow.tracking import MlflowClient

    run(tmp_path, TrackingConfig(mlflow=MlflowConfig()), steps=(1, 2))
    run(tmp_path, TrackingConfig(mlflow=MlflowConfig()), steps=(3,), resume=True)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    (found,) = client.search_runs([client.get_experiment_by_name("areal").experiment_id])
    assert [m.step for m in client.get_metric_history(found.info.run_id, "reward/mean")] == [1, 2, 3]


class Failing:
    name = "tensorboard"

    def __init__(self):
        self.calls = 0

    def log(self, metrics, step):
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self):
        raise OSError(28, "No space left on device")


def test_a_failing_tracker_warns_once_and_never_raises(tmp_path):
    warnings = []
    trackers = Trackers(TrackingConfig(tensorboard=True), tmp_path, CONFIG, False, warnings.append)
    failing = Failing()
    trackers.open = [failing]
    for record in records((1, 2, 3)):
        trackers.log(record)
    trackers.close()
    assert failing.calls == 3  # a transient failure (a full disk freed) does not end tracking
    assert len(warnings) == 1 and "tensorboard" in warnings[0] and "No space left" in warnings[0]


def test_a_tracker_that_cannot_open_is_skipped(tmp_path):
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the event directory should be")
    warnings = run(tmp_path, TrackingConfig(tensorboard=True, tensorboard_dir=str(blocker / "tb"),
                                            mlflow=MlflowConfig()))
    assert len(warnings) == 1 and "tensorboard failed to open" in warnings[0]
    assert (tmp_path / "mlflow.db").is_file()  # the others still track


def test_check_names_the_extra_of_a_missing_package(monkeypatch):
    import areal_core.tracking as tracking

    real = tracking.importlib.util.find_spec
    monkeypatch.setattr(tracking.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    config, errors = load_config(None, ["tracking.wandb.mode=offline", "tracking.tensorboard=true"])
    assert not errors
    (error,) = check_tracking(config)
    assert error.key == "tracking.wandb" and "areal-core[wandb]" in error.fix


def test_online_wandb_needs_the_users_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    config, _ = load_config(None, ["tracking.wandb.mode=online"])
    (error,) = check_tracking(config)
    assert "WANDB_API_KEY" in error.problem
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert check_tracking(config) == []


def test_an_unknown_wandb_mode_is_refused():
    config, _ = load_config(None, ["tracking.wandb.mode=shared"])
    assert [e.key for e in check_tracking(config)] == ["tracking.wandb.mode"]


def test_no_tracking_section_opens_nothing(tmp_path):
    assert run(tmp_path, TrackingConfig()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == []
