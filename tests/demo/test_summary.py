"""`make demo`'s last step says whether the goal was met, and fails when it was not."""

import json

import pytest

from areal_core.demo.summary import main


def run_dir(tmp_path, evals):
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": i, "eval_accuracy": e}) + "\n" for i, e in enumerate(evals)))
    return str(tmp_path)


@pytest.mark.parametrize("evals,code", [
    ([0.37, 0.96], 0),
    ([0.37, 0.89], 1),  # +52 points, but short of 0.90
    ([0.65, 0.93], 1),  # at 0.93, but only +28 points
])
def test_goal_decides_the_exit_status(tmp_path, capsys, evals, code):
    assert main([run_dir(tmp_path, evals)]) == code
    out = capsys.readouterr()
    assert f"eval_accuracy {evals[0]:.3f} -> {evals[-1]:.3f}" in out.out
    assert ("goal met" in out.out) == (code == 0) and ("goal MISSED" in out.err) == (code == 1)
