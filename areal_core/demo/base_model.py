"""The demo's base model: a tiny Qwen2 pre-trained on addition with a systematic carry bug.

The demo shows GRPO sharpening a skill the base model half-has. So the base is trained
(supervised, loss on the answer tokens only) on train pairs of ``areal_core.tasks.arithmetic``
where, on prompts that need a carry, the label is the "forgot every carry" sum
(57+68 -> 15) with probability ``bug_rate`` and the right sum otherwise. Greedy decoding then
mostly gives the buggy answer on carry prompts, while sampling still gives the right one often:
the signal GRPO amplifies. The held-out pairs are never trained on.

``build_base_model(out_dir)`` writes a Hugging Face directory (config.json, model.safetensors,
generation_config.json, the tokenizer files) atomically and records the recipe's hash in
``MARKER_NAME``; when the directory already holds the same recipe it returns at once.

Command line: ``python -m areal_core.demo.base_model --out DIR``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import attrs

from areal_core.errors import ArealError
from areal_core.tasks import arithmetic
from areal_core.testing.tiny_models import EOS_ID, PAD_ID, model_config, save_model_directory

MARKER_NAME = "areal_demo_recipe.json"
#: Bump when the code changes what a recipe builds, so that cached directories are rebuilt.
BUILDER_VERSION = 1


@attrs.frozen
class BaseModelRecipe:
    """Everything that decides the weights of the base model (its hash names the cache entry)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 32
    max_position_embeddings: int = 512
    init_std: float = 0.1  # std of every weight matrix at init (0.02, the HF default, learns far slower)
    steps: int = 1250
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    bug_rate: float = 0.6  # share of carry prompts whose label forgets every carry
    seed: int = 0
    split_seed: int = 0  # must match the dataset's, so the held-out pairs stay unseen
    held_out: int = arithmetic.DEFAULT_HELD_OUT
    # Part of the recipe because the thread count changes the order of float sums, hence the
    # weights after 1250 steps. One thread: the same weights on every run, and no slowdown on a busy
    # machine (two OpenMP threads on shared cores made a build more than 3x slower than one).
    num_threads: int = 1

    def digest(self) -> str:
        """A short hash of the recipe and the builder version."""
        payload = json.dumps(
            {"builder_version": BUILDER_VERSION, "recipe": attrs.asdict(self)}, sort_keys=True
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_RECIPE = BaseModelRecipe()


class BaseModelBuildError(ArealError):
    """The base model cannot be built into the requested directory."""


def read_marker(directory: str | Path) -> dict | None:
    """The marker a finished build left in ``directory`` (hash, recipe, metrics), or None."""
    try:
        return json.loads((Path(directory) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_built(directory: str | Path, recipe: BaseModelRecipe = DEFAULT_RECIPE) -> bool:
    """Whether ``directory`` holds a finished build of ``recipe``."""
    marker = read_marker(directory)
    return marker is not None and marker.get("hash") == recipe.digest()


def _model_config(recipe: BaseModelRecipe):
    return model_config(
        arch="qwen2", hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
        num_heads=recipe.num_heads, num_kv_heads=recipe.num_kv_heads,
        intermediate_size=recipe.intermediate_size, vocab_size=recipe.vocab_size,
        tie_word_embeddings=True, max_position_embeddings=recipe.max_position_embeddings,
        init_std=recipe.init_std,
    )


def _training_batch(recipe: BaseModelRecipe, pairs, rng: random.Random):
    """Input ids (right-padded) and labels (-100 outside the answer) of one supervised batch."""
    import torch

    sequences, answer_starts = [], []
    for _ in range(recipe.batch_size):
        a, b = pairs[rng.randrange(len(pairs))]
        label = a + b
        if arithmetic.needs_carry(a, b) and rng.random() < recipe.bug_rate:
            label = arithmetic.carry_forgotten_sum(a, b)
        prompt = arithmetic.prompt_ids(a, b)
        sequences.append(prompt + arithmetic.answer_ids(label))
        answer_starts.append(len(prompt))
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (sequence, start) in enumerate(zip(sequences, answer_starts)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, start : len(sequence)] = torch.tensor(sequence[start:])
    # Right padding and causal attention: padding only follows the tokens the loss reads, so no
    # attention mask is needed and positions match unpadded inference.
    return input_ids, labels


def _lr_factor(recipe: BaseModelRecipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * cosine


def generate(model, records: list[dict], *, temperature: float = 0.0, seed: int = 0) -> list[list[int]]:
    """Completions (at most ``MAX_ANSWER_TOKENS + 1`` tokens, cut after the first eos) of ``records``.

    Greedy when ``temperature`` is 0, else sampled from the full distribution (no top-k).
    Prompts are grouped by length, so no padding is involved.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    completions: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for index, record in enumerate(records):
        by_length.setdefault(len(record["prompt_ids"]), []).append(index)
    with torch.no_grad():
        for indices in by_length.values():
            ids = torch.tensor([records[i]["prompt_ids"] for i in indices])
            prompt_length = ids.shape[1]
            for _ in range(arithmetic.MAX_ANSWER_TOKENS + 1):
                logits = model(input_ids=ids).logits[:, -1, :].float()
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    next_ids = torch.multinomial(probs, 1, generator=generator)
                else:
                    next_ids = logits.argmax(dim=-1, keepdim=True)
                ids = torch.cat([ids, next_ids], dim=1)
            for row, index in enumerate(indices):
                output = ids[row, prompt_length:].tolist()
                completions[index] = output[: output.index(EOS_ID) + 1] if EOS_ID in output else output
    return [completions[i] for i in range(len(records))]


def evaluate(model, records: list[dict], *, temperature: float = 0.0, seed: int = 0) -> float:
    """The share of ``records`` whose completion earns the arithmetic reward."""
    if not records:
        return float("nan")
    outputs = generate(model, records, temperature=temperature, seed=seed)
    return sum(arithmetic.reward(r, o) for r, o in zip(records, outputs)) / len(records)


def fit_from_scratch(recipe, next_batch: Callable[[], tuple], log: Callable[[str], None], label: str):
    """A freshly initialised Qwen2 of ``recipe``'s shape, trained for ``recipe.steps`` steps on
    ``next_batch() -> (input_ids, labels)`` with AdamW and ``_lr_factor``'s schedule; in eval mode.
    Shared by the recipes of ``make demo`` and ``make demo-multi``."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(_model_config(recipe), dtype=torch.float32)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() >= 2:
                parameter.normal_(0.0, recipe.init_std)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(recipe, s))
    model.train()
    loss_sum, loss_count = 0.0, 0
    for step in range(recipe.steps):
        input_ids, labels = next_batch()
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        if (step + 1) % 250 == 0 or step + 1 == recipe.steps:
            log(f"{label}: step {step + 1}/{recipe.steps} loss {loss_sum / loss_count:.4f}")
            loss_sum, loss_count = 0.0, 0
    model.eval()
    return model


def train_base_model(recipe: BaseModelRecipe, log: Callable[[str], None] = lambda _: None):
    """A freshly initialised Qwen2 model trained by ``recipe`` (in memory) and its metrics."""
    train_pairs, _ = arithmetic.split_pairs(recipe.split_seed, recipe.held_out)
    rng = random.Random(recipe.seed)
    model = fit_from_scratch(recipe, lambda: _training_batch(recipe, train_pairs, rng), log, "base model")
    dataset = arithmetic.ArithmeticDataset(split_seed=recipe.split_seed, held_out=recipe.held_out)
    held_out = dataset.eval_records()
    carry = [arithmetic.needs_carry(r["a"], r["b"]) for r in held_out]
    metrics = {"num_parameters": sum(p.numel() for p in model.parameters())}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        outputs = generate(model, held_out, temperature=temperature, seed=recipe.seed)
        rewards = [arithmetic.reward(r, o) for r, o in zip(held_out, outputs)]
        carry_rewards = [x for x, needs in zip(rewards, carry) if needs]
        metrics[f"eval_accuracy_{mode}"] = sum(rewards) / len(rewards)
        metrics[f"carry_accuracy_{mode}"] = sum(carry_rewards) / max(1, len(carry_rewards))
    return model, metrics


def _staging_prefix(out: Path) -> str:
    return f".{out.name}.building-"


def _remove_stale_staging(out: Path) -> None:
    """Remove the staging directories of builds that were killed (their process is gone)."""
    for path in out.parent.glob(_staging_prefix(out) + "*"):
        pid = path.name[len(_staging_prefix(out)):].split("-", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _install(staging: Path, out: Path) -> None:
    """Move the finished ``staging`` directory to ``out`` by rename; a reader never sees half."""
    if out.exists():
        # Only a previous build (another recipe) is replaced; anything else is the user's.
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.rename(out, old)
        try:
            os.rename(staging, out)
        finally:
            shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staging, out)


def build_base_model(
    out_dir: str | Path,
    recipe: BaseModelRecipe = DEFAULT_RECIPE,
    *,
    log: Callable[[str], None] = lambda _: None,
    train: Callable | None = None,
) -> Path:
    """Build the demo base model into ``out_dir`` unless it already holds ``recipe``; return it.

    Training uses ``recipe.num_threads`` torch threads (the previous setting is restored after).
    ``log`` receives progress lines. The directory appears complete or not at all: everything is
    written to a temporary sibling first, with the marker last, then renamed into place. A
    directory holding another recipe's build is replaced; a non-empty directory without a marker
    is refused (``BaseModelBuildError``), never overwritten.

    ``train(recipe, log) -> (model, metrics)`` trains the model (``train_base_model`` when None);
    another recipe class (``areal_core.demo.multi_base_model``) brings its own, with the same
    cache, marker and atomic install. Its metrics hold ``eval_accuracy_greedy`` and ``_sampled``.
    """
    out = Path(out_dir).absolute()
    if is_built(out, recipe):
        log(f"base model: {out} already holds recipe {recipe.digest()}")
        return out
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and read_marker(out) is None)):
        raise BaseModelBuildError(
            f"{out} exists and is not a demo base-model directory (no {MARKER_NAME}); "
            f"choose another output directory or remove it"
        )
    import torch

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    staging = Path(tempfile.mkdtemp(prefix=f"{_staging_prefix(out)}{os.getpid()}-", dir=out.parent))
    try:
        started = time.monotonic()
        log(f"base model: building recipe {recipe.digest()} into {out}")
        model, metrics = (train or train_base_model)(recipe, log)
        save_model_directory(model, staging)
        metrics["build_seconds"] = round(time.monotonic() - started, 2)
        marker = {"hash": recipe.digest(), "recipe": attrs.asdict(recipe), "metrics": metrics,
                  "torch": torch.__version__}
        (staging / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
        # A concurrent build of the same recipe that finished first is as good as ours.
        if not is_built(out, recipe):
            if out.exists() and not any(out.iterdir()):
                out.rmdir()
            try:
                _install(staging, out)
            except OSError:
                if not is_built(out, recipe):
                    raise
        log(
            "base model: held-out accuracy greedy {eval_accuracy_greedy:.3f} sampled "
            "{eval_accuracy_sampled:.3f}; built in {build_seconds:.0f} s".format(**metrics)
        )
        return out
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        torch.set_num_threads(previous_threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m areal_core.demo.base_model",
        description="Build (or find cached) the demo's base model: a tiny Qwen2 that half-knows addition.",
    )
    parser.add_argument("--out", required=True, help="directory of the Hugging Face model")
    parser.add_argument("--threads", type=int, default=DEFAULT_RECIPE.num_threads,
                        help="torch threads while training (changes the weights, hence the cache key)")
    parser.add_argument("--steps", type=int, default=DEFAULT_RECIPE.steps,
                        help="supervised steps (changes the recipe, hence the cache key)")
    parser.add_argument("--seed", type=int, default=DEFAULT_RECIPE.seed)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    recipe = attrs.evolve(DEFAULT_RECIPE, steps=args.steps, seed=args.seed, num_threads=args.threads)
    try:
        out = build_base_model(args.out, recipe, log=lambda line: print(line, flush=True))
    except BaseModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = (read_marker(out) or {}).get("metrics", {})
    print(json.dumps({"path": str(out), **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
