"""The one table that names metrics.jsonl's keys in trackers (docs/tracking.md)."""

from areal_core.tracking.names import FALLBACK, scalars, tracker_name

#: Every key a run writes (tests/train/test_areal_train.py checks a real run's keys against it).
LOOP_KEYS = {
    "reward_mean": "reward/mean", "accuracy": "reward/accuracy", "eval_accuracy": "eval/accuracy",
    "eval_seconds": "timing/eval", "generation_seconds": "timing/generation", "train_seconds": "timing/train",
    "step_seconds": "timing/step", "rollout_wait_seconds": "timing/rollout_wait",
    "mismatch_kl": "mismatch/kl", "mismatch_max_abs": "mismatch/max_abs", "agreement_gap": "agreement/gap",
    "loss": "train/loss", "grad_norm": "train/grad_norm", "lr": "train/lr", "version": "progress/version",
    "generation_started_at": "clock/generation_started", "finished_at": "clock/finished",
}


def test_keys_are_grouped_by_phase():
    for key, name in LOOP_KEYS.items():
        assert tracker_name(key) == name, key


def test_unknown_keys_are_kept_under_other():
    assert tracker_name("my_plugin_figure") == FALLBACK + "my_plugin_figure"


def test_an_adapter_prefixes_its_figures():
    assert tracker_name("reward_mean", adapter="sub") == "sub/reward/mean"


def test_only_finite_scalars_are_sent():
    record = {"step": 3, "reward_mean": 0.5, "published": False, "num_samples": 16, "rollout_versions": [2],
              "grad_norm": None, "agreement": "ok", "kl": float("nan")}
    assert scalars(record) == {"reward/mean": 0.5, "progress/published": 0.0, "rollout/num_samples": 16.0}
