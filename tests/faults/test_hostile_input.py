"""Hostile or wrong input to `areal train`: refused before anything heavy, with what is wrong and
the fix; launched servers on loopback; API keys only in the environment.

Single-value rules (types, ranges, regex target modules, model directory, trust_remote_code) are
tested one by one in tests/core/test_config.py; here `areal train` itself is held to them.
"""

import json
import subprocess
import sys
from pathlib import Path

import attrs
import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig
from areal_core.config_loader import config_to_dict

from .train_process import listening_addresses

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "arithmetic_grpo_lora.yaml"


def areal_train(*overrides, timeout=120):
    return subprocess.run([sys.executable, "-m", "areal_core.cli", "train", str(CONFIG), *overrides],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_areal_train_reports_every_problem_and_starts_nothing(tmp_path):
    out = tmp_path / "run"
    result = areal_train("actor.lora_rnak=8", "actor.target_modules=[q_.*]", "actor.lora_alpha=ten",
                         f"actor.path={tmp_path / 'no-such-model'}", "rollout.max_restarts=-1",
                         "train.collective_timeout=0", f"output_dir={out}")
    assert result.returncode == 1
    err = result.stderr
    assert "nothing was started" in err
    assert "actor.lora_rnak: unknown key" in err and "did you mean 'actor.lora_rank'" in err
    assert "actor.lora_alpha: expected float" in err
    assert "regexes and dotted paths are not accepted" in err
    assert "model directory does not exist" in err
    assert "rollout.max_restarts: must be >= 0" in err and "train.collective_timeout: must be > 0" in err
    assert not out.exists()  # no run directory, so no launcher, rank or server ever ran


def test_a_model_with_pickled_weights_or_remote_code_is_refused_by_areal_train(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "qwen2", "auto_map": {"AutoModel": "x.Y"}}))
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    result = areal_train(f"actor.path={model}", f"output_dir={tmp_path / 'run'}")
    assert result.returncode == 1
    assert "holds no *.safetensors (found pickled pytorch_model.bin)" in result.stderr
    assert "needs its own code" in result.stderr and "trust_remote_code=true" in result.stderr
    assert not (tmp_path / "run").exists()


def test_launched_servers_bind_loopback_unless_configured_otherwise(tiny_qwen2):
    from areal_sglang.launcher import server_command as sglang_command
    from areal_sglang.server import launch_spec
    from areal_vllm.launcher import server_command as vllm_command

    def host_flag(argv):
        return argv[argv.index("--host") + 1]

    default = RunConfig(actor=ActorConfig(path=str(tiny_qwen2)))
    configured = attrs.evolve(default, rollout=attrs.evolve(default.rollout, host="0.0.0.0"))
    assert default.rollout.host == "127.0.0.1"
    for config, host in ((default, "127.0.0.1"), (configured, "0.0.0.0")):
        assert host_flag(vllm_command(config, 8000)) == host
        assert host_flag(sglang_command(launch_spec(config, 8000), "python")) == host


def test_an_api_key_travels_in_the_environment_only(monkeypatch):
    from areal_vllm.launcher import API_KEY_ENV, server_command, server_env

    monkeypatch.setenv("MY_VLLM_KEY", "sk-very-secret")
    config = RunConfig(rollout=RolloutConfig(api_key_env="MY_VLLM_KEY"))
    assert "sk-very-secret" not in " ".join(server_command(config, 8000))  # not in `ps`, not in the log
    assert server_env(config)[API_KEY_ENV] == "sk-very-secret"
    written = json.dumps(config_to_dict(config))  # what config.yaml in the run directory holds
    assert "MY_VLLM_KEY" in written and "sk-very-secret" not in written


@pytest.mark.server
def test_a_launched_vllm_server_listens_on_loopback_only(vllm_server):
    addresses = listening_addresses(vllm_server.launched.port)
    assert addresses == {"127.0.0.1"}, addresses
