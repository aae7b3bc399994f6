"""Adapter version names and their lifetime on a server.

A rollout is produced by the adapter named ``<lora_name>-v<N>``. Names are never loaded twice,
versions only go up, and a version is unloaded once it is older than the staleness window and
no request in flight uses it. One ``AdapterVersions`` per server client, owned by rank 0.
"""

from __future__ import annotations

import re
import threading

from areal_core.errors import ArealError

_VERSION_NAME = re.compile(r"^(?P<adapter>.+)-v(?P<version>[0-9]+)$")


def version_name(lora_name: str, version: int) -> str:
    return f"{lora_name}-v{version}"


def parse_version_name(name: str) -> tuple[str, int]:
    """``(adapter, version)`` of a version name ``<adapter>-v<N>``; the inverse of ``version_name``.

    The last ``-v<digits>`` is the version, so an adapter name may itself contain ``-v``
    (``a-v1-v2`` is version 2 of ``a-v1``).

    :raises ValueError: ``name`` does not end in ``-v<N>`` after a non-empty adapter name.
    """
    match = _VERSION_NAME.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not an adapter version name <adapter>-v<N>")
    return match["adapter"], int(match["version"])


def live_versions_needed(max_head_offpolicyness: int) -> int:
    """How many versions may be live at once: the current one, K behind, one being loaded."""
    return max_head_offpolicyness + 2


class AdapterVersions:
    """Thread-safe bookkeeping of which versions a server holds and which are in use."""

    def __init__(self, lora_name: str, window: int):
        if window < 0:
            raise ValueError("window must be >= 0")
        self.lora_name = lora_name
        self.window = window
        self._lock = threading.Lock()
        self._ever_loaded: set[str] = set()
        self._loaded: dict[int, str] = {}
        self._in_flight: dict[int, int] = {}

    def name(self, version: int) -> str:
        return version_name(self.lora_name, version)

    @property
    def latest(self) -> int | None:
        with self._lock:
            return max(self._loaded) if self._loaded else None

    def loaded(self) -> dict[int, str]:
        with self._lock:
            return dict(self._loaded)

    def reserve(self, version: int) -> str:
        """The name to load ``version`` under; refuses a name used before or a version going back."""
        name = self.name(version)
        with self._lock:
            if name in self._ever_loaded:
                raise ArealError(f"adapter name {name} was loaded before; names are never reused")
            if self._loaded and version <= max(self._loaded):
                raise ArealError(
                    f"version {version} is not newer than the live version {max(self._loaded)}"
                )
            self._ever_loaded.add(name)
        return name

    def adopt_existing(self, names) -> None:
        """Record names a server already holds (a server given by address, after a resume)."""
        with self._lock:
            self._ever_loaded.update(names)

    def confirm(self, version: int) -> None:
        with self._lock:
            self._loaded[version] = self.name(version)

    def acquire(self, version: int) -> str:
        """Mark a request in flight on ``version``; returns its name. Pair with ``release``."""
        with self._lock:
            if version not in self._loaded:
                raise ArealError(f"version {self.name(version)} is not loaded")
            self._in_flight[version] = self._in_flight.get(version, 0) + 1
            return self._loaded[version]

    def release(self, version: int) -> None:
        with self._lock:
            self._in_flight[version] -= 1
            if not self._in_flight[version]:
                del self._in_flight[version]

    def stale(self) -> list[str]:
        """Names older than the window behind the latest version and unused by requests."""
        with self._lock:
            if not self._loaded:
                return []
            oldest_kept = max(self._loaded) - self.window
            return [
                name
                for version, name in sorted(self._loaded.items())
                if version < oldest_kept and not self._in_flight.get(version)
            ]

    def retire(self, name: str) -> bool:
        """Forget ``name`` unless a request in flight uses it; True when forgotten (or unknown).

        Atomic, unlike ``stale``/``forget``: a caller that unloads after ``retire`` returned
        True knows no ``acquire`` can still hand the name out.
        """
        with self._lock:
            for version, loaded_name in list(self._loaded.items()):
                if loaded_name == name:
                    if self._in_flight.get(version):
                        return False
                    del self._loaded[version]
            return True

    def forget(self, name: str) -> None:
        """Record that ``name`` was unloaded."""
        with self._lock:
            for version, loaded_name in list(self._loaded.items()):
                if loaded_name == name:
                    del self._loaded[version]
