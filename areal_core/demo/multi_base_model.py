"""The base model of ``make demo-multi``: one tiny Qwen2 that half-knows several arithmetic tasks.

Like ``areal_core.demo.base_model`` (whose builder, cache marker and atomic install it reuses),
but every supervised batch mixes the tasks of ``operations`` (each example's operation drawn
with probability proportional to its ``operation_weights``), and each operation has its own bug
rate: on that operation's hard prompts
(``arithmetic.is_hard``: a carry for add; a borrow or a negative answer for sub) the label is
``arithmetic.buggy_answer`` with probability ``bug_rates[i]``. Every operation's held-out pairs
(``arithmetic.operation_split``, the same ones its dataset evaluates on) are never trained on.

The recipe is its own class with its own digest (``MultiTaskRecipe.digest``, which names the kind
of recipe as well), so the cache of ``make demo``'s base (``DEFAULT_RECIPE``) is untouched and the
two never share a directory.

Command line: ``python -m areal_core.demo.multi_base_model --out .cache/demo-multi-base``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
from typing import Callable

import attrs

from areal_core.demo import base_model
from areal_core.demo.base_model import BaseModelBuildError, build_base_model, read_marker
from areal_core.tasks import arithmetic
from areal_core.testing.tiny_models import PAD_ID

#: Bump when the code changes what a multi-task recipe builds, so cached directories are rebuilt.
MULTI_BUILDER_VERSION = 1


def _tuple_of_str(value) -> tuple[str, ...]:
    return tuple(str(v) for v in value)


def _tuple_of_float(value) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


@attrs.frozen
class MultiTaskRecipe:
    """Everything that decides the weights of the multi-task base model (its hash names the cache
    entry). The model shape and optimiser settings are those of the demo's ``BaseModelRecipe``."""

    operations: tuple[str, ...] = attrs.field(default=("add", "sub"), converter=_tuple_of_str)
    # share of each operation's hard prompts whose label carries the bug
    bug_rates: tuple[float, ...] = attrs.field(default=(0.6, 0.6), converter=_tuple_of_float)
    # Subtraction (borrows, and the order and sign of b > a) takes longer to learn than addition,
    # and when is rounding's to decide: a uniform mix of 4000 steps learnt it on avx512 and avx2
    # kernels and not on the default ones (greedy 0.26, 16% sampled right on its hard prompts,
    # final loss 0.29 against 0.17). Two sub examples to one add, over 5000 steps, give it 1.67x
    # the examples of that mix (and add 1.33x those of `make demo`'s base).
    operation_weights: tuple[float, ...] = attrs.field(default=(1.0, 2.0), converter=_tuple_of_float)
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    vocab_size: int = 32
    max_position_embeddings: int = 512
    init_std: float = 0.1
    # 2000 steps of a uniform mix left sub barely learnt (greedy 0.22; a single-adapter GRPO run
    # reached 0.44); see operation_weights for 4000 (docs/demo.md has the figures).
    steps: int = 5000
    batch_size: int = 128
    lr: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    split_seed: int = 0  # must match the datasets', so the held-out pairs stay unseen
    held_out: int = arithmetic.DEFAULT_HELD_OUT
    num_threads: int = 1  # part of the recipe: the thread count changes the weights

    def __attrs_post_init__(self):
        if not self.operations:
            raise ValueError("a multi-task recipe needs at least one operation")
        for operation in self.operations:
            arithmetic.check_operation(operation)
        if len(set(self.operations)) != len(self.operations):
            raise ValueError(f"operations are listed twice: {list(self.operations)}")
        if len(self.bug_rates) != len(self.operations):
            raise ValueError(
                f"bug_rates needs one rate per operation ({len(self.operations)}: "
                f"{list(self.operations)}), got {list(self.bug_rates)}"
            )
        if any(not 0.0 <= rate <= 1.0 for rate in self.bug_rates):
            raise ValueError(f"bug rates are between 0 and 1 (got {list(self.bug_rates)})")
        if len(self.operation_weights) != len(self.operations) or any(w <= 0 for w in self.operation_weights):
            raise ValueError(
                f"operation_weights needs one positive weight per operation ({len(self.operations)}: "
                f"{list(self.operations)}), got {list(self.operation_weights)}"
            )

    def digest(self) -> str:
        """A short hash of the recipe, its kind and the builder version."""
        payload = json.dumps(
            {"kind": "multi-task", "builder_version": MULTI_BUILDER_VERSION,
             "base_builder_version": base_model.BUILDER_VERSION, "recipe": attrs.asdict(self)},
            sort_keys=True,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


DEFAULT_MULTI_RECIPE = MultiTaskRecipe()


def is_built(directory, recipe: MultiTaskRecipe = DEFAULT_MULTI_RECIPE) -> bool:
    """Whether ``directory`` holds a finished build of ``recipe``."""
    return base_model.is_built(directory, recipe)


def _training_batch(recipe: MultiTaskRecipe, train_pairs: dict, rng: random.Random):
    """Input ids (right-padded) and labels (-100 outside the answer) of one mixed batch."""
    import torch

    sequences, answer_starts = [], []
    for _ in range(recipe.batch_size):
        index = rng.choices(range(len(recipe.operations)), weights=recipe.operation_weights)[0]
        operation, bug_rate = recipe.operations[index], recipe.bug_rates[index]
        pairs = train_pairs[operation]
        a, b = pairs[rng.randrange(len(pairs))]
        label = arithmetic.apply(a, b, operation)
        if arithmetic.is_hard(a, b, operation) and rng.random() < bug_rate:
            label = arithmetic.buggy_answer(a, b, operation)
        prompt = arithmetic.prompt_ids(a, b, operation)
        sequences.append(prompt + arithmetic.answer_ids(label))
        answer_starts.append(len(prompt))
    width = max(map(len, sequences))
    input_ids = torch.full((len(sequences), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(sequences), width), -100, dtype=torch.long)
    for row, (sequence, start) in enumerate(zip(sequences, answer_starts)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        labels[row, start : len(sequence)] = torch.tensor(sequence[start:])
    return input_ids, labels


def held_out_metrics(model, recipe: MultiTaskRecipe) -> dict:
    """Greedy and sampled held-out accuracy per operation (``<op>_eval_accuracy_greedy``, ...,
    ``<op>_hard_accuracy_greedy``) and their means over the operations (``eval_accuracy_greedy``,
    ``eval_accuracy_sampled``)."""
    metrics: dict = {}
    for mode, temperature in (("greedy", 0.0), ("sampled", 1.0)):
        accuracies = []
        for operation in recipe.operations:
            dataset = arithmetic.ArithmeticDataset(
                split_seed=recipe.split_seed, held_out=recipe.held_out, operation=operation
            )
            held_out = dataset.eval_records()
            outputs = base_model.generate(model, held_out, temperature=temperature, seed=recipe.seed)
            rewards = [arithmetic.reward(r, o) for r, o in zip(held_out, outputs)]
            hard = [x for x, r in zip(rewards, held_out) if arithmetic.is_hard(r["a"], r["b"], operation)]
            metrics[f"{operation}_eval_accuracy_{mode}"] = sum(rewards) / len(rewards)
            metrics[f"{operation}_hard_accuracy_{mode}"] = sum(hard) / max(1, len(hard))
            accuracies.append(sum(rewards) / len(rewards))
        metrics[f"eval_accuracy_{mode}"] = sum(accuracies) / len(accuracies)
    return metrics


def train_multi_base_model(recipe: MultiTaskRecipe, log: Callable[[str], None] = lambda _: None):
    """A freshly initialised Qwen2 model trained by ``recipe`` (in memory) and its metrics."""
    train_pairs = {
        operation: arithmetic.operation_split(operation, recipe.split_seed, recipe.held_out)[0]
        for operation in recipe.operations
    }
    rng = random.Random(recipe.seed)
    model = base_model.fit_from_scratch(recipe, lambda: _training_batch(recipe, train_pairs, rng), log,
                                        "multi-task base model")
    metrics = {"num_parameters": sum(p.numel() for p in model.parameters())}
    metrics.update(held_out_metrics(model, recipe))
    return model, metrics


def build_multi_base_model(out_dir, recipe: MultiTaskRecipe = DEFAULT_MULTI_RECIPE, *,
                           log: Callable[[str], None] = lambda _: None):
    """Build the multi-task base model into ``out_dir`` unless it already holds ``recipe``
    (``base_model.build_base_model``'s cache, marker and atomic install); return the directory."""
    return build_base_model(out_dir, recipe, log=log, train=train_multi_base_model)


def _weights(given: str | None, operations: str) -> list[float]:
    if given is not None:
        return [float(w) for w in given.split(",") if w.strip()]
    names = tuple(op.strip() for op in operations.split(",") if op.strip())
    return list(DEFAULT_MULTI_RECIPE.operation_weights) if names == DEFAULT_MULTI_RECIPE.operations else [1.0] * len(names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m areal_core.demo.multi_base_model",
        description="Build (or find cached) the base model of `make demo-multi`: a tiny Qwen2 "
                    "that half-knows each of several arithmetic tasks.",
    )
    parser.add_argument("--out", required=True, help="directory of the Hugging Face model")
    parser.add_argument("--threads", type=int, default=DEFAULT_MULTI_RECIPE.num_threads,
                        help="torch threads while training (changes the weights, hence the cache key)")
    parser.add_argument("--steps", type=int, default=DEFAULT_MULTI_RECIPE.steps,
                        help="supervised steps (changes the recipe, hence the cache key)")
    parser.add_argument("--seed", type=int, default=DEFAULT_MULTI_RECIPE.seed)
    parser.add_argument("--operations", default=",".join(DEFAULT_MULTI_RECIPE.operations),
                        help="comma-separated operations the base half-knows")
    parser.add_argument("--bug-rates", default=",".join(map(str, DEFAULT_MULTI_RECIPE.bug_rates)),
                        help="comma-separated bug rate of each operation's hard prompts")
    parser.add_argument("--operation-weights",
                        help="comma-separated share of each operation in the training batches (default: "
                             "the recipe's for its own operations, else equal shares)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    try:
        recipe = attrs.evolve(
            DEFAULT_MULTI_RECIPE, steps=args.steps, seed=args.seed, num_threads=args.threads,
            operations=[op.strip() for op in args.operations.split(",") if op.strip()],
            bug_rates=[float(r) for r in args.bug_rates.split(",") if r.strip()],
            operation_weights=_weights(args.operation_weights, args.operations),
        )
    except ValueError as exc:
        parser.error(str(exc))
    try:
        out = build_multi_base_model(args.out, recipe, log=lambda line: print(line, flush=True))
    except BaseModelBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    metrics = (read_marker(out) or {}).get("metrics", {})
    print(json.dumps({"path": str(out), **metrics}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
