"""The fsdp2 training engine: one object per rank, driven collectively by the GRPO loop.

Lifecycle: ``load_base_model`` -> ``inject_adapter`` (hook ``areal_inject_adapter``, once per
adapter) -> ``shard`` (hook ``areal_shard_model``, which also builds one AdamW per adapter) -> any
number of ``compute_logprobs`` / ``train_step`` / export / checkpoint calls -> ``close``.

Several adapters on one frozen base: each is its own peft adapter with its own parameters,
AdamW, learning-rate schedule position (its own step count) and gradient clipping. Every
adapter's parameters stay trainable; a call names its adapter (``adapter=``) and the forward is
routed through that one only, so only its parameters get a gradient (``lora_injection.route``).
One adapter per ``train_step``: the measured alternative, rows of several adapters mixed in one
micro-batch, was not faster (``bench/multi_adapter_microbatch.py``).

Every rank calls every method with its OWN sequences, and counts may differ: FSDP2 forwards and
backwards are collectives, so each call first agrees on the largest number of micro-batches
of any rank, and a rank with fewer runs zero-weight dummy micro-batches. Errors found on one
rank (bad token ids, a failing loss function) are raised on every rank at the same point.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule

from areal_core.config import ActorConfig, RunConfig
from areal_core.errors import AdapterError, ArealError
from areal_core.host_allocator import return_freed_tensors_to_the_system
from areal_core.interfaces import LossFn
from areal_core.lr_schedule import learning_rate, total_optimizer_steps
from areal_core.microbatching import plan_microbatches

from areal_fsdp2 import (
    checkpoint, distributed, logprob_head, lora_injection, model_loading, optimizer, parallelize,
    sharded_loading,
)
from areal_fsdp2.logprob_head import LogprobHead
from areal_fsdp2.logprobs import forward_logits, sequence_logprobs
from areal_fsdp2.microbatching import sequence_problem


class AdapterSlot:
    """One adapter of the engine: its peft name, settings, parameters, optimizer and step count."""

    def __init__(self, name: str, peft_name: str | None, actor: ActorConfig, position: int):
        self.name = name  # the run's name of it (``adapter=``, ``adapter_name``)
        self.peft_name = peft_name  # its name inside the peft model; None under full fine-tuning
        self.actor = actor  # its LoRA settings and its optimizer
        self.position = position
        self.parameter_names: list[str] = []  # its trainable parameters (names survive FSDP2)
        self.parameters: list[torch.nn.Parameter] = []  # the sharded parameters, after shard()
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0  # its optimizer steps taken (restored by load_checkpoint)


class FSDP2Engine:
    """Hugging Face causal LM + peft LoRA, sharded with FSDP2, on CPU (gloo) or CUDA (nccl).

    Built on every rank. When ``torch.distributed`` is not initialised it starts a
    one-process group itself (and destroys it on ``close``).
    """

    name = "fsdp2"

    def __init__(self, config: RunConfig):
        self.config = config
        self.actor: ActorConfig = config.actor
        kind = distributed.device_type(self.actor.device)
        if kind == "cpu" and self.actor.release_freed_tensors:
            return_freed_tensors_to_the_system()
        self._owns_process_group = distributed.ensure_process_group(kind)
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = distributed.rank_device(kind)
        self.model: torch.nn.Module | None = None  # the peft wrapper, or the HF model (full FT)
        self.hf_model: torch.nn.Module | None = None  # the transformers model inside it
        self.adapters: dict[str, AdapterSlot] = {}  # in the order injected
        self.logprob_head: LogprobHead | None = None  # None: log-probs from whole logits
        self._checkpoint = None  # set while the base model waits on meta for its shards
        self.step = 0  # train_step calls completed, all adapters together (restored by load_checkpoint)
        self.stage = "built"  # built -> loaded -> adapted -> sharded -> closed
        self.vocab_size = 0
        self.pad_id = 0

    # --- lifecycle ---------------------------------------------------------------------------

    def _require_stage(self, stage: str, what: str, before: str) -> None:
        if self.stage != stage:
            raise ArealError(f"cannot {what}: the fsdp2 engine is {self.stage}; {before} first")

    def require_sharded(self, what: str) -> None:
        self._require_stage(
            "sharded", what, "run load_base_model, areal_inject_adapter and areal_shard_model"
        )

    def load_base_model(self) -> None:
        """Load ``actor.path`` (local safetensors) in ``actor.dtype``.

        Where the checkpoint can be read row by row, the model is only built here (parameters
        on the meta device) and each rank reads its own shards after sharding
        (``sharded_loading``); otherwise every rank loads the whole model on the CPU.
        """
        self._require_stage("built", "load the base model", "build a new engine")
        self.hf_model, self._checkpoint = model_loading.load_causal_lm(self.actor)
        self.model = self.hf_model
        self.vocab_size = self.hf_model.get_input_embeddings().num_embeddings
        pad_id = getattr(self.hf_model.config, "pad_token_id", None)
        self.pad_id = pad_id if isinstance(pad_id, int) and 0 <= pad_id < self.vocab_size else 0
        self.stage = "loaded"

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the only adapter (None before sharding or with several adapters)."""
        return next(iter(self.adapters.values())).optimizer if len(self.adapters) == 1 else None

    def _peft_name(self, name: str, position: int) -> str:
        """The peft name of a new adapter: "default" for a run's only adapter (a run without
        ``adapters:``, as its checkpoints and exports have always named it), else its own name."""
        if position == 0 and not self.config.adapters:
            return lora_injection.ADAPTER_NAME
        if not name or "." in name or name in {s.peft_name for s in self.adapters.values()}:
            raise AdapterError(
                f"adapter name {name!r} cannot name a peft adapter beside "
                f"{[s.peft_name for s in self.adapters.values()]}: use a non-empty name without '.' "
                f"that no other adapter has"
            )
        return name

    def inject_adapter(self, actor: ActorConfig, adapter_name: str | None = None) -> None:
        """Wrap the target modules with LoRA adapter ``adapter_name`` (or make everything
        trainable: full fine-tuning). Called once per adapter; None names the run's only adapter
        (``gconfig.lora_name``)."""
        position = len(self.adapters)
        if position == 0:
            self._require_stage("loaded", "inject the adapter", "run load_base_model")
        else:
            self._require_stage("adapted", "inject another adapter", "run load_base_model")
        if adapter_name is None:
            if position:
                raise AdapterError(
                    f"a second adapter needs a name (adapter_name); the engine holds {list(self.adapters)}"
                )
            adapter_name = self.config.gconfig.lora_name
        if adapter_name in self.adapters:
            raise AdapterError(f"adapter {adapter_name!r} is injected already; each adapter is injected once")
        if actor.full_finetune or (position and self.actor.full_finetune):
            if position:
                raise AdapterError(
                    "actor.full_finetune trains every parameter with no adapter, so there is one "
                    "model to train and no second adapter; set actor.full_finetune: false"
                )
            self.actor = actor
            self.model = lora_injection.make_all_trainable(self.hf_model)
            self.adapters[adapter_name] = AdapterSlot(adapter_name, None, actor, 0)
            self.stage = "adapted"
            return
        peft_name = self._peft_name(adapter_name, position)
        seed = lora_injection.adapter_seed(self.config.train.seed, position)
        self.model = lora_injection.inject_lora(
            self.model if position else self.hf_model, actor, seed=seed, adapter_name=peft_name
        )
        if self._checkpoint is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                sharded_loading.materialise_meta_adapter(self.model, peft_name)
        slot = AdapterSlot(adapter_name, peft_name, actor, position)
        slot.parameter_names = lora_injection.adapter_parameter_names(self.model, peft_name)
        lora_injection.broadcast_trainable_from_rank0(self.model, self.device, slot.parameter_names)
        self.adapters[adapter_name] = slot
        lora_injection.make_adapters_trainable(self.model, [s.peft_name for s in self.adapters.values()])
        lora_injection.route(self.model, next(iter(self.adapters.values())).peft_name)
        if position == 0:
            self.actor = actor
        self.stage = "adapted"

    def shard(self, actor: ActorConfig) -> None:
        """Apply FSDP2 over all ranks and build one AdamW per adapter over its parameters.

        ``actor`` (the first adapter's) gives the engine's settings; each adapter's optimizer
        settings are those of the ``actor`` its injection was given.
        """
        self._require_stage("adapted", "shard the model", "run areal_inject_adapter")
        self.actor = actor
        if len(self.adapters) == 1:  # a run's only adapter: the actor given here, as always
            next(iter(self.adapters.values())).actor = actor
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        # Before sharding, so FSDP2 knows the head as an owner of the (possibly tied) weight.
        self.logprob_head = logprob_head.install(
            self.hf_model, recompute=actor.gradient_checkpointing
        )
        loader = None
        if self._checkpoint is not None:
            loader = sharded_loading.MetaShardLoader(self.model, self.hf_model, self._checkpoint)
        parallelize.shard_model(self.model, self.hf_model, actor, mesh)
        if loader is not None:
            loader.load(self.device)
            self._checkpoint = None
        named = dict(self.model.named_parameters())
        for slot in self.adapters.values():
            if slot.peft_name is None:  # full fine-tuning
                slot.parameters = optimizer.trainable_parameters(self.model)
                slot.parameter_names = [n for n, p in named.items() if p.requires_grad]
            else:
                slot.parameters = [named[name] for name in slot.parameter_names]
            slot.optimizer = optimizer.adamw(slot.parameters, slot.actor.optimizer)
        self.stage = "sharded"

    def reshard(self) -> None:
        """Free gathered root parameters (left gathered after a forward without backward)."""
        if isinstance(self.model, FSDPModule):
            self.model.reshard()

    def close(self) -> None:
        """Drop the model and optimizer; destroy the process group if this engine created it."""
        if self.stage == "closed":
            return
        self.model = self.hf_model = None
        self.adapters = {}
        self.stage = "closed"
        if self._owns_process_group and dist.is_initialized():
            dist.destroy_process_group()

    # --- micro-batch schedule ----------------------------------------------------------------

    def _schedule(self, sequences: Sequence[Sequence[int]]) -> tuple[list[list[int]], int]:
        """This rank's micro-batches and the largest count of any rank (collective).

        Raises on every rank when any rank's sequences are unusable.
        """
        problem = sequence_problem(sequences, self.vocab_size)
        plan = [] if problem else plan_microbatches(
            [len(s) for s in sequences], self.actor.max_tokens_per_microbatch
        )
        answers = distributed.gather_objects((len(plan), problem))
        failing = [(rank, error) for rank, (_, error) in enumerate(answers) if error]
        if failing:
            rank, error = failing[0]
            raise ArealError(f"bad sequences on rank {rank}: {error}")
        return plan, max(count for count, _ in answers)

    def _dummy_sequence(self) -> list[list[int]]:
        return [[self.pad_id, self.pad_id]]

    def slot(self, adapter: str | None) -> AdapterSlot:
        """The adapter named ``adapter``; None: the only one (an error when there are several)."""
        if adapter is None:
            if len(self.adapters) != 1:
                raise AdapterError(
                    f"the fsdp2 engine holds {len(self.adapters)} adapters {list(self.adapters)}: "
                    f"name the one meant with adapter="
                )
            return next(iter(self.adapters.values()))
        if adapter not in self.adapters:
            raise AdapterError(f"no adapter {adapter!r} in the fsdp2 engine; it holds {list(self.adapters)}")
        return self.adapters[adapter]

    def _adapter_context(self, disable_adapter: bool, adapter: str | None):
        """Route the forward through ``adapter`` (or through none: the base model)."""
        if disable_adapter:
            if self.actor.full_finetune:
                raise AdapterError(
                    "disable_adapter=True needs a LoRA adapter; with actor.full_finetune there is no "
                    "frozen base model to fall back to"
                )
            if adapter is not None:
                self.slot(adapter)  # a misspelt name is still an error
            return lora_injection.adapters_disabled(self.model)
        self._use(self.slot(adapter))
        return contextlib.nullcontext()

    def _use(self, slot: AdapterSlot) -> None:
        if slot.peft_name is not None:
            lora_injection.route(self.model, slot.peft_name)

    # --- training calls ----------------------------------------------------------------------

    def _inference(self, sequences, disable_adapter: bool, adapter: str | None, per_batch) -> list[torch.Tensor]:
        """``per_batch(batch) -> one tensor per sequence`` over every micro-batch, no gradient.

        Collective (dummy micro-batches fill up to the largest count of any rank); results are
        float32 CPU tensors in the order of ``sequences``.
        """
        context = self._adapter_context(disable_adapter, adapter)
        plan, count = self._schedule(sequences)
        results: list[torch.Tensor | None] = [None] * len(sequences)
        self.model.eval()
        with torch.no_grad(), context:
            for index in range(count):
                if index >= len(plan):
                    per_batch(self._dummy_sequence())
                    continue
                rows = per_batch([sequences[i] for i in plan[index]])
                for i, row in zip(plan[index], rows):
                    results[i] = row.float().cpu()
        self.reshard()
        return results

    def compute_logprobs(
        self, sequences: Sequence[Sequence[int]], *, disable_adapter: bool = False,
        adapter: str | None = None,
    ) -> list[torch.Tensor]:
        """Per-token log-probabilities (float32, CPU, length ``len(seq) - 1``) of each sequence
        under ``adapter`` (None: the only adapter; with several, an error).

        ``disable_adapter=True`` gives the base model's, from the same sharded model.
        """
        self.require_sharded("compute log-probabilities")
        return self._inference(
            sequences, disable_adapter, adapter,
            lambda batch: sequence_logprobs(self.model, batch, self.pad_id, self.device, self.logprob_head),
        )

    def forward_logits(
        self, sequences: Sequence[Sequence[int]], *, disable_adapter: bool = False,
        adapter: str | None = None,
    ) -> list[torch.Tensor]:
        """The logits ``[len(seq), vocab]`` (float32, CPU) of each sequence (collective).

        A diagnostic beside the ``Engine`` protocol, for comparing with other implementations.
        """
        self.require_sharded("compute logits")

        def per_batch(batch):
            logits = forward_logits(self.model, batch, self.pad_id, self.device)
            return [logits[row, : len(sequence)] for row, sequence in enumerate(batch)]

        return self._inference(sequences, disable_adapter, adapter, per_batch)

    def _run_loss(self, loss_fn: LossFn, logprobs: list[torch.Tensor], indices: list[int]):
        """``(loss, metrics)`` of one micro-batch; raises ArealError for a malformed answer."""
        answer = loss_fn(logprobs, indices)
        loss, metrics = answer if isinstance(answer, tuple) else (answer, {})
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ArealError(f"loss_fn must return a scalar tensor as its loss, not {type(loss).__name__}")
        if not loss.requires_grad:
            raise ArealError(
                "loss_fn returned a loss without gradient: build it from the log-probabilities it is given"
            )
        return loss.reshape(()), {key: float(value) for key, value in dict(metrics or {}).items()}

    def train_step(self, sequences: Sequence[Sequence[int]], loss_fn: LossFn,
                   adapter: str | None = None) -> dict[str, float]:
        """One AdamW step of ``adapter`` (None: the only adapter; with several, an error) on the
        sum over ranks and micro-batches of ``loss_fn``'s losses.

        Only that adapter's parameters get a gradient (the forward runs through it alone); they
        are clipped on their own (its ``grad_clip``) and stepped by its AdamW at the rate of its
        own k-th step. The other adapters are untouched.

        Returns, for THIS rank (the loop sums over ranks itself): ``loss`` and ``loss_fn``'s
        metrics summed over this rank's micro-batches, ``num_sequences``, ``num_tokens`` and
        ``dummy_microbatches`` (zero-weight fillers); and, the same on every rank: the global
        ``grad_norm`` before clipping, ``lr``, ``num_microbatches`` (run by every rank, after
        equalising) and ``update_skipped`` (1 when the gradient norm was not finite and no
        step was taken).
        """
        self.require_sharded("train")
        if not callable(loss_fn):
            raise ArealError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        slot = self.slot(adapter)
        self._use(slot)
        plan, count = self._schedule(sequences)
        self.model.train()
        local = {"loss": 0.0, "num_sequences": float(len(sequences)),
                 "num_tokens": float(sum(len(s) for s in sequences))}
        failure = None
        for index in range(count):
            real = index < len(plan) and failure is None
            batch = [sequences[i] for i in plan[index]] if real else self._dummy_sequence()
            logprobs = sequence_logprobs(self.model, batch, self.pad_id, self.device, self.logprob_head)
            # A dummy (or a micro-batch after a failure) still runs backward through every
            # FSDP unit, with zero weight, so every rank joins every reduce-scatter.
            loss = torch.stack([lp.sum() for lp in logprobs]).sum() * 0.0
            if real:
                try:
                    loss, metrics = self._run_loss(loss_fn, logprobs, plan[index])
                    local["loss"] += float(loss.detach())
                    for key, value in metrics.items():
                        local[key] = local.get(key, 0.0) + value
                except Exception as exc:  # raised on every rank once all have joined the collectives
                    failure = f"loss_fn failed on rank {self.rank}: {type(exc).__name__}: {exc}"
            loss.backward()
        try:
            distributed.raise_together(failure)
        except ArealError:
            slot.optimizer.zero_grad(set_to_none=True)
            raise
        params = slot.parameters
        distributed.sum_replicated_gradients(params, self.device)
        grad_norm = optimizer.clip_grad_norm(params, slot.actor.optimizer.grad_clip, self.device)
        skipped = not math.isfinite(grad_norm)
        optimizer.set_learning_rate(slot.optimizer, learning_rate(
            slot.actor.optimizer, slot.step, total_optimizer_steps(self.config)))
        if not skipped:
            slot.optimizer.step()
        slot.optimizer.zero_grad(set_to_none=True)
        slot.step += 1
        self.step += 1
        return {
            **local,
            "grad_norm": grad_norm,
            "lr": float(slot.optimizer.param_groups[0]["lr"]),
            "num_microbatches": float(count),
            "dummy_microbatches": float(count - len(plan)),
            "update_skipped": float(skipped),
        }

    # --- checkpoints -------------------------------------------------------------------------

    def save_checkpoint(self, directory: str) -> None:
        """Trainable weights, AdamW state, step and RNG states, written atomically (collective)."""
        checkpoint.save_checkpoint(self, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Restore what ``save_checkpoint`` wrote (collective; any world size)."""
        checkpoint.load_checkpoint(self, directory)

    # --- introspection -------------------------------------------------------------------------

    def trainable_state(self) -> dict[str, Any]:
        """Full copies of the trainable parameters (every adapter's) on rank 0 (``{}``
        elsewhere; collective)."""
        from areal_fsdp2.adapter_export import gather_trainable

        self.require_sharded("gather the trainable parameters")
        self.reshard()
        return gather_trainable(self.model)
