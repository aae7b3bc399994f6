"""The megatron engine: the Engine protocol of ``areal_core.interfaces`` on megatron-core.

Parallel layout: ``actor.tensor_parallel_size`` ranks hold one copy of the model split by tensor
parallelism; the ``world_size / TP`` copies are data parallel. No pipeline parallelism yet.

Data: every rank passes its own sequences, as the SPMD loop does. The ranks of one
tensor-parallel group must run the same forward, so each call first gathers the group's
sequences; the group runs them together and each rank gets back (or computes its loss on) its own.
Every collective inside a micro-batch is within the TP group, whose ranks share one micro-batch
schedule by construction; the data-parallel gradient reduction runs once per step on every rank,
even a rank that brought no sequences, so no collective can be left waiting.

Several adapters on one frozen base (``adapters:``): each is its own ``AdapterSlot`` with its own
parameters (rank, alpha and target modules may differ), AdamW, learning-rate schedule position
(its own step count) and gradient clipping, all split over TP like the base weights. A call
names its adapter (``adapter=``) and the forward is routed through that one only
(``lora.route``), so only its parameters get a gradient. One adapter per ``train_step``, as in
the fsdp2 engine; ``steps`` counts the calls of all adapters together.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Sequence

import attrs
import torch
import torch.distributed as dist

from areal_core.adapter_format import write_peft_adapter
from areal_core.config import RunConfig
from areal_core.errors import AdapterError, ArealError
from areal_core.host_allocator import return_freed_tensors_to_the_system
from areal_core.interfaces import ExportedAdapter, LossFn
from areal_core.lr_schedule import learning_rate, total_optimizer_steps
from areal_core.microbatching import plan_microbatches
from areal_megatron import batching, checkpoint, cpu_mode, lora, model_builder, peft_export
from areal_megatron.adapter_slot import AdapterSlot
from areal_megatron.distributed import gather_tp_objects, init_parallel, release, resolve_device
from areal_megatron.models import load_spec, state_dict_adapter
from areal_megatron.validation import layout_problems

NAME = "megatron"


class MegatronEngine:
    """One training rank of the megatron engine. Every method is collective (all ranks, same order)."""

    name = NAME

    def __init__(self, config: RunConfig):
        actor = config.actor
        self.config = config
        self.actor = actor
        self.spec = load_spec(actor.path)
        problems = layout_problems(self.spec, actor)
        if problems:
            raise ArealError("; ".join(f"{key}: {text}" for key, _, text, _ in problems))
        self.dtype = model_builder.DTYPES[actor.dtype]
        self.cpu_mode = cpu_mode.requested(actor.device)
        if self.cpu_mode:
            cpu_mode.apply()  # refuses where a GPU is present
            if actor.release_freed_tensors:
                return_freed_tensors_to_the_system()
        device = resolve_device(actor.device, self.cpu_mode)
        self.layout = init_parallel(actor.tensor_parallel_size, device, config.train.seed)
        self.rank = self.layout.rank
        self.world_size = self.layout.world_size
        self.device = device
        self.targets = state_dict_adapter(self.spec).linear_targets()
        self.model = None
        self.adapters: dict[str, AdapterSlot] = {}  # in the order injected
        self.trains = False  # setup_training has built every adapter's optimizer
        self.steps = 0  # train_step calls completed, all adapters together

    # --- model ----------------------------------------------------------------------------

    def load_base_model(self) -> None:
        """Build the megatron-core model and load this rank's shards of the HF weights."""
        if self.model is not None:
            raise ArealError("load_base_model was already called on this engine")
        model = model_builder.build_model(self.spec, self.layout, self.dtype)
        model_builder.load_hf_weights(model, self.spec, model_builder.read_hf_state(self.actor.path),
                                      self.layout)
        self.model = model.to(self.device)
        self._redirect()

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer of the only adapter (None before setup or with several adapters)."""
        return next(iter(self.adapters.values())).optimizer if len(self.adapters) == 1 else None

    def inject_lora(self, actor=None, adapter_name: str | None = None) -> None:
        """Step 1: wrap the target linear layers with LoRA adapter ``adapter_name``, the same
        initial adapter on every rank. Called once per adapter; None names the run's only adapter
        (``gconfig.lora_name``).

        ``actor`` (default: the config's) gives rank, alpha, target modules and peft type.
        """
        self._require_model()
        actor = actor if actor is not None else self.actor
        position = len(self.adapters)
        if self.trains:
            raise AdapterError("the optimizers are built already: inject every adapter "
                               "(areal_inject_adapter) before areal_shard_model")
        if adapter_name is None:
            if position:
                raise AdapterError(f"a second adapter needs a name (adapter_name); the engine holds "
                                   f"{list(self.adapters)}")
            adapter_name = self.config.gconfig.lora_name
        if not isinstance(adapter_name, str) or not adapter_name:
            raise AdapterError(f"adapter_name must be a non-empty string, not {adapter_name!r}")
        if adapter_name in self.adapters:
            raise AdapterError(f"adapter {adapter_name!r} is injected already; each adapter is injected once")
        if actor.peft_type.lower() != "lora":
            raise AdapterError(f"peft_type {actor.peft_type!r} is not supported; the megatron engine trains LoRA")
        placements = lora.resolve_targets(actor.resolved_target_modules, self.targets)
        slot = AdapterSlot(adapter_name, position, actor, placements,
                           legacy=position == 0 and not self.config.adapters)
        slot.parameters = lora.inject(self.model, self.spec, placements, actor.lora_rank, actor.lora_alpha,
                                      self.layout.tp_size, slot.key)
        seed = lora.adapter_seed(self.config.train.seed, position)
        lora.init_lora_weights(slot.parameters, seed, self.layout.tp_rank, self.layout.tp_size)
        self.model.to(self.device)
        slot.parameters = lora.adapter_parameters(self.model, slot.key)  # as moved to the device
        self.adapters[adapter_name] = slot
        if position == 0:
            self.actor = actor
            lora.route(self.model, slot.key)
        self._redirect()

    def setup_training(self, actor=None) -> None:
        """Step 2: tensor parallelism is built into the layers; add one AdamW per adapter.

        Data parallelism is the gradient all-reduce in ``train_step``. ``actor`` (default: the
        config's; the first adapter's) gives the engine's settings, and the optimizer of a run's
        only adapter; each of several adapters has the optimizer of the ``actor`` it was injected with.
        """
        self._require_model()
        if not self.adapters:
            raise AdapterError("no trainable parameters: inject the adapter (areal_inject_adapter) first")
        if actor is not None:
            self.actor = actor
            if len(self.adapters) == 1:
                next(iter(self.adapters.values())).actor = actor
        for slot in self.adapters.values():
            slot.build_optimizer()
        self.trains = True

    def slot(self, adapter: str | None) -> AdapterSlot:
        """The adapter named ``adapter``; None: the only one (an error when there are several)."""
        if adapter is None:
            if len(self.adapters) != 1:
                raise AdapterError(f"the megatron engine holds {len(self.adapters)} adapters "
                                   f"{list(self.adapters)}: name the one meant with adapter=")
            return next(iter(self.adapters.values()))
        if adapter not in self.adapters:
            raise AdapterError(f"no adapter {adapter!r} in the megatron engine; it holds {list(self.adapters)}")
        return self.adapters[adapter]

    def _adapter_context(self, disable_adapter: bool, adapter: str | None):
        """Route the forward through ``adapter`` (or through none: the base model)."""
        if disable_adapter:
            if adapter is not None:
                self.slot(adapter)  # a misspelt name is still an error
            return lora.adapters_disabled(self.model)
        if self.adapters or adapter is not None:  # a model without adapters is its base
            lora.route(self.model, self.slot(adapter).key)
        return nullcontext()

    # --- the training calls -----------------------------------------------------------------

    def compute_logprobs(self, sequences: Sequence[Sequence[int]], *, disable_adapter: bool = False,
                         adapter: str | None = None) -> list[torch.Tensor]:
        """Per-token log-probabilities, one float32 CPU tensor of ``len(seq) - 1`` per sequence,
        under ``adapter`` (None: the only adapter; with several, an error)."""
        self._require_model()
        bypass = self._adapter_context(disable_adapter, adapter)
        union, start, end = self._tp_union(sequences)
        out: list[torch.Tensor] = []
        with torch.no_grad(), bypass:
            for group in self._microbatches(union):
                batch = [union[i] for i in group]
                logits = self._logits(batch)
                out.extend(lp.to("cpu") for lp in batching.token_logprobs(logits, batch, self.spec.vocab_size))
        return out[start:end]

    def forward_logits(self, sequences: Sequence[Sequence[int]], *, disable_adapter: bool = False,
                       adapter: str | None = None) -> list[torch.Tensor]:
        """Full-vocabulary logits ``[len(seq), vocab]`` per sequence (float32, CPU); for checks."""
        self._require_model()
        bypass = self._adapter_context(disable_adapter, adapter)
        union, start, end = self._tp_union(sequences)
        out = []
        with torch.no_grad(), bypass:
            for group in self._microbatches(union):
                batch = [union[i] for i in group]
                logits = self._logits(batch)
                out.extend(logits[row, : len(s), : self.spec.vocab_size].float().to("cpu")
                           for row, s in enumerate(batch))
        return out[start:end]

    def train_step(self, sequences: Sequence[Sequence[int]], loss_fn: LossFn,
                   adapter: str | None = None) -> dict[str, float]:
        """One optimizer step of ``adapter`` (None: the only adapter; with several, an error) on
        the sum of every rank's losses (see the module docstring).

        Only that adapter's parameters get a gradient; they are clipped on their own (its
        ``grad_clip``) and stepped by its AdamW at the rate of its own k-th step. A non-finite
        gradient norm skips the update (``update_skipped`` 1); the step still counts.
        """
        self._require_optimizer()
        slot = self.slot(adapter)
        lora.route(self.model, slot.key)
        params = list(slot.parameters.values())
        union, start, end = self._tp_union(sequences)
        for param in params:
            param.grad = None
        metrics: dict[str, float] = {}
        loss_total = 0.0
        groups = self._microbatches(union)
        for group in groups:
            batch = [union[i] for i in group]
            logprobs = batching.token_logprobs(self._logits(batch), batch, self.spec.vocab_size)
            mine = [k for k, u in enumerate(group) if start <= u < end]
            leaves = [logprobs[k].detach().requires_grad_() for k in mine]
            my_grads: list[torch.Tensor] = [torch.zeros_like(x) for x in leaves]
            if mine:
                loss, found = loss_fn(leaves, [group[k] - start for k in mine])
                loss_total += float(loss.detach())
                for key, value in found.items():
                    metrics[key] = metrics.get(key, 0.0) + float(value)
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
                    my_grads = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, leaves)]
            # The whole TP group back-propagates the same upstream gradient: the sum of its losses.
            upstream: dict[int, torch.Tensor] = {}
            shared = {group[k]: g.detach().to("cpu") for k, g in zip(mine, my_grads)}
            for part in gather_tp_objects(shared, self.layout):
                upstream.update(part)
            grads = [upstream[u].to(logprobs[k].device) for k, u in enumerate(group)]
            torch.autograd.backward(logprobs, grads)
        grad_norm = self._reduce_and_clip(params, slot.actor.optimizer.grad_clip)
        # A NaN or inf anywhere reaches every rank's norm through the all-reduces: every rank
        # skips together, leaving the weights and AdamW's moments as they were.
        skipped = not math.isfinite(grad_norm)
        rate = learning_rate(slot.actor.optimizer, slot.steps, total_optimizer_steps(self.config))
        for param_group in slot.optimizer.param_groups:
            param_group["lr"] = rate
        if not skipped:
            slot.optimizer.step()
        for param in params:
            param.grad = None
        slot.steps += 1
        self.steps += 1
        result = {"loss": loss_total, **metrics}
        result.update(grad_norm=grad_norm, lr=float(slot.optimizer.param_groups[0]["lr"]),
                      num_microbatches=float(len(groups)), update_skipped=float(skipped))
        return result

    # --- export and checkpoints -------------------------------------------------------------

    def export_adapter(self, directory: str, version: int, adapter_name: str | None = None) -> ExportedAdapter:
        """Step 3: gather adapter ``adapter_name`` (None: the only one) over TP, convert to PEFT
        naming; rank 0 writes it atomically, with that adapter's rank and alpha.

        Every rank returns rank 0's ExportedAdapter; a failure on rank 0 is raised on every rank.
        """
        self._require_model()
        if not self.adapters:
            raise AdapterError("the model carries no adapter to export: inject it first")
        slot = self.slot(adapter_name)
        start = time.perf_counter()
        whole = peft_export.gather_adapter(self.model, self.layout, slot.key)
        payload: list = [None]
        if self.rank == 0:
            try:
                tensors = peft_export.to_peft(whole, self.spec, self.targets)
                exported = write_peft_adapter(directory, tensors, rank=slot.actor.lora_rank,
                                              alpha=slot.actor.lora_alpha, version=version,
                                              base_model_path=self.actor.path)
                payload[0] = attrs.evolve(exported, seconds=time.perf_counter() - start)
            except Exception as exc:  # every rank must learn of it, or they would wait forever
                payload[0] = f"{type(exc).__name__}: {exc}"
        if self.world_size > 1:
            dist.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], str):
            raise AdapterError(f"exporting the adapter to {directory} failed on rank 0: {payload[0]}")
        return payload[0]

    def save_checkpoint(self, directory: str) -> None:
        """Every adapter's shards, optimizer state and step count, and the RNG state, written
        atomically (see ``checkpoint``)."""
        self._require_optimizer()
        checkpoint.save(self, directory)

    def load_checkpoint(self, directory: str) -> None:
        """Restore what ``save_checkpoint`` wrote (same TP size and adapter layout)."""
        self._require_optimizer()
        checkpoint.load(self, directory)

    def megatron_state(self) -> dict[str, torch.Tensor]:
        """The whole-model base weights in megatron-core layout (TP-gathered). Collective."""
        self._require_model()
        from areal_megatron.distributed import gather_tp

        return model_builder.megatron_state(self.model, self.spec, self.layout,
                                            lambda t: [s.to("cpu", copy=True) for s in gather_tp(t, self.layout)])

    def close(self) -> None:
        """Drop the model and optimizer; release the process groups this engine created."""
        self.model = None
        self.adapters = {}
        self.trains = False
        release(self.layout)

    # --- internals ----------------------------------------------------------------------------

    def _redirect(self) -> None:
        if self.cpu_mode:
            cpu_mode.apply()  # modules megatron-core imported lazily since the last call

    def _require_model(self) -> None:
        if self.model is None:
            raise ArealError("the engine has no model yet: call load_base_model() first")

    def _require_optimizer(self) -> None:
        self._require_model()
        if not self.trains:
            raise ArealError("the engine has no optimizer yet: run areal_inject_adapter and "
                             "areal_shard_model first")

    def _tp_union(self, sequences):
        """The TP group's sequences in TP-rank order, and where this rank's lie: (all, start, end)."""
        mine = batching.check_sequences(sequences, self.spec.vocab_size, self.spec.max_position_embeddings)
        parts = gather_tp_objects(mine, self.layout)
        start = sum(len(p) for p in parts[: self.layout.tp_rank])
        return [s for p in parts for s in p], start, start + len(mine)

    def _microbatches(self, union):
        return plan_microbatches([len(s) for s in union], self.actor.max_tokens_per_microbatch)

    def _logits(self, batch):
        ids, positions, mask = batching.model_inputs(batch, self.device)
        return self.model(input_ids=ids, position_ids=positions, attention_mask=mask)

    def _reduce_and_clip(self, params: list[torch.nn.Parameter], clip: float) -> float:
        """Sum ``params``' gradients over data-parallel replicas, then clip them by their global
        norm (collectives on every rank)."""
        grads = []
        for param in params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        if self.layout.dp_size > 1:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.layout.dp_group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset: offset + g.numel()].view_as(g))
                offset += g.numel()
        # Every adapter parameter is split over TP (none replicated): the TP sum of squares is the total.
        squares = torch.stack([g.float().pow(2).sum() for g in grads]).sum()
        if self.layout.tp_size > 1:
            dist.all_reduce(squares, group=self.layout.tp_group)
        norm = math.sqrt(float(squares))
        if clip > 0 and math.isfinite(norm):
            coef = clip / (norm + 1e-6)
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm
