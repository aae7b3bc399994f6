"""A dataset of prompts read from local files (gsm8k, math): a seeded endless train stream, a
fixed held-out split, and the options every such dataset shares.

``build_prompt_dataset`` does what their factories have in common: it checks the shared options,
reads the train file (and the held-out file, or holds rows of the train file out), encodes each
row's prompt with the model's tokenizer and drops the prompts longer than ``max_prompt_tokens``.
What a row holds is the dataset's own business: it hands over a ``read_rows(path, option)``.

The train split is an endless stream of epochs, each a permutation of the train rows drawn from
``seed`` and the epoch number, so record number ``position`` is a pure function of the options:
a run resumes its data by remembering one integer.
"""

from __future__ import annotations

import random
from typing import Callable, Iterator

from areal_core.tasks.data_files import FileLayout, TaskDataError
from areal_core.tasks.epoch_order import train_row_index
from areal_core.tasks.prompt_encoding import check_prompt_template, encode_prompts, load_tokenizer


class PromptDataset:
    """Prompt records: a seeded endless train stream and a fixed eval split.

    ``train_rows`` and ``eval_rows`` are the file rows (with ``prompt_ids``) that survived
    ``max_prompt_tokens``; ``dropped`` counts the others per split. Every record also carries
    ``tokenizer_path``, so that a reward decodes completions without options of its own.
    """

    def __init__(self, name: str, train_rows: list[dict], eval_rows: list[dict], seed: int, dropped: dict,
                 tokenizer_path: str):
        self.name = name
        self.train_rows, self.eval_rows = train_rows, eval_rows
        self.seed, self.dropped, self.tokenizer_path = seed, dropped, tokenizer_path

    def __len__(self) -> int:
        """The number of train rows (one epoch of the train stream)."""
        return len(self.train_rows)

    def _record(self, row: dict) -> dict:
        return {**row, "prompt_ids": list(row["prompt_ids"]), "tokenizer_path": self.tokenizer_path}

    def train_records(self, start: int = 0) -> Iterator[dict]:
        """The endless train stream from record number ``start`` on (resume by passing it).

        Each record also carries ``position``, its own number in the stream.
        """
        if start < 0:
            raise ValueError(f"a data position is >= 0 (got {start})")
        position = start
        while True:
            record = self._record(self.train_rows[train_row_index(self.seed, position, len(self.train_rows))])
            record["position"] = position
            yield record
            position += 1

    def train_batch(self, position: int, size: int) -> list[dict]:
        """Records ``position .. position + size - 1`` of the train stream; the next batch starts
        at ``position + size``."""
        if size < 1:
            raise ValueError(f"a batch holds at least one prompt (got size {size})")
        stream = self.train_records(position)
        return [next(stream) for _ in range(size)]

    def eval_records(self, limit: int = 0) -> list[dict]:
        """The eval records in file order; the first ``limit`` of them when ``limit > 0``."""
        rows = self.eval_rows[:limit] if limit > 0 else self.eval_rows
        return [self._record(row) for row in rows]


def check_int(dataset: str, name: str, value, minimum: int) -> None:
    """TaskDataError unless ``value``, the option ``name`` of ``dataset``, is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TaskDataError(f"{dataset} dataset option {name} must be an integer >= {minimum} (got {value!r})")


def _with_prompts(rows: list[dict], tokenizer, template: str, field: str, use_chat_template: bool,
                  max_prompt_tokens: int) -> tuple[list[dict], int]:
    """``rows`` with ``prompt_ids`` added, less those longer than ``max_prompt_tokens``; and how
    many were dropped."""
    encoded = encode_prompts(tokenizer, [template.format(**{field: r[field]}) for r in rows], use_chat_template)
    kept = [{**row, "prompt_ids": ids} for row, ids in zip(rows, encoded)
            if not max_prompt_tokens or len(ids) <= max_prompt_tokens]
    return kept, len(rows) - len(kept)


def build_prompt_dataset(layout: FileLayout, read_rows: Callable[[str, str], list[dict]], *, path: str,
                         eval_path: str, held_out: int, tokenizer_path: str, prompt_template: str, field: str,
                         use_chat_template: bool, max_prompt_tokens: int, seed: int,
                         split_seed: int) -> PromptDataset:
    """The dataset of ``layout.dataset`` from its options (see the module's docstring).

    ``read_rows(path, option)`` reads one file into row dicts, each holding ``field``, the text
    that fills ``{field}`` in ``prompt_template``. Every option is checked before a file is read,
    and the files before the tokenizer is loaded. Raises ``TaskDataError`` naming the option, file
    or row at fault and the fix.
    """
    name = layout.dataset
    check_int(name, "held_out", held_out, 0)
    check_int(name, "max_prompt_tokens", max_prompt_tokens, 0)
    check_int(name, "seed", seed, 0)
    check_int(name, "split_seed", split_seed, 0)
    if not isinstance(use_chat_template, bool):
        raise TaskDataError(f"{name} dataset option use_chat_template must be true or false (got {use_chat_template!r})")
    check_prompt_template(prompt_template, field)
    if bool(eval_path) == bool(held_out):
        raise TaskDataError(
            f"the {name} dataset needs exactly one eval split: eval_path (a local file such as "
            f"{layout.eval_example}) or held_out (rows of the train file kept out of training); "
            f"got eval_path={eval_path!r}, held_out={held_out}"
        )
    train_rows = read_rows(path, "path")
    if eval_path:
        eval_rows = read_rows(eval_path, "eval_path")
    else:
        if held_out >= len(train_rows):
            raise TaskDataError(
                f"held_out={held_out} leaves no train rows ({path!r} has {len(train_rows)}); "
                f"hold out fewer rows or give eval_path"
            )
        order = list(range(len(train_rows)))
        random.Random(split_seed).shuffle(order)
        held = set(order[:held_out])
        eval_rows = [row for i, row in enumerate(train_rows) if i in held]
        train_rows = [row for i, row in enumerate(train_rows) if i not in held]

    tokenizer = load_tokenizer(tokenizer_path)
    dropped = {}
    train_rows, dropped["train"] = _with_prompts(train_rows, tokenizer, prompt_template, field, use_chat_template,
                                                 max_prompt_tokens)
    eval_rows, dropped["eval"] = _with_prompts(eval_rows, tokenizer, prompt_template, field, use_chat_template,
                                               max_prompt_tokens)
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            raise TaskDataError(
                f"every {split} prompt is longer than max_prompt_tokens={max_prompt_tokens}; "
                f"raise it (and rollout.max_model_len with it) or shorten prompt_template"
            )
    return PromptDataset(name, train_rows, eval_rows, seed, dropped, tokenizer_path)
