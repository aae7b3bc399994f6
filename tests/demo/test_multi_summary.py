"""`make demo-multi`'s last step: one line per adapter, and a failure when any misses the goal."""

import json
from pathlib import Path

import pytest

from areal_core.demo.multi_summary import main


def run_dir(tmp_path, evals_by_adapter, steps=(0, 10, 20)):
    lines = []
    for i, step in enumerate(steps):
        record = {"step": step}
        for name, evals in evals_by_adapter.items():
            figures = {"reward_mean": 0.5}
            if i < len(evals) and evals[i] is not None:
                figures["eval_accuracy"] = evals[i]
            record[name] = figures
        lines.append(json.dumps(record) + "\n")
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    return str(tmp_path)


@pytest.mark.parametrize("evals,code,missed", [
    ({"add": [0.37, 0.8, 0.97], "sub": [0.45, None, 0.95]}, 0, None),
    ({"add": [0.37, 0.8, 0.97], "sub": [0.45, 0.7, 0.89]}, 1, "sub"),   # short of 0.90
    ({"add": [0.65, 0.9, 0.93], "sub": [0.45, 0.7, 0.95]}, 1, "add"),   # only +28 points
])
def test_each_adapter_gets_a_line_and_decides_the_exit_status(tmp_path, capsys, evals, code, missed):
    assert main([run_dir(tmp_path, evals)]) == code
    out = capsys.readouterr()
    for name, figures in evals.items():
        assert f"demo: {name} eval_accuracy {figures[0]:.3f} -> {figures[-1]:.3f}" in out.out
    assert ("goal met by every adapter" in out.out) == (code == 0)
    assert (f"goal MISSED by {missed}" in out.err) if missed else not out.err


def test_an_adapter_of_the_config_missing_from_the_run_fails(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("adapters:\n  - name: add\n  - name: sub\n")
    directory = tmp_path / "run"
    directory.mkdir()
    run_dir(directory, {"add": [0.37, 0.8, 0.97]})
    assert main([str(directory), "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "sub has 0 evaluation(s)" in err and "goal MISSED by sub" in err
    assert main([str(directory)]) == 0  # without the config: the adapters the run holds


def test_a_run_without_evaluations_fails(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval_accuracy": 0.4}) + "\n")
    assert main([str(tmp_path)]) == 1
    assert "holds no adapter's evaluation" in capsys.readouterr().err


def test_the_example_config_names_its_adapters():
    from areal_core.demo.multi_summary import config_adapter_names

    example = Path(__file__).resolve().parents[2] / "examples" / "multi_task_grpo_lora.yaml"
    assert config_adapter_names(str(example)) == ["add", "sub"]
