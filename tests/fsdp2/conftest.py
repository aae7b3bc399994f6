"""Fixtures of the fsdp2 tests: the one two-process launch, and in-process one-rank engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fsdp2.two_rank_launch import TwoRankRun, free_ports

CASES_SCRIPT = Path(__file__).with_name("distributed_cases.py")
LAUNCH_TIMEOUT_S = 420


@pytest.fixture(scope="session")
def two_rank_run(tiny_qwen2, tiny_llama, tmp_path_factory) -> TwoRankRun:
    """Run every two-rank case in one launch of two real processes (gloo, CPU)."""
    out = tmp_path_factory.mktemp("fsdp2-two-ranks")
    ports = ",".join(str(p) for p in free_ports(2))
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
