"""The program every training rank runs (started by ``areal train`` through torchrun).

    torchrun --nnodes N --nproc-per-node P --rdzv-backend c10d --rdzv-endpoint HOST:PORT \
        -m areal_core.grpo.worker CONFIG [key=value ...]

Rank 0 builds the rollout server client (launching a server, or connecting to
``rollout.servers``), and stops what it launched on the way out, whatever happens: an error,
Ctrl-C (SIGINT) or torchrun's SIGTERM after another rank died (both become exceptions here, and
further signals are ignored until the servers are stopped). Every collective times out after
``train.collective_timeout`` seconds, so a rank that dies or hangs stops the others; a failure
ends with one clear line per rank on stderr and exit status 1 (130 when interrupted).
"""

from __future__ import annotations

import datetime
import os
import random
import signal
import sys
import traceback

from areal_core.parent_death import die_with_parent
from areal_core.process_exit import exit_now


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
        timeout = datetime.timedelta(seconds=config.train.collective_timeout)
        dist.init_process_group(backend=backend, timeout=timeout)
    if device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return device


def leader_wait_timeout(config) -> float:
    """How long the other ranks wait for rank 0's work with the servers (server start-ups and
    restarts included) before they decide rank 0 is hung or gone."""
    rollout = config.rollout
    return config.train.collective_timeout + (rollout.max_restarts + 1) * rollout.startup_timeout


class Terminated(SystemExit):
    """SIGTERM (torchrun stopping the ranks after another one failed) as an exception."""


