"""Fixtures of the megatron tests: tiny GQA models and one multi-process launch per layout.

Each launch runs every multi-process case of one parallel layout in a single set of processes
(``megatron_worker.py``), writing JSON and tensors that the tests then check, so the folder
pays the start-up of megatron-core once per layout, not once per test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("megatron_worker.py")
LAUNCH_TIMEOUT = 600
SUBSET = ["q_proj", "v_proj", "gate_proj", "down_proj"]  # fused layers only partly targeted


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def chosen_device() -> str:
    """``AREAL_TEST_DEVICE`` (cpu or cuda), else cuda where a GPU is present, else cpu."""
    chosen = os.environ.get("AREAL_TEST_DEVICE")
    if chosen:
        return chosen
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def launch(world_size: int, tp: int, cases: list[dict], models: dict, out: Path) -> dict:
    """Run ``cases`` on ``world_size`` worker processes; return {case name: rank 0's result}.

    Fails the test with the workers' output when a process fails or the launch times out.
    """
    device = chosen_device()
    if device == "cuda":
        import torch

        if torch.cuda.device_count() < world_size:
            pytest.skip(f"{world_size} ranks on CUDA need {world_size} GPUs, this machine has "
                        f"{torch.cuda.device_count()}")
    out.mkdir(parents=True, exist_ok=True)
    plan = out / "plan.json"
    plan.write_text(json.dumps({"out": str(out), "tp": tp, "models": models, "cases": cases}))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
               WORLD_SIZE=str(world_size), OMP_NUM_THREADS="1", AREAL_TEST_DEVICE=device)
    if device == "cpu":
        env["AREAL_MEGATRON_CPU_MODE"] = "1"  # the plugin's documented workaround for no GPU
    else:
        env.pop("AREAL_MEGATRON_CPU_MODE", None)
    procs = []
    for rank in range(world_size):
        log = open(out / f"rank{rank}.log", "w")
        procs.append((subprocess.Popen([sys.executable, str(WORKER), str(plan)], stdout=log,
                                       stderr=subprocess.STDOUT,
                                       env=dict(env, RANK=str(rank), LOCAL_RANK=str(rank))), log))
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    failed = False
    while any(p.poll() is None for p, _ in procs):
        if time.monotonic() > deadline or any(p.poll() not in (None, 0) for p, _ in procs):
            failed = True
            break
        time.sleep(0.2)
    for proc, log in procs:
        if proc.poll() is None:  # a rank failed or time ran out: the rest wait in a collective
            proc.kill()
            proc.wait()
        log.close()
    if failed or any(p.returncode for p, _ in procs):
        logs = "\n".join(f"--- rank {r} ---\n" + (out / f"rank{r}.log").read_text()[-4000:]
                         for r in range(world_size))
        pytest.fail(f"megatron launch (world {world_size}, TP {tp}) failed:\n{logs}")
    return json.loads((out / "rank0.json").read_text())


@pytest.fixture(scope="session")
def megatron_models(tmp_path_factory):
    """Tiny GQA models (4 heads, 2 kv heads): Qwen2 with non-zero q/k/v biases (tied), Llama (untied)."""
    import torch
    from safetensors.torch import load_file, save_file

    from areal_core.testing.tiny_models import build_tiny_model

    root = tmp_path_factory.mktemp("megatron-models")
    qwen2 = build_tiny_model(root / "qwen2", arch="qwen2", num_heads=4, num_kv_heads=2, seed=3)
    weights = qwen2 / "model.safetensors"
    state = load_file(str(weights))
    generator = torch.Generator().manual_seed(5)
    for name, tensor in state.items():
        if name.endswith("_proj.bias"):  # zero at init: make the bias mapping matter
            state[name] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(state, str(weights), metadata={"format": "pt"})
    llama = build_tiny_model(root / "llama", arch="llama", num_heads=4, num_kv_heads=2,
                             tie_word_embeddings=False, seed=4)
    return {"qwen2": str(qwen2), "llama": str(llama)}


def _cases(*, conversion: bool, checkpoint_arch: str | None, misuse: bool) -> list[dict]:
    cases = []
    if conversion:
        cases += [{"name": f"conversion_{a}", "kind": "conversion", "args": {"arch": a}}
                  for a in ("qwen2", "llama")]
    cases += [
        {"name": "train_qwen2_all_linear", "kind": "train_export",
         "args": {"arch": "qwen2", "targets": ["all-linear"]}},
        {"name": "train_llama_subset", "kind": "train_export", "args": {"arch": "llama", "targets": SUBSET}},
    ]
    if checkpoint_arch:
        cases.append({"name": "checkpoint", "kind": "checkpoint", "args": {"arch": checkpoint_arch}})
        cases.append({"name": "non_finite", "kind": "non_finite", "args": {"arch": checkpoint_arch}})
    if misuse:
        cases.append({"name": "misuse", "kind": "misuse", "args": {"arch": "qwen2"}})
    return cases


@pytest.fixture(scope="session")
def run_tp1(megatron_models, tmp_path_factory):
    """One process, TP=1: the engine creates its own process group."""
    out = tmp_path_factory.mktemp("megatron-tp1")
    results = launch(1, 1, _cases(conversion=True, checkpoint_arch="qwen2", misuse=True), megatron_models, out)
    return {"results": results, "out": out}


@pytest.fixture(scope="session")
def run_tp2(megatron_models, tmp_path_factory):
    """Two processes, TP=2 (one model copy split in two)."""
    out = tmp_path_factory.mktemp("megatron-tp2")
    results = launch(2, 2, _cases(conversion=True, checkpoint_arch="llama", misuse=True), megatron_models, out)
    return {"results": results, "out": out}


@pytest.fixture(scope="session")
def run_dp2(megatron_models, tmp_path_factory):
    """Two processes, TP=1 x DP=2, given uneven halves of the batch."""
    out = tmp_path_factory.mktemp("megatron-dp2")
    results = launch(2, 1, _cases(conversion=False, checkpoint_arch="qwen2", misuse=False), megatron_models, out)
    return {"results": results, "out": out}


@pytest.fixture(scope="session")
def run_multi_adapter_tp2(megatron_models, tmp_path_factory):
    """Two processes, TP=2: the several-adapters cases (``megatron_multi_adapter_cases.py``)."""
    out = tmp_path_factory.mktemp("megatron-multi-adapter-tp2")
    results = launch(2, 2, [{"name": "multi_adapter", "kind": "multi_adapter"}], megatron_models, out)
    return {"results": results, "out": out}
