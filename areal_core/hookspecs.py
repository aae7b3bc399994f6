"""The plugin author's manual: every hook areal calls, when, with what, and what it expects back.

A plugin is a module (or object) named by an entry point in the group ``areal.plugins``::

    [project.entry-points."areal.plugins"]
    myengine = "my_package.areal_plugin"

Its functions are marked with ``areal_core.hookimpl`` and named after the specs below. pluggy
calls them with keyword arguments and passes only the arguments an implementation names, so a
hook implementation may take fewer arguments than its spec (but never other ones).

Routing: except for ``areal_declare_backends``, every hook gets the name of the backend it is
called for (``backend``) and is ``firstresult``: an implementation returns None for a backend
that is not its own, and the first non-None answer wins. Always start an implementation with
``if backend != "mine": return None``. The core calls these hooks through
``areal_core.registry.Registry.call`` which raises ``UnhandledHookError`` (naming the backend and
the installed ones) when no implementation answers.

Wrapping another plugin's step: implement the same hook with
``@hookimpl(wrapper=True)`` (a generator: code before ``yield`` runs first, ``result = yield``
receives the wrapped step's answer, and what you return replaces it), or with
``@hookimpl(tryfirst=True)`` to answer before the owner does.

Several adapters on one base (``adapters:``): the core injects each adapter with its own
``areal_inject_adapter`` call, naming it in ``adapter_name`` (its ``actor`` carries that adapter's
rank, alpha, target modules and optimizer), shards once, and names the adapter in every
``areal_export_adapter`` call and in ``Engine.compute_logprobs``/``Engine.train_step``
(``adapter=``). Servers need no new argument: a version name ``<adapter>-v<N>`` says which adapter
it is. A backend declares that it handles several adapters with ``LoraSupport.multi_adapter``; the
core refuses a list of more than one for a pair where either side does not, before anything
starts. A backend written for one adapter needs no change: an implementation that does not name
``adapter_name`` is not given it, and a one-adapter run never passes ``adapter=``.

Keep the module an entry point names light: the registry imports it to list plugins and build
the support matrix, and ``areal plugins``/``areal matrix`` must not import torch. Import your
runtime inside the hook bodies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    from areal_core.config import ActorConfig, RunConfig
    from areal_core.declarations import BackendDeclaration
    from areal_core.interfaces import Engine, ExportedAdapter, RolloutServer

PROJECT_NAME = "areal"
ENTRY_POINT_GROUP = "areal.plugins"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def areal_declare_backends() -> list[BackendDeclaration]:
    """Declare the engines and servers this plugin provides and their LoRA capabilities.

    Called once when the registry loads, by ``areal plugins``, ``areal matrix``, ``areal check``
    and before every run. Must be cheap: build ``BackendDeclaration`` objects from constants, import
    no runtime. A backend whose LoRA code does not exist yet declares
    ``LoraStatus.NOT_IMPLEMENTED``; one that cannot do LoRA at all declares
    ``LoraStatus.UNSUPPORTED`` with the reason. Every plugin's answer is collected (not firstresult).

    :return: a list of declarations (may be empty).
    """


@hookspec(firstresult=True)
def areal_build_engine(backend: str, config: RunConfig) -> Engine | None:
    """Build the training engine named ``backend`` for this rank.

    Called on every training rank after ``torch.distributed`` is initialised (or not at all when
    world size is 1 and the engine needs no process group), before the model is loaded. The
    engine reads ``config.actor``. Return None when ``backend`` is not yours.

    :return: an object satisfying ``areal_core.interfaces.Engine``.
    """


@hookspec(firstresult=True)
def areal_build_rollout_server(backend: str, config: RunConfig) -> RolloutServer | None:
    """Build the rollout server client named ``backend`` (rank 0 only). Not started yet.

    It reads ``config.rollout`` (addresses, or what to launch), ``config.actor`` (base model path,
    LoRA rank and target modules, which decide the server's start-up flags) and ``config.gconfig``.
    Return None when ``backend`` is not yours.

    :return: an object satisfying ``areal_core.interfaces.RolloutServer``.
    """


@hookspec(firstresult=True)
def areal_validate_config(backend: str, config: RunConfig) -> list[Any] | None:
    """Backend-specific configuration checks, run by ``areal check`` and before every run.

    Called for the chosen engine and for the chosen server, before anything heavy happens: do not
    load models or start processes here (reading a model's ``config.json`` is fine). Return a list
    of ``areal_core.errors.ConfigError`` (empty when all is well), or None when ``backend`` is not
    yours.
    """


# --- the four LoRA steps -------------------------------------------------------------------


@hookspec(firstresult=True)
def areal_inject_adapter(backend: str, engine: Engine, actor: ActorConfig,
                         adapter_name: str) -> Engine | None:
    """Wrap the engine's model's target modules with LoRA (step 1 of 4).

    Called on every rank after ``engine.load_base_model()``, once per adapter of the run in the
    order listed; ``adapter_name`` names the adapter (``gconfig.lora_name`` for a run without
    ``adapters:``). Each adapter has its own parameters, initialised from ``train.seed`` and its
    position in the list, and its own optimizer, built by ``areal_shard_model``. ``actor`` carries ``lora_rank``,
    ``lora_alpha``, ``target_modules`` (``["all-linear"]`` or short module names) and
    ``peft_type``. Must refuse target modules that match nothing (listing the model's linear
    modules), peft types other than ``lora``, and models it cannot adapt (for example
    mixture-of-experts), raising ``areal_core.errors.AdapterError``. Every rank must end with the
    same initial adapter (seeded, or broadcast from rank 0).

    :return: the engine (adapted in place), or None when ``backend`` is not yours.
    """


@hookspec(firstresult=True)
def areal_shard_model(backend: str, engine: Engine, actor: ActorConfig) -> Engine | None:
    """Shard the adapted model over the training ranks (step 2 of 4) and build its optimizer.

    Called on every rank once, after every adapter's ``areal_inject_adapter``, with the first
    adapter's ``actor``. One optimizer per adapter, each over that adapter's parameters with that
    adapter's ``actor.optimizer`` (the ``actor`` its injection was given). FSDP2 applies ``fully_shard``; Megatron
    has already split its layers by tensor parallelism and wires data parallelism here. The
    optimizer covers the trainable parameters only.

    :return: the engine, or None when ``backend`` is not yours.
    """


@hookspec(firstresult=True)
def areal_export_adapter(
    backend: str, engine: Engine, directory: str, version: int, adapter_name: str
) -> ExportedAdapter | None:
    """Gather the adapter from the shards and write it in the interchange format (step 3 of 4).

    ``adapter_name`` says which of the run's adapters (as injected); the directory holds that
    one only (``adapters/<name>/v<N>`` for a run with ``adapters:``).

    Called collectively on every rank; only the adapter is gathered (never the full model).
    Rank 0 writes the PEFT LoRA directory ``directory`` atomically (temporary directory, then
    rename; see ``areal_core.adapter_format``) in HF module naming. Every rank returns the same
    ``ExportedAdapter`` describing it (path, version, rank, alpha, target modules, bytes,
    seconds).

    :return: an ``ExportedAdapter``, or None when ``backend`` is not yours.
    """


@hookspec(firstresult=True)
def areal_load_rollout_adapter(
    backend: str, server: RolloutServer, adapter: ExportedAdapter, lora_name: str
) -> str | None:
    """Make an exported adapter live on the inference server (step 4 of 4). Rank 0 only.

    ``lora_name`` is the version name ``<adapter>-v<N>`` (``<gconfig.lora_name>-v<N>`` without
    ``adapters:``); the core never passes a name twice. With several adapters the server holds
    every adapter's live versions at once, each adapter's numbered on their own. The implementation loads the directory (``adapter.path``) and confirms the
    server lists the name before returning. On refusal it raises
    ``areal_core.errors.AdapterLoadError`` with the server's message, leaving the versions
    already loaded serving.

    :return: the name now live (``lora_name``), or None when ``backend`` is not yours.
    """
