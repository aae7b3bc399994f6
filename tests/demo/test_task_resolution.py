"""Datasets and rewards by built-in name or import path, and the errors for bad ones."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from areal_core.tasks import TaskResolutionError, get_dataset, get_reward
from areal_core.tasks.arithmetic import ArithmeticDataset, answer_ids, make_record


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """An importable module of the user's with its own dataset factory and reward."""
    (tmp_path / "my_task.py").write_text(textwrap.dedent('''
        NOT_CALLABLE = 3

        class Tasks:
            @staticmethod
            def constant(prompt_record, completion_ids, value=0.5):
                return value

        def make_dataset(size, scale=1):
            return {"size": size, "scale": scale}

        def length_reward(prompt_record, completion_ids, per_token=1.0):
            return per_token * len(completion_ids)
    '''))
    (tmp_path / "broken_task.py").write_text("import a_module_that_does_not_exist\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("my_task", "broken_task"):
        sys.modules.pop(name, None)
    return "my_task"


def test_builtin_names_resolve():
    dataset = get_dataset("arithmetic", {"seed": 4})
    assert isinstance(dataset, ArithmeticDataset) and dataset.seed == 4
    reward = get_reward("arithmetic", {})
    assert reward(make_record(2, 3), answer_ids(5)) == 1.0
    assert get_reward("arithmetic", None)(make_record(2, 3), answer_ids(6)) == 0.0


def test_import_paths_resolve_and_bind_options(user_module):
    assert get_dataset("my_task:make_dataset", {"size": 3}) == {"size": 3, "scale": 1}
    assert get_reward("my_task:length_reward", {"per_token": 0.5})({}, [1, 2, 3, 4]) == 2.0
    assert get_reward("my_task:Tasks.constant")({}, []) == 0.5
    assert get_reward("areal_core.tasks.arithmetic:reward")(make_record(1, 1), answer_ids(2)) == 1.0


def test_unknown_name_lists_the_builtins():
    with pytest.raises(TaskResolutionError, match=r"unknown dataset 'no_such_task'; built-in datasets: (.*, )?arithmetic"):
        get_dataset("no_such_task", {})
    with pytest.raises(TaskResolutionError, match=r"unknown reward 'exact'; built-in rewards: (.*, )?arithmetic.*module:function"):
        get_reward("exact", {})
    with pytest.raises(TaskResolutionError, match="name is empty"):
        get_reward("", {})


@pytest.mark.parametrize(
    "path, message",
    [
        ("no_such_module_xyz:reward", r"cannot import module 'no_such_module_xyz'.*ModuleNotFoundError"),
        ("broken_task:reward", r"cannot import module 'broken_task'.*a_module_that_does_not_exist"),
        ("my_task:no_such_function", r"module 'my_task' has no attribute 'no_such_function'"),
        ("my_task:NOT_CALLABLE", r"is a int, not a function"),
        (":reward", r"malformed; write it as 'package.module:function'"),
        ("my_task:", r"malformed"),
    ],
)
def test_unimportable_paths_say_what_is_wrong(user_module, path, message):
    with pytest.raises(TaskResolutionError, match=message):
        get_reward(path, {})


def test_bad_options_are_refused_before_building(user_module):
    with pytest.raises(TaskResolutionError, match=r"dataset 'arithmetic' does not take options.*seed, split_seed, held_out"):
        get_dataset("arithmetic", {"sead": 1})
    with pytest.raises(TaskResolutionError, match=r"reward 'my_task:length_reward'.*options are: per_token"):
        get_reward("my_task:length_reward", {"scale": 2})
    with pytest.raises(TaskResolutionError, match=r"missing a required argument: 'size'"):
        get_dataset("my_task:make_dataset", {})
    with pytest.raises(TaskResolutionError, match="must be a mapping"):
        get_dataset("arithmetic", ["seed", 1])


def test_tasks_and_demo_modules_import_no_torch():
    code = (
        "import sys, areal_core.tasks, areal_core.tasks.arithmetic, areal_core.demo.base_model\n"
        "d = areal_core.tasks.get_dataset('arithmetic', {}); d.train_batch(0, 4); d.eval_records()\n"
        "areal_core.tasks.get_reward('arithmetic', {})\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
