"""Fixtures of the vLLM plugin's tests (the session's server itself lives in tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from vllm_test_helpers import build_peft_adapter


@pytest.fixture(scope="session")
def adapters(vllm_model, tmp_path_factory):
    """Rank-8 adapters on ``vllm_model``, built once: ``adapters(key)`` -> directory.

    Different keys give different random adapters; load them under any version.
    """
    root = tmp_path_factory.mktemp("vllm-adapters")
    built: dict[str, Path] = {}

    def get(key: str, rank: int = 8, target_modules="all-linear") -> Path:
        if key not in built:
            seed = 1000 + len(built)
            built[key] = Path(build_peft_adapter(vllm_model, root / key, rank=rank, seed=seed, version=0,
                                                 target_modules=target_modules).path)
        return built[key]

    return get
