"""The two objects the GRPO loop drives: a training engine and a rollout server.

Plugins hand these out through the ``areal_build_engine`` and ``areal_build_rollout_server``
hooks. The four LoRA steps (inject, shard, export, load) are hooks of their own
(``areal_core.hookspecs``) that receive these objects, so a third-party plugin can wrap any step.

Process model: ``areal train`` runs every training rank as the same program (SPMD, as torchrun
does). Every rank builds its own engine and calls the engine methods collectively, in the same
order. Only rank 0 builds and talks to the rollout server; it broadcasts what the other ranks need.

This module imports no torch: tensors appear only in type hints.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, runtime_checkable

import attrs

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from areal_core.config import RunConfig


@attrs.frozen
class ExportedAdapter:
    """An adapter written in the interchange format (a PEFT LoRA directory), ready to load.

    ``path`` is an absolute directory a server can read; ``version`` the adapter version it holds;
    ``rank``, ``alpha`` and ``target_modules`` (short module names, sorted) what its
    ``adapter_config.json`` says; ``num_bytes`` the size of its tensors file; ``seconds`` how long
    the export took (gather + write).
    """

    path: str
    version: int
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    num_bytes: int = 0
    seconds: float = 0.0


@attrs.frozen
class SamplingParams:
    """Sampling settings of one generate call. ``top_k <= 0`` and ``top_p == 1`` mean off.

    ``seed`` (None: unseeded) makes a call reproducible: a server seeds prompt i of the call with
    ``seed + i``, so the same call against the same weights gives the same samples.
    ``temperature == 0`` means greedy decoding. ``ignore_eos``: the model's eos token does not
    stop a completion (``stop_token_ids`` still do), so it runs to ``max_new_tokens``.
    """

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False


@attrs.frozen
class Sample:
    """One generated completion.

    ``output_ids`` are the generated token ids (the prompt excluded), ``logprobs`` the
    log-probability the server's policy gave each of them, ``version`` the adapter version
    (its number) that produced every one of these tokens, ``finish_reason`` "stop" or "length".
    """

    prompt_ids: tuple[int, ...]
    output_ids: tuple[int, ...]
    logprobs: tuple[float, ...]
    version: int
    finish_reason: str = ""


#: A loss function the loop hands to ``Engine.train_step``. It receives the per-token
#: log-probabilities of one micro-batch (a list of 1-D tensors, one per sequence, element t is
#: log p(token t+1 | tokens 0..t)) and the indices of those sequences in the caller's batch, and
#: returns ``(loss, metrics)``: a scalar tensor already normalised by the caller's global
#: normaliser (so the micro-batch losses of all ranks add up to the batch loss), and a dict of
#: floats to sum over micro-batches.
LossFn = Callable[[list["torch.Tensor"], list[int]], "tuple[torch.Tensor, dict[str, float]]"]


@runtime_checkable
class Engine(Protocol):
    """The training side. Built by ``areal_build_engine(name, config)`` on every rank.

    Lifecycle, driven by the loop: ``load_base_model()``, then the hooks
    ``areal_inject_adapter`` and ``areal_shard_model`` (which set up the optimizer over the
    trainable parameters), then any number of ``compute_logprobs``/``train_step`` calls and
    ``areal_export_adapter`` hooks, ``save_checkpoint``/``load_checkpoint``, and ``close()``.
    Every method is collective: all ranks call it in the same order with their own data.
    """

    name: str
    rank: int
    world_size: int

    def load_base_model(self) -> None:
        """Load the base model from ``config.actor.path`` (a local HF directory)."""

    def compute_logprobs(
        self, sequences: Sequence[Sequence[int]], *, disable_adapter: bool = False,
        adapter: str | None = None,
    ) -> list["torch.Tensor"]:
        """Per-token log-probabilities of each sequence under the current policy.

        ``adapter`` names which of several injected adapters is the policy; a one-adapter run
        never passes it (None: the only adapter).

        Returns one float32 CPU tensor of length ``len(seq) - 1`` per sequence. With
        ``disable_adapter=True`` the adapter is bypassed: the base model's log-probabilities,
        for a KL term without a second model in memory. No gradients are kept.
        """

    def train_step(self, sequences: Sequence[Sequence[int]], loss_fn: LossFn,
                   adapter: str | None = None) -> dict[str, float]:
        """One optimisation step on this rank's ``sequences``.

        ``adapter`` (None: the only one) names the adapter trained: only its parameters get a
        gradient, clipped on their own and stepped by its own optimizer at its own rate; the
        other adapters are untouched. k below counts that adapter's steps.

        The engine splits them into micro-batches by its token budget, calls ``loss_fn`` on each,
        back-propagates, makes the gradient that of the sum of all ranks' losses, clips it and
        steps the optimizer, at the rate ``areal_core.lr_schedule.learning_rate`` gives its k-th
        step (k counts this engine's steps, checkpoint included). A NaN or infinite gradient
        norm on any rank skips the update on every rank (weights and optimizer state unchanged;
        the step still counts). Returns at least ``grad_norm``, ``lr`` (the rate of this step)
        and the summed metrics, and ``update_skipped`` (1.0 when skipped) where it can skip.
        """

    def save_checkpoint(self, directory: str) -> None:
        """Write every adapter with its optimizer state and step count, and the RNG state, to
        ``directory`` atomically."""

    def load_checkpoint(self, directory: str) -> None:
        """Restore what ``save_checkpoint`` wrote."""

    def close(self) -> None:
        """Release the process group resources the engine owns (not the group itself)."""


@runtime_checkable
class RolloutServer(Protocol):
    """The inference side. Built by ``areal_build_rollout_server(name, config)`` on rank 0 only.

    ``start()`` launches and owns servers (``rollout.servers`` empty) or connects to the given
    addresses; ``stop()`` stops what it launched. Adapters are made live through the
    ``areal_load_rollout_adapter`` hook, which calls ``load_adapter``; the core's version
    bookkeeping (``areal_core.versions``) decides names and what to unload.
    """

    name: str

    def start(self) -> None:
        """Launch or connect; returns once every server answers its health check."""

    def load_adapter(self, adapter: ExportedAdapter, lora_name: str) -> None:
        """Make ``adapter`` live under ``lora_name`` and confirm the server lists it.

        ``lora_name`` is ``<adapter>-v<N>``; a server that declares ``LoraSupport.multi_adapter``
        holds the live versions of every adapter of the run at once, and a generate call may run
        beside calls naming other adapters (the server batches them together).

        Raises ``areal_core.errors.AdapterLoadError`` with the server's message on refusal;
        the adapters already loaded keep serving.
        """

    def unload_adapter(self, lora_name: str) -> None:
        """Unload a version no request uses any more."""

    def loaded_adapters(self) -> list[str]:
        """The adapter names the server(s) list right now."""

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        lora_name: str,
        version: int,
        n: int,
        sampling: SamplingParams,
    ) -> list[list[Sample]]:
        """``n`` samples for each token-id prompt, every request naming ``lora_name``.

        Returns one list of ``n`` samples per prompt, each tagged with ``version``. Requests are
        sent concurrently with a bound.
        """

    def prompt_logprobs(self, token_ids: Sequence[int], *, lora_name: str) -> list[float]:
        """Log-probabilities of ``token_ids[1:]`` given their prefixes, under ``lora_name``.

        Used by the agreement check against the trainer's log-probabilities.
        """

    def stop(self) -> None:
        """Stop the servers this object launched (with their children); idempotent."""


EngineFactory = Callable[[str, "RunConfig"], Any]
