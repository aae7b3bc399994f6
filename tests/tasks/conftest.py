"""Fixtures of the task tests: tokenizers that spell English (with and without a chat template)."""

from __future__ import annotations

import pytest

from .gsm8k_files import CHAT_TEMPLATE, TEXT_SYMBOLS


@pytest.fixture(scope="session")
def text_tokenizer_dir(tmp_path_factory) -> str:
    """A character-level tokenizer over printable ASCII (bos/eos/pad/unk specials), no chat template."""
    from areal_core.testing.tiny_models import build_tokenizer

    directory = tmp_path_factory.mktemp("text-tokenizer")
    build_tokenizer(directory, symbols=TEXT_SYMBOLS)
    return str(directory)


@pytest.fixture(scope="session")
def chat_tokenizer_dir(tmp_path_factory) -> str:
    """The same tokenizer with ``CHAT_TEMPLATE`` saved as its chat template."""
    from areal_core.testing.tiny_models import build_tokenizer

    directory = tmp_path_factory.mktemp("chat-tokenizer")
    tokenizer = build_tokenizer(directory, symbols=TEXT_SYMBOLS)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(str(directory))
    return str(directory)
