"""The errors areal raises, each naming what is wrong and how to fix it."""

from __future__ import annotations

import attrs


class ArealError(Exception):
    """Base class of every error areal raises on purpose."""


@attrs.frozen
class ConfigError:
    """One problem with the configuration: the key, the bad value and the fix."""

    key: str
    value: object
    problem: str
    fix: str = ""

    def __str__(self) -> str:
        text = f"{self.key}: {self.problem} (got {self.value!r})"
        return f"{text}; fix: {self.fix}" if self.fix else text


class ConfigInvalid(ArealError):
    """Raised when a configuration has one or more ``ConfigError``; lists them all."""

    def __init__(self, errors: list[ConfigError]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"{len(self.errors)} configuration error(s):\n{lines}")


class UnhandledHookError(ArealError):
    """No installed plugin answered a hook for the named backend."""

    def __init__(self, hook: str, backend: str, installed: list[str]):
        self.hook, self.backend, self.installed = hook, backend, installed
        names = ", ".join(installed) or "none"
        super().__init__(
            f"no installed plugin implements {hook} for backend {backend!r} "
            f"(installed backends: {names}); install the plugin that provides {backend!r} "
            f"or choose one of the installed backends"
        )


class AdapterError(ArealError):
    """An adapter cannot be injected, exported or read (bad target modules, bad files, ...)."""


class AdapterLoadError(ArealError):
    """A rollout server refused to load an adapter; carries the server's own message."""


class ServerUnreachableError(ArealError):
    """A rollout server did not answer within the bounded retries."""


class AgreementError(ArealError):
    """The server's log-probabilities disagree with the trainer's beyond the tolerance."""
