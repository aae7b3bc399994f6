"""Training cost: peak memory and step time of LoRA versus full fine-tuning, FSDP2 on 2 CPU ranks.

Method: a Qwen2 shape of about 125M parameters (random init), batch BATCH x SEQ_LEN tokens per
step over both ranks (each rank takes half), AdamW, FSDP2 over 2 gloo ranks of one thread each,
every engine built through the hooks as the GRPO loop builds it. Memory: each configuration runs
alone in fresh processes for MEMORY_STEPS step(s); its memory is the sum over the ranks of (peak
RSS of the process minus its RSS after imports, before the model is built). Time: the
configurations compared are built side by side in one launch and stepped in turns (one step of
each per round, the order reversed every other round), WARMUP untimed round(s) then ROUNDS timed
ones; a step is timed on every rank from a barrier to the end of train_step and counts as the
slower rank's time. Reported: the median step of each configuration, and each ratio as the
median over the timed rounds of (one step / the other's step in the same round). Configurations:
with gradient checkpointing, full fine-tuning, LoRA rank 16 with a float32 base, LoRA rank 16
with the frozen base in bfloat16 (the adapter in float32), LoRA ranks 1 and 64 (timed in one
launch); without checkpointing, the first three (timed in a second launch).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from models import CACHE, QWEN2_125M, cached_model, parameter_count
from ranks import run_ranks
from report import markdown_table, median, write_result

BATCH, SEQ_LEN = 4, 256
WARMUP, ROUNDS, MEMORY_STEPS = 1, 3, 1
MEMORY_GOAL, TIME_GOAL = 0.4, 0.72
RANK_PROGRAM = Path(__file__).with_name("training_cost_rank.py")


def config(name: str, label: str, *, full: bool = False, rank: int = 16, dtype: str = "float32",
           checkpointing: bool) -> dict:
    return {"name": name, "label": label, "full_finetune": full, "lora_rank": rank, "dtype": dtype,
            "checkpointing": checkpointing}


CONFIGS = [
    config("full_ckpt", "full fine-tuning, checkpointing", full=True, checkpointing=True),
    config("lora16_ckpt", "LoRA r16, checkpointing", checkpointing=True),
    config("lora16_bf16_ckpt", "LoRA r16, bf16 base, checkpointing", dtype="bfloat16", checkpointing=True),
    config("full", "full fine-tuning, no checkpointing", full=True, checkpointing=False),
    config("lora16", "LoRA r16, no checkpointing", checkpointing=False),
    config("lora16_bf16", "LoRA r16, bf16 base, no checkpointing", dtype="bfloat16", checkpointing=False),
    config("lora1_ckpt", "LoRA r1, checkpointing", rank=1, checkpointing=True),
    config("lora64_ckpt", "LoRA r64, checkpointing", rank=64, checkpointing=True),
]
BY_NAME = {c["name"]: c for c in CONFIGS}
#: The side-by-side timing launches; the first of each is the reference of its ratios.
TIME_LAUNCHES = [
    ["full_ckpt", "lora16_ckpt", "lora16_bf16_ckpt", "lora1_ckpt", "lora64_ckpt"],
    ["full", "lora16", "lora16_bf16"],
]
#: (result key, LoRA configuration, full configuration)
MEMORY_RATIOS = [
    ("lora_vs_full_peak_memory_ratio", "lora16_ckpt", "full_ckpt"),
    ("lora_bf16_base_vs_full_peak_memory_ratio", "lora16_bf16_ckpt", "full_ckpt"),
    ("lora_vs_full_peak_memory_ratio_no_checkpointing", "lora16", "full"),
    ("lora_bf16_base_vs_full_peak_memory_ratio_no_checkpointing", "lora16_bf16", "full"),
]
TIME_RATIOS = {
    ("lora16", "full"): "lora_vs_full_step_time_ratio",
    ("lora16_bf16", "full"): "lora_bf16_base_vs_full_step_time_ratio",
    ("lora16_ckpt", "full_ckpt"): "lora_vs_full_step_time_ratio_checkpointing",
    ("lora16_bf16_ckpt", "full_ckpt"): "lora_bf16_base_vs_full_step_time_ratio_checkpointing",
    ("lora1_ckpt", "lora16_ckpt"): "lora_rank1_vs_rank16_step_time_ratio",
    ("lora64_ckpt", "lora16_ckpt"): "lora_rank64_vs_rank16_step_time_ratio",
}


def launch(model: Path, names: list[str], out: Path, seq_len: int, rounds: int) -> list[dict]:
    configs = [{k: v for k, v in BY_NAME[name].items() if k != "label"} for name in names]
    return run_ranks(RANK_PROGRAM, ["--model", str(model), "--configs", json.dumps(configs),
                                    "--batch", str(BATCH), "--seq-len", str(seq_len),
                                    "--rounds", str(rounds)], out, timeout=1800.0)


def slower_rank_steps(ranks: list[dict], name: str) -> list[float]:
    return [max(times) for times in zip(*(r["step_seconds"][name] for r in ranks))]


def measure_memory(model: Path, name: str, out: Path, seq_len: int) -> dict:
    ranks = launch(model, [name], out, seq_len, MEMORY_STEPS)
    return {
        "memory_bytes": sum(r["peak_rss"] - r["rss_after_imports"] for r in ranks),
        "peak_rss_per_rank": [r["peak_rss"] for r in ranks],
        "rss_after_imports_per_rank": [r["rss_after_imports"] for r in ranks],
        "rank0_rss_after_phases": ranks[0]["phases"],
        "parameters": ranks[0]["parameters"][name],
        "trainable_parameters": ranks[0]["trainable_parameters"][name],
    }


def measure_times(model: Path, names: list[str], out: Path, seq_len: int, warmup: int, rounds: int) -> dict:
    ranks = launch(model, names, out, seq_len, warmup + rounds)
    steps = {name: slower_rank_steps(ranks, name)[warmup:] for name in names}
    ratios = {}
    for (name, other), key in TIME_RATIOS.items():
        if name in steps and other in steps:
            ratios[key] = median([s / r for s, r in zip(steps[name], steps[other])])
    return {"steps": steps, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    args = parser.parse_args()
    model = cached_model("qwen2-125m", QWEN2_125M)
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="training-cost-", dir=CACHE))
    memory, times, ratios = {}, {}, {}
    try:
        for c in CONFIGS:
            print(f"memory: {c['label']} ...", flush=True)
            memory[c["name"]] = measure_memory(model, c["name"], scratch / f"memory-{c['name']}", args.seq_len)
        for index, names in enumerate(TIME_LAUNCHES):
            print(f"time, side by side: {', '.join(BY_NAME[n]['label'] for n in names)} ...", flush=True)
            result = measure_times(model, names, scratch / f"time-{index}", args.seq_len, args.warmup, args.rounds)
            ratios.update(result["ratios"])
            for name, steps in result["steps"].items():
                times.setdefault(name, []).append(steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    for key, lora, full in MEMORY_RATIOS:
        ratios[key] = memory[lora]["memory_bytes"] / memory[full]["memory_bytes"]
    configurations = {
        c["name"]: {**memory[c["name"]], "label": c["label"],
                    "step_seconds": median([s for launch_steps in times[c["name"]] for s in launch_steps]),
                    "step_seconds_per_launch": times[c["name"]]}
        for c in CONFIGS
    }
    rows = [[r["label"], f"{r['trainable_parameters'] / 1e6:.2f}M", r["memory_bytes"] / 2**20, r["step_seconds"]]
            for r in configurations.values()]
    text = markdown_table(["configuration", "trainable", "memory MiB (sum of ranks)", "median step s"], rows)
    text += "\n\n" + markdown_table(["ratio", "value"], [[k, v] for k, v in sorted(ratios.items())])
    text += (f"\n\nmemory with checkpointing {ratios['lora_vs_full_peak_memory_ratio']:.2f}x, bf16 base "
             f"{ratios['lora_bf16_base_vs_full_peak_memory_ratio']:.2f}x (goal <= {MEMORY_GOAL}x); "
             f"step time without checkpointing {ratios['lora_vs_full_step_time_ratio']:.2f}x, bf16 base "
             f"{ratios['lora_bf16_base_vs_full_step_time_ratio']:.2f}x (goal <= {TIME_GOAL}x)")
    method = (__doc__.split("Method: ", 1)[1].strip().replace("\n", " ")
              .replace("BATCH", str(BATCH)).replace("SEQ_LEN", str(args.seq_len))
              .replace("MEMORY_STEPS", str(MEMORY_STEPS))
              .replace("WARMUP", str(args.warmup)).replace("ROUNDS", str(args.rounds)))
    write_result("training_cost", {
        **ratios, "configurations": configurations, "model_shape": QWEN2_125M,
        "parameters": parameter_count(QWEN2_125M), "batch": BATCH, "seq_len": args.seq_len,
        "warmup_rounds": args.warmup, "timed_rounds": args.rounds, "memory_steps": MEMORY_STEPS,
        "goals": {"memory_ratio": MEMORY_GOAL, "step_time_ratio": TIME_GOAL},
        "goals_met": {"memory": ratios["lora_vs_full_peak_memory_ratio"] <= MEMORY_GOAL,
                      "memory_bf16_base": ratios["lora_bf16_base_vs_full_peak_memory_ratio"] <= MEMORY_GOAL,
                      "step_time": ratios["lora_vs_full_step_time_ratio"] <= TIME_GOAL,
                      "step_time_bf16_base": ratios["lora_bf16_base_vs_full_step_time_ratio"] <= TIME_GOAL},
    }, method, text)


if __name__ == "__main__":
    main()
