"""One rank of the weight-sync benchmark (started by ``weight_sync.py`` through ``ranks.py``).

Every round: one real training step (untimed, so the adapter changes), then
(a) this project's path, timed: the ``areal_export_adapter`` hook (gather from the ranks, write
    the PEFT directory) and, on rank 0, the ``areal_load_rollout_adapter`` hook (load it under a
    new version name, confirmed by the server), then (a') the same for an engine with
    ``actor.replicate_adapter``;
(b) the merged path, timed: merge the adapter into the base on every rank's shards, gather the
    full weights to rank 0, write them as safetensors, ``POST /collective_rpc`` reload_weights and
    ``POST /reset_prefix_cache``;
then, untimed, the server's log-probabilities of a probe under each path are compared with the
trainer's, and the server's original base weights are reloaded so every round starts alike.
Rank 0 writes the per-round figures to ``<out>/rank0.json``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import attrs  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from areal_core.agreement import max_abs_difference  # noqa: E402
from areal_core.config import (  # noqa: E402
    ActorConfig, GenerationConfig, OptimizerConfig, RolloutConfig, RunConfig, TrainConfig,
)
from areal_core.process_exit import exit_now  # noqa: E402
from areal_core.registry import default_registry  # noqa: E402
from areal_fsdp2.adapter_export import gather_trainable  # noqa: E402
from merged_weights import merge_and_gather  # noqa: E402
from ranks import init_rank, write_rank_result  # noqa: E402

ENGINE, SERVER = "fsdp2", "vllm"
LORA_NAME = "bench"
PROBE = [1] + [4 + (i * 7) % 28 for i in range(47)]  # 48 token ids of the tiny tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--server", required=True, help="address of the vLLM server (dev mode on)")
    parser.add_argument("--work", required=True, help="where adapters and merged weights are written")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--lora-rank", type=int, default=16)
    return parser.parse_args()


def training_batch(step: int, rank: int) -> list[list[int]]:
    return [[1] + [4 + (step * 13 + rank * 5 + i * j) % 28 for i in range(31)] for j in (1, 2)]


def nll(logprobs, indices):
    return -torch.stack([lp.sum() for lp in logprobs]).sum() / 128.0, {}


def main() -> None:
    args = parse_args()
    rank = init_rank()
    registry = default_registry()
    actor = ActorConfig(backend=ENGINE, path=args.model, device="cpu", lora_rank=args.lora_rank,
                        lora_alpha=2 * args.lora_rank, optimizer=OptimizerConfig(lr=1e-3))
    config = RunConfig(
        actor=actor, train=TrainConfig(seed=1), gconfig=GenerationConfig(lora_name=LORA_NAME),
        rollout=RolloutConfig(backend=SERVER, servers=[args.server], request_timeout=900.0),
    )

    def build(actor):
        built = registry.build_engine(ENGINE, attrs.evolve(config, actor=actor))
        built.load_base_model()
        registry.call("areal_inject_adapter", ENGINE, engine=built, actor=actor)
        registry.call("areal_shard_model", ENGINE, engine=built, actor=actor)
        return built

    engine = build(actor)  # the default: the adapter sharded like the rest
    replicated = build(attrs.evolve(actor, replicate_adapter=True))  # actor.replicate_adapter

    server = http = None
    if rank == 0:
        from areal_vllm.http_client import VllmHttp

        server = registry.build_rollout_server(SERVER, config)
        server.start()
        http = VllmHttp(args.server, timeout=900.0)

    def reload_base(path: str) -> float:
        start = time.perf_counter()
        http.post("/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        return time.perf_counter() - start

    def reset_prefix_cache() -> float:
        start = time.perf_counter()
        http.post("/reset_prefix_cache", {})
        return time.perf_counter() - start

    work = Path(args.work)

    def adapter_path(record: dict, prefix: str, trained, version: int, trainer: list[float]) -> str:
        """Time ``trained``'s export as ``version`` and its load on the server (rank 0) into
        ``record`` (keys ``<prefix>_export_seconds``...); the name it is served under."""
        dist.barrier()
        start = time.perf_counter()
        adapter = registry.call("areal_export_adapter", ENGINE, engine=trained,
                                directory=str(work / "adapters" / f"v{version}"), version=version)
        record[f"{prefix}_export_seconds"] = time.perf_counter() - start
        record[f"{prefix}_bytes"] = adapter.num_bytes
        name = f"{LORA_NAME}-v{version}"
        if rank == 0:
            start = time.perf_counter()
            registry.call("areal_load_rollout_adapter", SERVER, server=server, adapter=adapter,
                          lora_name=name)
            record[f"{prefix}_load_seconds"] = time.perf_counter() - start
            record[f"{prefix}_logprob_difference"] = max_abs_difference(
                server.prompt_logprobs(PROBE, lora_name=name), trainer)
        return name

    rounds = []
    for index in range(args.warmup + args.rounds):
        engine.train_step(training_batch(index, rank), nll)
        replicated.train_step(training_batch(index, rank), nll)
        trainer = engine.compute_logprobs([PROBE])[0].tolist()
        base = engine.compute_logprobs([PROBE], disable_adapter=True)[0].tolist()
        # How far the adapter moves the probe: what a server serving the wrong weights would miss.
        record = {"round": index, "warmup": index < args.warmup,
                  "adapter_logprob_effect": max_abs_difference(base, trainer)}

        # (a) this project's path: export the adapter from the shards, load it as a new version.
        name = adapter_path(record, "adapter", engine, 2 * index, trainer)

        # (a') the same with actor.replicate_adapter: nothing to gather. Right after (a), so that
        # both find the server alike (not just after a 2 GB reload).
        replicated_trainer = replicated.compute_logprobs([PROBE])[0].tolist()
        replicated_name = adapter_path(record, "replicated", replicated, 2 * index + 1, replicated_trainer)

        # Diagnostic, outside both paths: the plugin's adapter gather alone.
        dist.barrier()
        start = time.perf_counter()
        gathered = gather_trainable(engine.model)
        record["adapter_gather_seconds"] = time.perf_counter() - start
        del gathered

        # (b) the merged path: merge into the base, gather everything, reload it on the server.
        merged_dir = work / f"merged-v{index}"
        dist.barrier()
        start = time.perf_counter()
        tensors = merge_and_gather(engine.model, keep=rank == 0)
        record["merged_merge_gather_seconds"] = time.perf_counter() - start
        if rank == 0:
            start = time.perf_counter()
            merged_dir.mkdir(parents=True)
            save_file(tensors, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
            record["merged_write_seconds"] = time.perf_counter() - start
            record["merged_bytes"] = (merged_dir / "model.safetensors").stat().st_size
            record["merged_tensors"] = len(tensors)
            tensors.clear()
            record["merged_reload_seconds"] = reload_base(str(merged_dir))
            record["merged_prefix_reset_seconds"] = reset_prefix_cache()
            record["merged_logprob_difference"] = max_abs_difference(
                server.prompt_logprobs(PROBE, lora_name=None), trainer)
            # Untimed: back to the original base, so the next adapter is served on it.
            record["restore_seconds"] = reload_base(str(Path(args.model).absolute())) + reset_prefix_cache()
            shutil.rmtree(merged_dir)
            server.unload_adapter(name)
            server.unload_adapter(replicated_name)
        del tensors
        dist.barrier()

        dist.barrier()
        rounds.append(record)
        if rank == 0:
            print(record, flush=True)

    if rank == 0:
        server.stop()
        http.close()
    engine.close()
    replicated.close()
    write_rank_result(args.out, rank, {"rounds": rounds})
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    exit_now(0)  # see areal_core.process_exit: the teardown can abort after gloo
