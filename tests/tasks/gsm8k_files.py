"""Helpers of the GSM8K tests: GSM8K-shaped rows, and writing them as JSON Lines or Parquet."""

from __future__ import annotations

import json
import string

#: Every character of the GSM8K-style texts in these tests, one token each.
TEXT_SYMBOLS = list(string.ascii_letters + string.digits + string.punctuation + " \n")
#: A chat template in the shape of an instruct model's (user turn, then the assistant's opened).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_jsonl(path, rows) -> str:
    """Write ``rows`` (dicts) as JSON Lines to ``path``; return the path as a string."""
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def write_parquet(path, rows) -> str:
    """Write ``rows`` (dicts with the same keys) as a Parquet table to ``path``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), str(path))
    return str(path)


def gsm8k_rows(count: int, start: int = 0) -> list[dict]:
    """``count`` distinct GSM8K-shaped rows: "Sam has i marbles and finds 3 more..." -> i + 3."""
    return [
        {
            "question": f"Sam has {i} marbles and finds 3 more. How many marbles does Sam have now?",
            "answer": f"Sam has {i} + 3 = <<{i}+3={i + 3}>>{i + 3} marbles.\n#### {i + 3}",
        }
        for i in range(start, start + count)
    ]
