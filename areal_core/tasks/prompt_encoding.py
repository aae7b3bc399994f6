"""The model's tokenizer on both sides of a text task: prompt templates and chat templates into
token ids, completions back into text. Shared by the file-backed datasets and their rewards
(gsm8k, math). ``transformers`` is imported when a tokenizer is first loaded.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from areal_core.tasks.data_files import TaskDataError


@functools.lru_cache(maxsize=8)
def load_tokenizer(tokenizer_path: str):
    """The tokenizer saved in the local directory ``tokenizer_path`` (loaded once per process)."""
    if not isinstance(tokenizer_path, str) or not tokenizer_path:
        raise TaskDataError(
            f"this task needs tokenizer_path, the local model directory whose tokenizer encodes prompts "
            f"and decodes completions (got {tokenizer_path!r}); the examples set "
            "dataset.options.tokenizer_path: ${actor.path}"
        )
    if not Path(tokenizer_path).is_dir():
        raise TaskDataError(
            f"tokenizer_path {tokenizer_path!r} is not a directory; point it at the local model "
            "directory (normally ${actor.path}); models are not downloaded from a hub"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
    except Exception as exc:
        raise TaskDataError(
            f"cannot load a tokenizer from {tokenizer_path!r}: {type(exc).__name__}: {exc}; the "
            f"directory needs the tokenizer files save_pretrained writes (tokenizer.json, tokenizer_config.json)"
        ) from exc


def check_prompt_template(template: str, field: str) -> None:
    """TaskDataError unless ``template`` formats with ``field`` alone and uses it."""
    if not isinstance(template, str) or "{" + field + "}" not in template:
        raise TaskDataError(
            f"prompt_template must be a text containing {{{field}}} (got {template!r}); "
            f"write literal braces as {{{{ and }}}}"
        )
    try:
        template.format(**{field: ""})
    except (KeyError, IndexError, ValueError) as exc:
        raise TaskDataError(
            f"prompt_template {template!r} does not format with {{{field}}} alone "
            f"({type(exc).__name__}: {exc}); write literal braces as {{{{ and }}}}"
        ) from None


def encode_prompts(tokenizer, texts: Sequence[str], use_chat_template: bool) -> list[list[int]]:
    """Token ids of each prompt text: as a user message through the tokenizer's chat template
    (with the assistant's turn opened) when ``use_chat_template`` and the tokenizer has one, else
    the plain text; the bos token first whenever the tokenizer has one."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        rendered = [
            tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                          add_generation_prompt=True)
            for text in texts
        ]
        encoded = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    else:
        encoded = tokenizer(list(texts), add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    return [list(ids) if bos is None or ids[:1] == [bos] else [bos, *ids] for ids in encoded]


def decode_completion(tokenizer, completion_ids) -> str:
    """The text of ``completion_ids`` up to the first eos token, special tokens left out."""
    ids = list(completion_ids)
    eos = tokenizer.eos_token_id
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    return tokenizer.decode(ids, skip_special_tokens=True)
