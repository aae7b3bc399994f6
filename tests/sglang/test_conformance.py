"""The core's conformance kit for engine x sglang on the real SGLang server (float32): its
one-adapter run, and its several-adapter run (skipped, with the matrix's reason, for an engine
that does not declare multi_adapter)."""

from __future__ import annotations

import pytest

from areal_core.testing.conformance import run_conformance
from areal_core.testing.multi_adapter_conformance import run_multi_adapter_conformance
from tests.multi_adapter_reports import assert_multi_adapter_report

pytestmark = [pytest.mark.server, pytest.mark.slow]


@pytest.mark.parametrize("engine", ["fsdp2", "megatron"])
def test_conformance_kit_passes_for_engine_x_sglang(engine, sglang_server, tiny_qwen2, tmp_path):
    report = run_conformance(
        engine, "sglang", tmp_path,
        servers=[sglang_server.clients[0].base_url],
        model_dir=tiny_qwen2,  # the model the session's server serves
        overrides=[f"gconfig.lora_name=conformance-{engine}", "actor.device=cpu"],
    )
    assert not report.agreement.alarm and report.agreement_gap <= report.agreement_threshold
    assert report.adapter_effect > 10 * report.agreement_threshold  # the kit's own bar, checked again
    assert report.generated_version == 1
    # leave the shared server as it was found
    sglang_server.clients[0].post_json("/unload_lora_adapter", {"lora_name": f"conformance-{engine}-v1"})


@pytest.mark.parametrize("engine", ["fsdp2", "megatron"])
def test_multi_adapter_conformance_for_engine_x_sglang(engine, sglang_server, tiny_qwen2, tmp_path):
    report = run_multi_adapter_conformance(
        engine, "sglang", tmp_path, servers=[sglang_server.clients[0].base_url], model_dir=tiny_qwen2,
        lora_name=f"conformance-multi-{engine}", overrides=["actor.device=cpu"])
    try:
        assert_multi_adapter_report(report)
    finally:  # leave the shared server as it was found
        for name in report.adapters:
            sglang_server.clients[0].post_json("/unload_lora_adapter", {"lora_name": f"{name}-v1"})