def _raise_terminated(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one is enough: the clean-up must run to its end
    raise Terminated(128 + signum)


_interrupted = False


def _raise_interrupted(signum, frame) -> None:
    """Ctrl-C: remembered, so that the rank says so even when what surfaces is the failure of a
    collective that the other rank, interrupted at the same moment, left. While the loop runs
    its steps, the first one asks it to stop with a checkpoint instead (``stop_request``)."""
    from areal_core.grpo.stop_request import STOP

    global _interrupted
    _interrupted = True
    if STOP.request():
        if os.environ.get("RANK", "0") == "0":
            print("areal train: Ctrl-C: stopping before the next step is trained, with a checkpoint of the "
                  "last completed one",
                  file=sys.stderr, flush=True)
        return
    raise KeyboardInterrupt


def _ignore_termination_signals() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass


def _launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), known before the process group."""
    return int(os.environ.get("RANK", "0"))


def run_worker(config_path: str, overrides: list[str]) -> dict:
    from areal_core.adapters import adapter_views
    from areal_core.config_loader import config_to_dict, load_config_or_raise
    from areal_core.grpo.comm import Comm
    from areal_core.grpo.loop import GRPOLoop
    from areal_core.grpo.multi_adapter_loop import MultiAdapterLoop
    from areal_core.grpo.publisher import AdapterPublisher
    from areal_core.grpo.run_dir import RunDirectory
    from areal_core.grpo.server_processes import record_launched_servers
    from areal_core.grpo.server_start import BackgroundServerStart
    from areal_core.registry import default_registry
    from areal_core.grpo.server_recovery import say_on_stderr
    from areal_core.hub import provenance_comment
    from areal_core.tasks import get_dataset, get_reward
    from areal_core.tracking import Trackers

    config = load_config_or_raise(config_path, overrides)
    rank = _launch_rank()
    random.seed(config.train.seed + rank)
    registry = default_registry()
    run_dir = RunDirectory(config.output_dir)
    # bad data is refused before anything heavy starts
    views = adapter_views(config)
    tasks = {adapter.name: (get_dataset(view.dataset.name, view.dataset.options),
                            get_reward(view.reward.name, view.reward.options)) for adapter, view in views}

    actor = config.actor
    server = starting = engine = trackers = None
    try:
        if rank == 0:
            run_dir.create()
            resolved = config_to_dict(config)
            run_dir.write_config(resolved, header=provenance_comment(config))
            # The servers' start is the longest part of a run's start-up: it begins before this
            # process imports torch and joins the process group, and runs while every rank
            # loads, adapts and shards the model. Even a half-started server must not outlive
            # the run: its processes are recorded.
            server = registry.build_rollout_server(config.rollout.backend, config)
            starting = BackgroundServerStart(server, on_launched=record_launched_servers)
        _init_distributed(config)
        comm = Comm(leader_wait_timeout=leader_wait_timeout(config))
        import torch

        torch.manual_seed(config.train.seed)
        if comm.is_leader:
            trackers = Trackers(config.tracking, run_dir.root, resolved, config.resume, say_on_stderr,
                                adapters=[a.name for a in config.adapters])
            run_dir.metric_sinks.append(trackers.log)
        engine = registry.build_engine(actor.backend, config)
        engine.load_base_model()
        if config.multi_adapter:  # each adapter its own injection, with its own settings
            for adapter, view in views:
                registry.call("areal_inject_adapter", actor.backend, engine=engine, actor=view.actor,
                              adapter_name=adapter.name)
            registry.call("areal_shard_model", actor.backend, engine=engine, actor=views[0][1].actor)
        else:
            registry.call("areal_inject_adapter", actor.backend, engine=engine, actor=actor)
            registry.call("areal_shard_model", actor.backend, engine=engine, actor=actor)
        publishers = {}
        if comm.is_leader:
            publishers = {adapter.name: AdapterPublisher(registry, config.rollout.backend, server, adapter.name,
                                                         adapter.max_head_offpolicyness, base_model_path=actor.path)
                          for adapter, _ in views}

        def servers_up() -> None:
            starting.wait()
            for publisher in publishers.values():
                publisher.adopt_server_state()

        comm.leader_result(servers_up)  # every rank waits until the servers are up
        if config.multi_adapter:
            loop = MultiAdapterLoop(config, registry, engine, comm, run_dir, tasks, publishers,
                                    on_server_restarted=record_launched_servers,
                                    resume_command=resume_command(config_path, overrides))
        else:
            dataset, reward_fn = tasks[config.gconfig.lora_name]
            loop = GRPOLoop(config, registry, engine, comm, run_dir, dataset, reward_fn,
                            publishers.get(config.gconfig.lora_name),
                            on_server_restarted=record_launched_servers,
                            resume_command=resume_command(config_path, overrides))
        summary = loop.run()
    finally:
        _ignore_termination_signals()  # a second Ctrl-C or SIGTERM must not cut the clean-up short
        if starting is not None:
            starting.thread.join()  # a start still under way ends before its server is stopped
        if server is not None:
            server.stop()
        if engine is not None:
            engine.close()
        if trackers is not None:
            trackers.close()
    if comm.is_leader:
        print(f"run directory: {run_dir.root}", flush=True)
        if "adapters" in summary:
            for name, figures in summary["adapters"].items():
                if figures["first_eval"] is not None:
                    print(f"eval_accuracy: {name} {figures['first_eval']:.3f} -> {figures['last_eval']:.3f}",
                          flush=True)
        elif summary["first_eval"] is not None:
            print(f"eval_accuracy: {summary['first_eval']:.3f} -> {summary['last_eval']:.3f}", flush=True)
    return summary


def resume_command(config_path: str, overrides: list[str]) -> str:
    """The ``areal train`` command that continues this run from its last checkpoint."""
    import shlex

    kept = [o for o in overrides if not o.startswith("resume=")]
    return shlex.join(["areal", "train", config_path, *kept, "resume=true"])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    die_with_parent()  # torchrun starts each rank in a session of its own
    if not argv:
        print("usage: python -m areal_core.grpo.worker CONFIG [key=value ...]", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _raise_terminated)
    signal.signal(signal.SIGINT, _raise_interrupted)
    try:
        run_worker(argv[0], argv[1:])
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    except BaseException as exc:  # noqa: BLE001 - every way out gets its one clear line
        exit_now(_report_failure(exc))
    exit_now(0)  # not via the interpreter's teardown, which can abort or hang (see process_exit)
    return 0  # not reached


def _report_failure(exc: BaseException) -> int:
    """Print why this rank stopped, in one line a user can act on; return the exit status."""
    from areal_core.errors import ArealError
    from areal_core.grpo.comm import LeaderFailed, is_peer_failure

    rank = os.environ.get("RANK", "0")
    prefix = f"areal train: rank {rank}:"
    from areal_core.grpo.loop import RunInterrupted

    if isinstance(exc, RunInterrupted) and rank == "0":
        print(f"{prefix} {exc}; the servers it launched are stopped", file=sys.stderr)
        return 130
    if isinstance(exc, KeyboardInterrupt) or _interrupted:
        print(f"{prefix} interrupted (Ctrl-C); the servers it launched are stopped", file=sys.stderr)
        return 130
    if isinstance(exc, Terminated):
        print(f"{prefix} stopped by SIGTERM (another rank failed, or the job was cancelled); the "
              f"servers it launched are stopped", file=sys.stderr)
        return 143
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else 1
    if isinstance(exc, LeaderFailed):
        print(f"{prefix} stopping with rank 0 (its message says why)", file=sys.stderr)
    elif isinstance(exc, ArealError):
        print(f"{prefix} {exc}", file=sys.stderr)
    elif is_peer_failure(exc):
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.split(". This is typically caused")[0]  # gloo's boilerplate
        print(f"{prefix} lost another training rank: it died, or did not answer a collective within "
              f"train.collective_timeout ({first}); this rank stopped too, with the servers it launched",
              file=sys.stderr)
    else:
        traceback.print_exception(exc)
        print(f"{prefix} failed: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
