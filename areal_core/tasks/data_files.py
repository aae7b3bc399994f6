"""Local data files of the file-backed datasets (gsm8k, math): JSON Lines or Parquet tables read
with the ``datasets`` library (no hub access), and the errors that name the file and the fix.

A dataset describes its files with a ``FileLayout`` (its name, the columns every row needs and
what they hold); ``read_columns`` checks a file against it and returns those columns. Nothing
here imports torch; ``datasets`` is imported when first needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import attrs

from areal_core.errors import ArealError

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
#: How many bad rows an error lists before it says "and N more".
MAX_LISTED_ROWS = 5


class TaskDataError(ArealError, ValueError):
    """A dataset's file or option that is missing, unreadable, or not in the dataset's layout."""


@attrs.frozen
class FileLayout:
    """What a dataset's files look like, in the words its errors use."""

    dataset: str  # the dataset's name in the configuration: "gsm8k"
    title: str  # what a file is called in errors: "GSM8K file"
    columns: tuple[str, ...]  # the columns every row needs
    row_needs: str  # the sentence that says what those columns hold, and how to change them
    example: str  # a train file's path in examples: "data/gsm8k/train.jsonl"
    eval_example: str  # a held-out file's: "data/gsm8k/test.jsonl"


def listed(problems: Sequence[str]) -> str:
    """``problems`` joined for an error message, the first ``MAX_LISTED_ROWS`` of them."""
    extra = len(problems) - MAX_LISTED_ROWS
    return "; ".join(problems[:MAX_LISTED_ROWS]) + (f"; and {extra} more" if extra > 0 else "")


def _file_format(file: Path, option: str, layout: FileLayout) -> str:
    if not file.is_file():
        where = "a directory, not a file" if file.is_dir() else "not found"
        columns = " and ".join(repr(c) for c in layout.columns)
        raise TaskDataError(
            f"{layout.title} {str(file)!r} ({option}) is {where}; give a local .jsonl or .parquet file "
            f"whose rows have {columns} fields (e.g. {layout.example}), set with dataset.options.{option}"
        )
    fmt = FILE_FORMATS.get(file.suffix.lower())
    if fmt is None:
        raise TaskDataError(
            f"{layout.title} {str(file)!r} ({option}) has the suffix {file.suffix!r}; "
            f"use one of {', '.join(FILE_FORMATS)} (JSON Lines or Parquet)"
        )
    return fmt


def read_columns(path: str, option: str, layout: FileLayout) -> dict[str, list]:
    """The columns ``layout.columns`` of the local file ``path``, each a list with one value a row.

    ``option`` names the configuration option that gave ``path`` (errors name it). Raises
    ``TaskDataError`` naming the file and the fix when the file is missing, of another format,
    unreadable, lacks a column, or has no rows.
    """
    if not isinstance(path, str) or not path:
        raise TaskDataError(
            f"the {layout.dataset} dataset needs dataset.options.{option}: the local {layout.title} "
            f"(.jsonl or .parquet, e.g. {layout.example}); got {path!r}"
        )
    file = Path(path)
    fmt = _file_format(file, option, layout)
    import datasets

    datasets.disable_progress_bars()  # one bar per rank and split only clutters the run's log
    try:
        table = datasets.load_dataset(fmt, data_files=str(file.absolute()), split="train")
    except Exception as exc:  # datasets/pyarrow raise many kinds; the file is what is wrong
        raise TaskDataError(
            f"cannot read {layout.title} {str(file)!r} ({option}) as {fmt}: {type(exc).__name__}: {exc}; "
            f"a .jsonl file holds one JSON object per line, a .parquet file one table"
        ) from exc
    missing = [column for column in layout.columns if column not in table.column_names]
    if missing:
        raise TaskDataError(
            f"{layout.title} {str(file)!r} ({option}) has no {' and no '.join(repr(m) for m in missing)} "
            f"field (its fields: {', '.join(table.column_names) or 'none'}); {layout.row_needs}"
        )
    if table.num_rows == 0:
        raise TaskDataError(f"{layout.title} {str(file)!r} ({option}) has no rows; give a file with problems in it")
    return {column: table[column] for column in layout.columns}
