"""The plugin's entry point: declared ready, light to import, and the micro-batch planner."""

from __future__ import annotations

import subprocess
import sys

import pytest

from areal_core.declarations import PEFT_DIRECTORY, LoraStatus
from areal_core.registry import Registry
from areal_core.microbatching import plan_microbatches
from areal_fsdp2.microbatching import sequence_problem


def test_fsdp2_is_declared_ready_as_an_engine():
    registry = Registry()
    record = {p.name: p for p in registry.plugins()}["fsdp2"]
    assert record.status == "ok" and record.provides == ("fsdp2",)
    declaration = registry.declaration("fsdp2")
    assert declaration.kind == "engine" and declaration.lora.status is LoraStatus.READY
    assert declaration.lora.moe is False and declaration.lora.peft_types == ("lora",)
    assert declaration.lora.transports == (PEFT_DIRECTORY,)


def test_importing_the_plugin_and_validating_imports_no_torch(tmp_path):
    """`areal plugins`/`areal matrix`/`areal check` on known architectures stay torch-free."""
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (tmp_path / "model.safetensors").write_bytes(b"placeholder")
    code = (
        "import sys\n"
        "from areal_core.config import ActorConfig, RunConfig\n"
        "from areal_core.registry import Registry\n"
        "registry = Registry()\n"
        f"config = RunConfig(actor=ActorConfig(path={str(tmp_path)!r}))\n"
        "assert registry.call('areal_validate_config', 'fsdp2', config=config) == []\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft') if m in sys.modules)\n"
        "print(heavy)\n"
    )
    answer = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert answer.returncode == 0, answer.stderr
    assert answer.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("lengths, budget, expected", [
    ([], 10, []),
    ([4, 4, 4], 8, [[0, 1], [2]]),
    ([2, 6, 2], 12, [[0, 1], [2]]),  # padded to 6: [0,1] costs 12, adding 2 would cost 18
    ([3, 3, 3, 3], 100, [[0, 1, 2, 3]]),
    ([20, 2, 2], 8, [[0], [1, 2]]),  # too long for the budget: alone, not dropped or split
    ([2, 20], 8, [[0], [1]]),
])
def test_microbatches_respect_the_token_budget(lengths, budget, expected):
    plan = plan_microbatches(lengths, budget)
    assert plan == expected
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    for batch in plan:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= budget


def test_microbatch_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        plan_microbatches([3], 0)


@pytest.mark.parametrize("sequences, fragment", [
    ([[1, 2], [5]], "sequence 1 has 1 token(s)"),
    ([[1, 40]], "token 40, not an integer id in [0, 32)"),
    ([[1, -1]], "token -1"),
    ([[1, 2.0]], "token 2.0"),
    (["ab"], "sequence 0 is str"),
])
def test_unusable_sequences_are_named(sequences, fragment):
    assert fragment in sequence_problem(sequences, 32)


def test_usable_sequences_pass():
    assert sequence_problem([[1, 2], (0, 31, 5)], 32) is None
