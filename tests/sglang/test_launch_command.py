"""The command line and environment of a launched SGLang server, derived from the configuration (no server)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig
from areal_core.versions import live_versions_needed
from areal_sglang import cpu_server
from areal_sglang.launcher import kv_bytes_per_token, server_command, server_environment
from areal_sglang.server import launch_spec


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def run_config(model_dir, **overrides) -> RunConfig:
    actor = dict(path=str(model_dir), lora_rank=16, device="cpu")
    actor.update(overrides.pop("actor", {}))
    return RunConfig(actor=ActorConfig(**actor), rollout=RolloutConfig(backend="sglang", **overrides))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """Only config.json is read to derive the flags."""
    directory = tmp_path_factory.mktemp("config-only")
    (directory / "config.json").write_text(
        '{"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 64, "num_hidden_layers": 2}'
    )
    return directory


def test_lora_flags_follow_the_configuration(model_dir):
    spec = launch_spec(run_config(model_dir, max_head_offpolicyness=3, actor={"target_modules": ["q_proj", "v_proj"]}),
                       port=4321)
    command = server_command(spec, "python")
    assert command[:3] == ["python", "-m", "sglang.launch_server"]
    assert "--enable-lora" in command
    assert int(flag(command, "--max-lora-rank")) >= 16
    assert int(flag(command, "--max-loaded-loras")) >= live_versions_needed(3) == 5
    assert int(flag(command, "--max-loras-per-batch")) <= int(flag(command, "--max-loaded-loras"))
    targets = command[command.index("--lora-target-modules") + 1:command.index("--max-loaded-loras")]
    assert targets == ["q_proj", "v_proj"]
    assert flag(command, "--host") == "127.0.0.1" and flag(command, "--port") == "4321"


def test_all_linear_is_sglangs_all_and_max_loras_raises_the_resident_adapters(model_dir):
    command = server_command(launch_spec(run_config(model_dir, max_loras=9), port=1), "python")
    assert flag(command, "--lora-target-modules") == "all"
    assert flag(command, "--max-loaded-loras") == "9"


def test_inputs_of_max_model_len_tokens_fit_sglangs_context(model_dir, tmp_path):
    # SGLang accepts inputs shorter than --context-length - 6 tokens; vLLM up to max_model_len.
    assert launch_spec(run_config(model_dir, max_model_len=64), port=1).context_length == 71
    capped = tmp_path / "capped"
    capped.mkdir()
    (capped / "config.json").write_text((model_dir / "config.json").read_text()[:-1] + ', "max_position_embeddings": 66}')
    assert launch_spec(run_config(capped, max_model_len=64), port=1).context_length == 66


def test_kv_cache_bytes_become_tokens(model_dir):
    assert kv_bytes_per_token(model_dir, "float32") == 2 * 2 * 2 * 16 * 4
    spec = launch_spec(run_config(model_dir, kv_cache_bytes=512 * 1000, max_model_len=256), port=1)
    assert spec.max_total_tokens == 1000
    small = launch_spec(run_config(model_dir, kv_cache_bytes=512, max_model_len=256), port=1)
    assert small.max_total_tokens == small.context_length == 263  # never below one full context


def test_cpu_mode_adds_the_cpu_engine_flags_and_the_workarounds_path_only_to_the_server(model_dir):
    spec = launch_spec(run_config(model_dir), port=1)
    command = server_command(spec, "python")
    assert flag(command, "--device") == "cpu" and flag(command, "--attention-backend") == "torch_native"
    assert flag(command, "--lora-backend") == "torch_native" and "--sleep-on-idle" in command
    env = server_environment(spec, base={"PYTHONPATH": "/elsewhere"})
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep) == [cpu_server.PATH, "/elsewhere"]
    assert {"sgl_kernel", "sitecustomize.py"} <= set(os.listdir(cpu_server.PATH))


def test_gpu_mode_has_neither_cpu_flags_nor_workarounds(model_dir):
    spec = launch_spec(run_config(model_dir, actor={"device": "cuda"}), port=1)
    command = server_command(spec, "python")
    assert "--device" not in command and "torch_native" not in command
    env = server_environment(spec, base={})
    assert "SGLANG_USE_CPU_ENGINE" not in env and "PYTHONPATH" not in env


def test_extra_args_come_last_so_they_win(model_dir):
    command = server_command(launch_spec(run_config(model_dir, extra_args=["--log-level", "debug"]), port=1), "py")
    assert command[-2:] == ["--log-level", "debug"]


def test_the_client_imports_neither_sglang_nor_the_workarounds():
    probe = (
        "import sys, areal_sglang.plugin, areal_sglang.server\n"
        "from areal_core.registry import Registry\n"
        "Registry().build_rollout_server('sglang', __import__('areal_core.config', fromlist=['RunConfig']).RunConfig())\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('sglang', 'sgl_kernel', 'sitecustomize', 'torch')]\n"
        "from areal_sglang import cpu_server\n"
        "assert cpu_server.PATH not in sys.path, sys.path\n"
        "print(bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
