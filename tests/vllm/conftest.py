"""Fixtures of the vLLM plugin's tests (the session's server itself lives in tests/conftest.py)."""

from __future__ import annotations

import zlib
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

    def get(key: str, rank: int = 8, target_modules="all-linear", version: int = 0) -> Path:
        """``version`` is what its manifest records (the core's publisher admits an adapter only
        under the version it was exported as); the same key gives the same weights."""
        if (key, version) not in built:
            seed = 1000 + zlib.crc32(key.encode()) % 100_000
            built[key, version] = Path(build_peft_adapter(
                vllm_model, root / f"{key}-v{version}", rank=rank, seed=seed, version=version,
                target_modules=target_modules).path)
        return built[key, version]

    return get
