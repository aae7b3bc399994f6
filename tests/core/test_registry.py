"""The registry loads entry points, survives broken plugins and routes hooks to one backend."""

import importlib.metadata
import sys
import types

import pytest

from areal_core import hookimpl
from areal_core.declarations import BackendDeclaration, LoraStatus, LoraSupport
from areal_core.errors import UnhandledHookError
from areal_core.registry import Registry


def make_plugin(module_name, backend, kind="engine", calls=None):
    module = types.ModuleType(module_name)

    @hookimpl
    def areal_declare_backends():
        return [BackendDeclaration(name=backend, kind=kind, lora=LoraSupport(status=LoraStatus.READY))]

    @hookimpl
    def areal_export_adapter(backend: str, engine, directory, version):
        if backend != module.BACKEND:
            return None
        if calls is not None:
            calls.append(module.BACKEND)
        return f"exported by {module.BACKEND}"

    module.BACKEND = backend
    module.areal_declare_backends = areal_declare_backends
    module.areal_export_adapter = areal_export_adapter
    sys.modules[module_name] = module
    return module


def entry_point(name, value):
    return importlib.metadata.EntryPoint(name=name, value=value, group="areal.plugins")


@pytest.fixture
def plugins():
    calls = []
    make_plugin("fake_plugin_a", "alpha", "engine", calls)
    make_plugin("fake_plugin_b", "beta", "engine", calls)
    make_plugin("fake_plugin_s", "serve", "server", calls)
    yield calls
    for name in ("fake_plugin_a", "fake_plugin_b", "fake_plugin_s"):
        sys.modules.pop(name, None)


def test_broken_plugin_is_listed_and_others_work(plugins):
    registry = Registry([
        entry_point("a", "fake_plugin_a"),
        entry_point("broken", "fake_plugin_that_does_not_exist"),
        entry_point("s", "fake_plugin_s"),
    ])
    records = {r.name: r for r in registry.plugins()}
    assert records["broken"].status == "broken"
    assert "fake_plugin_that_does_not_exist" in records["broken"].error
    assert records["a"].status == "ok" and records["a"].provides == ("alpha",)
    assert registry.engines() == ["alpha"] and registry.servers() == ["serve"]
    assert registry.supports("alpha", "serve")


def test_plugin_raising_in_its_declaration_is_broken(plugins):
    module = types.ModuleType("fake_plugin_raises")

    @hookimpl
    def areal_declare_backends():
        raise RuntimeError("cannot declare")

    module.areal_declare_backends = areal_declare_backends
    sys.modules["fake_plugin_raises"] = module
    try:
        registry = Registry([entry_point("raises", "fake_plugin_raises"), entry_point("a", "fake_plugin_a")])
    finally:
        del sys.modules["fake_plugin_raises"]
    records = {r.name: r for r in registry.plugins()}
    assert records["raises"].status == "broken" and "cannot declare" in records["raises"].error
    assert registry.engines() == ["alpha"]


def test_duplicate_backend_name_marks_the_second_plugin_broken(plugins):
    make_plugin("fake_plugin_dup", "alpha")
    try:
        registry = Registry([entry_point("a", "fake_plugin_a"), entry_point("dup", "fake_plugin_dup")])
    finally:
        sys.modules.pop("fake_plugin_dup", None)
    records = {r.name: r for r in registry.plugins()}
    assert records["dup"].status == "broken" and "already provided by plugin 'a'" in records["dup"].error


def test_a_call_reaches_only_its_backend(plugins):
    registry = Registry([entry_point("a", "fake_plugin_a"), entry_point("b", "fake_plugin_b")])
    assert registry.call("areal_export_adapter", "beta", engine=None, directory="d", version=1) == "exported by beta"
    assert plugins == ["beta"]


def test_unhandled_call_names_backend_and_installed(plugins):
    registry = Registry([entry_point("a", "fake_plugin_a"), entry_point("s", "fake_plugin_s")])
    with pytest.raises(UnhandledHookError) as info:
        registry.call("areal_export_adapter", "gamma", engine=None, directory="d", version=1)
    message = str(info.value)
    assert "'gamma'" in message and "alpha, serve" in message and "areal_export_adapter" in message


def test_wrapper_runs_around_another_plugins_step(plugins):
    events = []
    wrapper = types.ModuleType("fake_wrapper")

    @hookimpl(wrapper=True)
    def areal_export_adapter(backend, engine, directory, version):
        events.append(("before", backend))
        result = yield
        events.append(("after", result))
        return result + " (audited)"

    wrapper.areal_export_adapter = areal_export_adapter
    registry = Registry([entry_point("a", "fake_plugin_a")], extra_plugins=[("wrapper", wrapper)])
    result = registry.call("areal_export_adapter", "alpha", engine=None, directory="d", version=3)
    assert result == "exported by alpha (audited)"
    assert events == [("before", "alpha"), ("after", "exported by alpha")]


def test_installed_plugins_are_the_four_builtin_ones():
    from areal_core.registry import default_registry

    registry = default_registry()
    assert {"fsdp2", "megatron"} <= set(registry.engines())
    assert {"vllm", "sglang"} <= set(registry.servers())
    assert all(r.status == "ok" for r in registry.plugins() if r.name in {"fsdp2", "megatron", "vllm", "sglang"})
