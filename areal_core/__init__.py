"""areal_core: LoRA fine-tuning for reinforcement learning of LLMs, with pluggable backends.

The Python API of the support matrix (no torch is imported)::

    import areal_core
    areal_core.engines()                  # ["fsdp2", "megatron", ...]
    areal_core.servers()                  # ["sglang", "vllm", ...]
    areal_core.supports("fsdp2", "vllm")  # True / False
    areal_core.why_not("megatron", "sglang")
    areal_core.support_matrix().to_dict()
"""

from areal_core.hookspecs import hookimpl

__version__ = "0.1.0"
__all__ = ["hookimpl", "engines", "servers", "supports", "why_not", "support_matrix", "plugins"]


def _registry():
    from areal_core.registry import default_registry

    return default_registry()


def engines() -> list[str]:
    """Names of the installed training engines."""
    return _registry().engines()


def servers() -> list[str]:
    """Names of the installed inference servers."""
    return _registry().servers()


def supports(engine: str, server: str) -> bool:
    """Whether LoRA training on ``engine`` with rollouts on ``server`` is supported."""
    return _registry().supports(engine, server)


def why_not(engine: str, server: str) -> str:
    """The reason a pair is not supported, in words a user can act on ("" when it is)."""
    return _registry().why_not(engine, server)


def support_matrix():
    """The whole matrix: ``.engines``, ``.servers``, ``.cells``, ``.to_dict()``, ``.to_markdown()``."""
    return _registry().matrix


def plugins():
    """The installed plugins (``PluginRecord``: name, distribution, version, status, error)."""
    return _registry().plugins()
