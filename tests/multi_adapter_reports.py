"""What the vLLM and SGLang conformance tests require of the kit's several-adapter run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from areal_core.registry import default_registry
from areal_core.testing.multi_adapter_conformance import ADAPTERS


def assert_multi_adapter_report(report) -> None:
    """Skip when the pair's declarations lack multi_adapter (the kit said why), else require
    each adapter's agreement, its own rank and target modules, and two adapters told apart."""
    if report.skipped:
        assert not default_registry().matrix.cell(report.engine, report.server).multi_adapter
        pytest.skip(report.skipped)
    assert len(report.adapters) == len(ADAPTERS)
    for (suffix, rank, _, modules), (name, adapter) in zip(ADAPTERS, report.adapters.items()):
        assert name.endswith(f"-{suffix}")
        assert not adapter.agreement.alarm and adapter.agreement_gap <= adapter.agreement_threshold, name
        assert adapter.adapter_effect > 10 * adapter.agreement_threshold, name  # the kit's own bar, again
        written = json.loads((Path(adapter.adapter_path) / "adapter_config.json").read_text())
        assert written["r"] == rank, name
        if modules != ("all-linear",):
            assert written["target_modules"] == sorted(modules), name
        assert adapter.generated_version == 1
    threshold = max(adapter.agreement_threshold for adapter in report.adapters.values())
    assert report.adapters_apart > 10 * threshold  # a server swapping the two would be caught
