"""The math reward's grading bounds: a grader that hangs past its deadline, raises or dies
scores 0, is counted in the reward's metrics and is replaced; nothing stops, and the next
completion is graded by a fresh process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from areal_core.tasks import TaskResolutionError, get_reward, reward_metrics
from areal_core.tasks.data_files import TaskDataError
from areal_core.tasks.math import MathReward

GRADER = "tests.tasks.math_graders:misbehaving"
NO_COUNTS = {"reward_grader_timeouts": 0, "reward_grader_errors": 0}


@pytest.fixture
def reward():
    """A reward object of its own (counts and grading processes not shared with other tests)."""
    reward = MathReward()
    yield reward
    reward.close()


@pytest.fixture(scope="module")
def tokenizer(text_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(text_tokenizer_dir)


def grade(reward, tokenizer, tokenizer_dir, text, **options):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return reward({"answer": "ok", "tokenizer_path": tokenizer_dir}, ids, grader=GRADER, **options)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_hanging_grader_is_killed_at_its_deadline_and_replaced(reward, tokenizer, text_tokenizer_dir):
    pid = int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))
    assert grade(reward, tokenizer, text_tokenizer_dir, "hang", timeout_seconds=1.0) == 0.0
    assert not alive(pid)  # the process that overran is gone (killed and reaped), not left running
    assert reward.drain_metrics() == {"reward_grader_timeouts": 1, "reward_grader_errors": 0}
    assert reward.drain_metrics() == NO_COUNTS  # drained: counts since the previous call
    new_pid = int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))
    assert new_pid != pid and alive(new_pid)
    assert grade(reward, tokenizer, text_tokenizer_dir, "ok") == 1.0


def test_a_raising_grader_scores_0_and_is_counted(reward, tokenizer, text_tokenizer_dir):
    pid = int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))
    assert grade(reward, tokenizer, text_tokenizer_dir, "raise") == 0.0
    assert grade(reward, tokenizer, text_tokenizer_dir, "raise") == 0.0
    assert reward.drain_metrics() == {"reward_grader_timeouts": 0, "reward_grader_errors": 2}
    # an exception costs the answer only: the same process grades on
    assert int(grade(reward, tokenizer, text_tokenizer_dir, "pid")) == pid
    assert grade(reward, tokenizer, text_tokenizer_dir, "ok") == 1.0


def test_a_grading_process_that_dies_is_counted_and_replaced(reward, tokenizer, text_tokenizer_dir):
    pid = int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))
    assert grade(reward, tokenizer, text_tokenizer_dir, "crash") == 0.0
    assert reward.drain_metrics() == {"reward_grader_timeouts": 0, "reward_grader_errors": 1}
    assert int(grade(reward, tokenizer, text_tokenizer_dir, "pid")) != pid
    assert grade(reward, tokenizer, text_tokenizer_dir, "ok") == 1.0


def test_callers_on_several_threads_share_the_processes(reward, tokenizer, text_tokenizer_dir):
    """The rollout thread and an evaluation on the main thread may grade at once: a hang on one
    costs that one answer; the other thread's completions are graded right."""
    scores: dict[str, list[float]] = {"hang": [], "ok": []}

    def grade_all(text, count):
        for _ in range(count):
            scores[text].append(grade(reward, tokenizer, text_tokenizer_dir, text, timeout_seconds=1.0,
                                      grader_processes=2))

    threads = [threading.Thread(target=grade_all, args=("hang", 1)),
               threading.Thread(target=grade_all, args=("ok", 5))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert scores == {"hang": [0.0], "ok": [1.0] * 5}
    assert reward.drain_metrics() == {"reward_grader_timeouts": 1, "reward_grader_errors": 0}


def test_the_loop_reads_the_counts_through_get_reward(text_tokenizer_dir, tokenizer):
    """``get_reward`` binds the options (a functools.partial); ``reward_metrics`` still reaches
    the reward's counts, as the rollout producer does once per batch."""
    bound = get_reward("math", {"grader": GRADER, "timeout_seconds": 1.0})
    reward_metrics(bound)  # whatever other tests of the session left on the shared reward
    ids = tokenizer("raise", add_special_tokens=False)["input_ids"]
    assert bound({"answer": "ok", "tokenizer_path": text_tokenizer_dir}, ids) == 0.0
    assert reward_metrics(bound) == {"reward_grader_timeouts": 0, "reward_grader_errors": 1}


@pytest.mark.parametrize("options, error, message", [
    ({"mode": "latex"}, TaskDataError, "mode must be one of boxed, plain"),
    ({"timeout_seconds": 0}, TaskDataError, "timeout_seconds must be a number of seconds > 0"),
    ({"grader_processes": 0}, TaskDataError, "grader_processes must be an integer >= 1"),
    ({"grader": "tests.tasks.math_graders:nowhere"}, TaskResolutionError, "has no attribute 'nowhere'"),
    ({"grader": "tests.tasks.math_graders:NOT_CALLABLE"}, TaskResolutionError, "is a int, not a function"),
    ({"grader": "no_such_package.graders:grade"}, TaskResolutionError, "cannot import module 'no_such_package.graders'"),
    ({"timeout": 5}, TaskResolutionError, "its options are: mode, tokenizer_path, timeout_seconds, grader"),
])
def test_bad_reward_options_are_refused_when_the_reward_is_built(options, error, message):
    with pytest.raises(error, match=message):
        get_reward("math", options)


CALLER = """
import os, sys, threading, time
from areal_core.tasks.math import MathReward
from transformers import AutoTokenizer
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
reward = MathReward()
def grade(text, **options):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return reward({"answer": "ok", "tokenizer_path": sys.argv[1]}, ids, grader=sys.argv[2], **options)
print(int(grade("pid")), flush=True)
threading.Thread(target=grade, args=("hang",), kwargs={"timeout_seconds": 3600.0}, daemon=True).start()
time.sleep(1.0)
os._exit(0)  # as a rank leaves: no atexit handler runs
"""


def test_a_hung_grading_process_dies_with_its_caller(text_tokenizer_dir, tmp_path):
    import subprocess
    import sys
    import time

    script = tmp_path / "caller.py"
    script.write_text(CALLER)
    repo = str(Path(__file__).resolve().parents[2])  # where tests.tasks.math_graders imports from
    result = subprocess.run([sys.executable, str(script), text_tokenizer_dir, GRADER], capture_output=True,
                            text=True, timeout=300, cwd=repo, env={**os.environ, "PYTHONPATH": repo})
    assert result.returncode == 0, result.stderr
    pid = int(result.stdout.split()[0])
    for _ in range(300):  # the kernel kills it as its parent dies; allow a loaded machine its time
        if not alive(pid) or _is_zombie(pid):
            return
        time.sleep(0.1)
    os.kill(pid, 9)
    pytest.fail(f"grading process {pid} outlived its caller")


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_process_started_by_a_thread_that_ended_still_grades(reward, tokenizer, text_tokenizer_dir):
    # PR_SET_PDEATHSIG fires when the thread that started a grading process ends: the processes
    # must not be started by the caller's thread (CI: a hang graded by a process the other,
    # finished, thread had started was reported as "died" instead of as a timeout).
    pids = []
    first = threading.Thread(target=lambda: pids.append(int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))))
    first.start()
    first.join()
    assert grade(reward, tokenizer, text_tokenizer_dir, "hang", timeout_seconds=1.0) == 0.0
    assert reward.drain_metrics() == {"reward_grader_timeouts": 1, "reward_grader_errors": 0}
    assert alive(int(grade(reward, tokenizer, text_tokenizer_dir, "pid"))) and pids
