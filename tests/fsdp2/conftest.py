"""Fixtures of the fsdp2 tests: the one two-process launch, and in-process one-rank engines."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import pytest

CASES_SCRIPT = Path(__file__).with_name("distributed_cases.py")
LAUNCH_TIMEOUT_S = 420


def _free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free when this returns."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class TwoRankRun:
    """What the two processes of ``distributed_cases.py`` wrote."""

    def __init__(self, out: Path):
        self.out = out
        self.ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    def result(self, case: str, rank: int = 0) -> dict:
        return self.ranks[rank][case]

    def tensors(self, case: str, what: str, rank: int = 0) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.out / f"{case}.rank{rank}.{what}.safetensors"))

    def tensor_list(self, case: str, what: str, rank: int = 0) -> list:
        loaded = self.tensors(case, what, rank)
        return [loaded[str(i)] for i in range(len(loaded))]


@pytest.fixture(scope="session")
def two_rank_run(tiny_qwen2, tiny_llama, tmp_path_factory) -> TwoRankRun:
    """Run every two-rank case in one launch of two real processes (gloo, CPU)."""
    out = tmp_path_factory.mktemp("fsdp2-two-ranks")
    ports = ",".join(str(p) for p in _free_ports(2))
    command = [sys.executable, str(CASES_SCRIPT), "--out", str(out), "--qwen2", str(tiny_qwen2),
               "--llama", str(tiny_llama), "--ports", ports]
    processes, logs = [], []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        log = open(out / f"rank{rank}.log", "w")
        logs.append(log)
        processes.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [process.wait(timeout=LAUNCH_TIMEOUT_S) for process in processes]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        codes = ["timed out"] * 2
    finally:
        for log in logs:
            log.close()
    if codes != [0, 0]:
        tails = "\n".join(
            f"--- rank {r} ({codes[r]}) ---\n" + (out / f"rank{r}.log").read_text()[-4000:] for r in (0, 1)
        )
        pytest.fail(f"the two-rank fsdp2 launch failed:\n{tails}")
    return TwoRankRun(out)


@pytest.fixture
def one_rank_engine(tiny_qwen2):
    """A factory of in-process, one-rank fsdp2 engines driven through the hooks; closed after."""
    from areal_core.config import ActorConfig, RunConfig
    from areal_core.registry import Registry

    registry = Registry()
    engines = []

    def build(*, shard: bool = True, **actor_options):
        actor_options.setdefault("path", str(tiny_qwen2))
        actor = ActorConfig(backend="fsdp2", device="cpu", **actor_options)
        engine = registry.build_engine("fsdp2", RunConfig(actor=actor))
        engines.append(engine)
        engine.load_base_model()
        if shard:
            registry.call("areal_inject_adapter", "fsdp2", engine=engine, actor=actor)
            registry.call("areal_shard_model", "fsdp2", engine=engine, actor=actor)
        return engine

    build.registry = registry
    yield build
    for engine in reversed(engines):
        engine.close()
