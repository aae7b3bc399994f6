"""The conformance kit's several-adapter run follows the declarations: a pair that trains one
adapter at a time is skipped with the matrix's reason, before anything is built. Fake backends."""

import types

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.registry import Registry
from areal_core.testing import multi_adapter_conformance


def registry_with(engine_multi: bool, server_multi: bool) -> Registry:
    module = types.ModuleType("fake_conformance_backends")

    @hookimpl
    def areal_declare_backends():
        return [BackendDeclaration(name="eng", kind="engine", lora=LoraSupport(
                    status=LoraStatus.READY, multi_adapter=engine_multi)),
                BackendDeclaration(name="srv", kind="server", lora=LoraSupport(
                    status=LoraStatus.READY, multi_adapter=server_multi))]

    module.areal_declare_backends = areal_declare_backends
    return Registry(entry_points=[], extra_plugins=[("fake", module)])


def test_a_pair_without_multi_adapter_is_skipped_with_the_side_that_lacks_it(monkeypatch, tmp_path):
    registry = registry_with(engine_multi=False, server_multi=True)
    monkeypatch.setattr("areal_core.registry.default_registry", lambda: registry)
    report = multi_adapter_conformance.run_multi_adapter_conformance("eng", "srv", tmp_path / "run")
    assert report.skipped == ("eng x srv trains one adapter at a time: "
                              + registry.declaration("eng").why_not_multi_adapter())
    assert "engine eng does not train several adapters at once" in report.skipped
    assert report.adapters == {} and not (tmp_path / "run").exists()  # nothing built

