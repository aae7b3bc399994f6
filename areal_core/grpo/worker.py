"""The program every training rank runs (started by ``areal train`` through torchrun).

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m areal_core.grpo.worker CONFIG [key=value ...]

Rank 0 builds the rollout server client (launching a server, or connecting to
``rollout.servers``), and stops what it launched on the way out, whatever happens.
"""

from __future__ import annotations

import datetime
import os
import random
import sys


def _init_distributed(config) -> str:
    import torch
    import torch.distributed as dist

    device = config.actor.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30))
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return device


def _seed(seed: int, rank: int) -> None:
    import torch

    random.seed(seed + rank)
    torch.manual_seed(seed)


def run_worker(config_path: str, overrides: list[str]) -> dict:
    from areal_core.config_loader import config_to_dict, load_config_or_raise
    from areal_core.grpo.comm import Comm
    from areal_core.grpo.loop import GRPOLoop
    from areal_core.grpo.publisher import AdapterPublisher
    from areal_core.grpo.run_dir import RunDirectory
    from areal_core.registry import default_registry
    from areal_core.tasks import get_dataset, get_reward

    config = load_config_or_raise(config_path, overrides)
    _init_distributed(config)
    comm = Comm()
    _seed(config.train.seed, comm.rank)
    registry = default_registry()
    run_dir = RunDirectory(config.output_dir)
    if comm.is_leader:
        run_dir.create()
        run_dir.write_config(config_to_dict(config))
    dataset = get_dataset(config.dataset.name, config.dataset.options)
    reward_fn = get_reward(config.reward.name, config.reward.options)

    actor = config.actor
    engine = registry.build_engine(actor.backend, config)
    server = None
    try:
        engine.load_base_model()
        registry.call("areal_inject_adapter", actor.backend, engine=engine, actor=actor)
        registry.call("areal_shard_model", actor.backend, engine=engine, actor=actor)
        publisher = None
        if comm.is_leader:
            server = registry.build_rollout_server(config.rollout.backend, config)
            server.start()
            publisher = AdapterPublisher(registry, config.rollout.backend, server,
                                         config.gconfig.lora_name, config.rollout.max_head_offpolicyness)
            publisher.adopt_server_state()
        comm.broadcast(None)  # every rank waits until the servers are up
        loop = GRPOLoop(config, registry, engine, comm, run_dir, dataset, reward_fn, publisher)
        summary = loop.run()
    finally:
        if server is not None:
            server.stop()
        engine.close()
    if comm.is_leader:
        print(f"run directory: {run_dir.root}", flush=True)
        if summary["first_eval"] is not None:
            print(f"eval_accuracy: {summary['first_eval']:.3f} -> {summary['last_eval']:.3f}", flush=True)
    return summary


def _die_with_launcher() -> None:
    """torchrun starts each rank in a session of its own: if the launcher is SIGKILLed, the rank
    would run on, orphaned. On Linux, ask the kernel to kill this rank when its parent dies."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(1)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _die_with_launcher()
    if not argv:
        print("usage: python -m areal_core.grpo.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    run_worker(argv[0], argv[1:])
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
