"""Finds the installed plugins (entry-point group ``areal.plugins``) and routes hook calls.

A plugin whose entry point fails to import (or whose declaration hook raises) is kept as
"broken" with its error; every other plugin keeps working.
"""

from __future__ import annotations

import functools
import importlib.metadata
import traceback
from typing import Any, Iterable

import attrs
import pluggy

from areal_core import hookspecs
from areal_core.declarations import ENGINE, SERVER, BackendDeclaration
from areal_core.errors import UnhandledHookError
from areal_core.matrix import SupportMatrix, build_matrix


@attrs.frozen
class PluginRecord:
    """One entry point of the ``areal.plugins`` group, loaded or not."""

    name: str
    distribution: str
    version: str
    status: str  # "ok" or "broken"
    error: str = ""
    provides: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "status": self.status,
            "error": self.error,
            "provides": list(self.provides),
        }


def _one_line(exc: BaseException) -> str:
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


class Registry:
    """The installed plugins, their declarations, the support matrix and hook routing."""

    def __init__(self, entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
                 extra_plugins: Iterable[tuple[str, Any]] = ()):
        self.manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.manager.add_hookspecs(hookspecs)
        self._records: dict[str, PluginRecord] = {}
        self._declarations: dict[str, BackendDeclaration] = {}
        if entry_points is None:
            entry_points = importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP)
        for entry_point in sorted(entry_points, key=lambda ep: ep.name):
            self._load_entry_point(entry_point)
        for name, plugin in extra_plugins:
            self._register(name, plugin, distribution="", version="")

    def _load_entry_point(self, entry_point: importlib.metadata.EntryPoint) -> None:
        dist = entry_point.dist
        distribution = dist.metadata["Name"] if dist is not None else ""
        version = dist.version if dist is not None else ""
        try:
            plugin = entry_point.load()
        except BaseException as exc:  # a plugin must never take the others down
            if isinstance(exc, KeyboardInterrupt):
                raise
            self._records[entry_point.name] = PluginRecord(
                entry_point.name, distribution, version, "broken", _one_line(exc)
            )
            return
        self._register(entry_point.name, plugin, distribution, version)

    def _register(self, name: str, plugin: Any, distribution: str, version: str) -> None:
        try:
            self.manager.register(plugin, name=name)
            impl = getattr(plugin, "areal_declare_backends", None)
            declared = list(impl() or []) if impl is not None else []
            for declaration in declared:
                if not isinstance(declaration, BackendDeclaration):
                    raise TypeError(
                        f"areal_declare_backends returned {type(declaration).__name__}, "
                        f"not BackendDeclaration"
                    )
                if declaration.name in self._declarations:
                    other = self._declarations[declaration.name].plugin
                    raise ValueError(
                        f"backend {declaration.name!r} is already provided by plugin {other!r}"
                    )
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                raise
            if self.manager.is_registered(plugin):
                self.manager.unregister(plugin)
            self._records[name] = PluginRecord(name, distribution, version, "broken", _one_line(exc))
            return
        for declaration in declared:
            self._declarations[declaration.name] = attrs.evolve(declaration, plugin=name)
        self._records[name] = PluginRecord(
            name, distribution, version, "ok", provides=tuple(d.name for d in declared)
        )

    # --- what is installed ------------------------------------------------------------------

    def plugins(self) -> list[PluginRecord]:
        return [self._records[name] for name in sorted(self._records)]

    def declarations(self) -> list[BackendDeclaration]:
        return [self._declarations[name] for name in sorted(self._declarations)]

    def declaration(self, name: str) -> BackendDeclaration | None:
        return self._declarations.get(name)

    def engines(self) -> list[str]:
        return [d.name for d in self.declarations() if d.kind == ENGINE]

    def servers(self) -> list[str]:
        return [d.name for d in self.declarations() if d.kind == SERVER]

    # --- the support matrix -------------------------------------------------------------------

    @functools.cached_property
    def matrix(self) -> SupportMatrix:
        return build_matrix(self.declarations())

    def supports(self, engine: str, server: str) -> bool:
        return self.matrix.supports(engine, server)

    def why_not(self, engine: str, server: str) -> str:
        """Why the pair is not supported ("" when it is)."""
        return self.matrix.reason(engine, server)

    # --- hook routing -------------------------------------------------------------------------

    def call(self, hook: str, backend: str, **kwargs: Any) -> Any:
        """Call a firstresult hook for one backend; raise UnhandledHookError if none answers.

        Arguments added to a spec after it was first published (``OPTIONAL_HOOK_ARGUMENTS``) may
        be left out by a caller written before them; they are then passed as None.
        """
        caller = getattr(self.manager.hook, hook)
        for name in OPTIONAL_HOOK_ARGUMENTS.get(hook, ()):
            kwargs.setdefault(name, None)
        result = caller(backend=backend, **kwargs)
        if result is None:
            raise UnhandledHookError(hook, backend, sorted(self._declarations))
        return result

    def build_engine(self, backend: str, config) -> Any:
        return self.call("areal_build_engine", backend, config=config)

    def build_rollout_server(self, backend: str, config) -> Any:
        return self.call("areal_build_rollout_server", backend, config=config)


#: Spec arguments a caller may omit (None then): ``adapter_name`` came with several adapters.
OPTIONAL_HOOK_ARGUMENTS = {
    "areal_inject_adapter": ("adapter_name",),
    "areal_export_adapter": ("adapter_name",),
}


@functools.lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The registry of the plugins installed in this environment (loaded once per process)."""
    return Registry()
