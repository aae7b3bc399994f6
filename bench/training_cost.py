"""Training cost: peak memory and step time of LoRA versus full fine-tuning, FSDP2 on 2 CPU ranks.

Method: a Qwen2 shape of about 125M parameters (random init), batch BATCH x SEQ_LEN tokens per
step over both ranks (each rank takes half), AdamW, FSDP2 over 2 gloo ranks of one thread each,
the engine built through the hooks as the GRPO loop builds it. Each configuration runs in fresh
processes: WARMUP untimed step(s), then STEPS timed steps; a step is timed on every rank from a
barrier to the end of train_step, and the step's time is the slower rank's. Time is the median
step; memory is the sum over the ranks of (peak RSS of the process minus its RSS after imports,
before the model is built). Configurations, run one after the other in this order: full
fine-tuning, LoRA rank 16 (float32 base) and LoRA rank 16 with the frozen base in bfloat16 (the
adapter in float32), first all with gradient checkpointing, then all without; then LoRA ranks 1
and 64 with checkpointing. Ratios are LoRA over full fine-tuning within the same setting.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from models import CACHE, QWEN2_125M, cached_model, parameter_count
from ranks import run_ranks
from report import markdown_table, median, write_result

BATCH, SEQ_LEN = 4, 256
WARMUP, STEPS = 1, 3
MEMORY_GOAL, TIME_GOAL = 0.4, 0.72

#: name -> (label, rank program arguments)
CONFIGS = {
    "full_ckpt": ("full fine-tuning, checkpointing", ["--full-finetune", "--checkpointing"]),
    "lora16_ckpt": ("LoRA r16, checkpointing", ["--lora-rank", "16", "--checkpointing"]),
    "lora16_bf16_ckpt": ("LoRA r16, bf16 base, checkpointing",
                         ["--lora-rank", "16", "--dtype", "bfloat16", "--checkpointing"]),
    "full": ("full fine-tuning, no checkpointing", ["--full-finetune"]),
    "lora16": ("LoRA r16, no checkpointing", ["--lora-rank", "16"]),
    "lora16_bf16": ("LoRA r16, bf16 base, no checkpointing", ["--lora-rank", "16", "--dtype", "bfloat16"]),
    "lora1_ckpt": ("LoRA r1, checkpointing", ["--lora-rank", "1", "--checkpointing"]),
    "lora64_ckpt": ("LoRA r64, checkpointing", ["--lora-rank", "64", "--checkpointing"]),
}
#: (result key, LoRA configuration, full configuration)
RATIOS = [
    ("lora_vs_full_peak_memory_ratio", "lora16_ckpt", "full_ckpt", "memory"),
    ("lora_bf16_base_vs_full_peak_memory_ratio", "lora16_bf16_ckpt", "full_ckpt", "memory"),
    ("lora_vs_full_peak_memory_ratio_no_checkpointing", "lora16", "full", "memory"),
    ("lora_vs_full_step_time_ratio", "lora16", "full", "time"),
    ("lora_bf16_base_vs_full_step_time_ratio", "lora16_bf16", "full", "time"),
    ("lora_vs_full_step_time_ratio_checkpointing", "lora16_ckpt", "full_ckpt", "time"),
]


def measure(model: Path, args: list[str], out: Path, batch: int, seq_len: int,
            warmup: int, steps: int) -> dict:
    ranks = run_ranks(Path(__file__).with_name("training_cost_rank.py"),
                      ["--model", str(model), "--batch", str(batch), "--seq-len", str(seq_len),
                       "--warmup", str(warmup), "--steps", str(steps), *args], out, timeout=1800.0)
    step_seconds = [max(times) for times in zip(*(r["step_seconds"] for r in ranks))][warmup:]
    return {
        "memory_bytes": sum(r["peak_rss"] - r["rss_after_imports"] for r in ranks),
        "step_seconds": median(step_seconds),
        "step_seconds_each": step_seconds,
        "peak_rss_per_rank": [r["peak_rss"] for r in ranks],
        "rss_after_imports_per_rank": [r["rss_after_imports"] for r in ranks],
        "trainable_parameters": ranks[0]["trainable_parameters"],
        "parameters": ranks[0]["parameters"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--warmup", type=int, default=WARMUP)
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), help="run only these configurations")
    args = parser.parse_args()
    model = cached_model("qwen2-125m", QWEN2_125M)
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="training-cost-", dir=CACHE))
    results = {}
    try:
        for name, (label, extra) in CONFIGS.items():
            if args.only and name not in args.only:
                continue
            print(f"running {label} ...", flush=True)
            results[name] = measure(model, extra, scratch / name, BATCH, args.seq_len, args.warmup, args.steps)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ratios = {}
    for key, lora, full, what in RATIOS:
        if lora in results and full in results:
            field = "memory_bytes" if what == "memory" else "step_seconds"
            ratios[key] = results[lora][field] / results[full][field]
    rows = [[CONFIGS[name][0], f"{r['trainable_parameters'] / 1e6:.2f}M", r["memory_bytes"] / 2**20,
             r["step_seconds"]] for name, r in results.items()]
    text = markdown_table(["configuration", "trainable", "memory MiB (sum of ranks)", "median step s"], rows)
    text += "\n\n" + markdown_table(["ratio (LoRA / full)", "value"], [[k, v] for k, v in ratios.items()])
    goals = []
    if "lora_vs_full_peak_memory_ratio" in ratios:
        goals.append(f"memory with checkpointing {ratios['lora_vs_full_peak_memory_ratio']:.2f}x "
                     f"(bf16 base {ratios.get('lora_bf16_base_vs_full_peak_memory_ratio', float('nan')):.2f}x; "
                     f"goal <= {MEMORY_GOAL}x)")
    if "lora_vs_full_step_time_ratio" in ratios:
        goals.append(f"step time without checkpointing {ratios['lora_vs_full_step_time_ratio']:.2f}x "
                     f"(bf16 base {ratios.get('lora_bf16_base_vs_full_step_time_ratio', float('nan')):.2f}x; "
                     f"goal <= {TIME_GOAL}x)")
    if goals:
        text += "\n\n" + "; ".join(goals)
    method = (__doc__.split("Method: ", 1)[1].strip().replace("\n", " ")
              .replace("BATCH", str(BATCH)).replace("SEQ_LEN", str(args.seq_len))
              .replace("WARMUP", str(args.warmup)).replace("STEPS", str(args.steps)))
    write_result("training_cost", {
        **ratios, "configurations": results, "model_shape": QWEN2_125M,
        "parameters": parameter_count(QWEN2_125M), "batch": BATCH, "seq_len": args.seq_len,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "goals": {"memory_ratio": MEMORY_GOAL, "step_time_ratio": TIME_GOAL},
    }, method, text)


if __name__ == "__main__":
    main()
