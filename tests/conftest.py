"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os

import pytest

# Training ranks and test processes use one thread each: the machine has two cores and the
# inference servers need one of them.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory):
    """A tiny Qwen2 model directory (tied embeddings, GQA), built offline once per session."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), arch="qwen2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """A tiny Llama model directory (untied embeddings, GQA), built offline once per session."""
    from areal_core.testing.tiny_models import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("tiny-llama"), arch="llama", tie_word_embeddings=False, seed=1
    )
