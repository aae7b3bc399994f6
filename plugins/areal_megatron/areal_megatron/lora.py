"""LoRA on megatron-core's parallel linear layers, in megatron-bridge's layout.

Each adapted layer is wrapped: ``<layer>.to_wrap`` is the frozen original, ``<layer>.adapter``
the adapter, whose ``linear_in`` is LoRA's A and ``linear_out`` LoRA's B; the output is
``base(x) + linear_out(linear_in(x)) * alpha / r``. Both are megatron-core parallel layers split
across tensor-parallel ranks the way megatron-bridge splits them:

- on a column-parallel layer (``linear_qkv``, ``linear_fc1``): A is a ColumnParallelLinear split
  along the rank (gathered), B a ColumnParallelLinear split along the output like the base weight
  (so B of linear_fc1 holds ``[gate_r; up_r]`` on rank r, B of linear_qkv whole query groups);
- on a row-parallel layer (``linear_proj``, ``linear_fc2``): A is a RowParallelLinear split along
  the input like the base weight, B a ColumnParallelLinear whose output is gathered.

One adapter covers the whole fused ``linear_qkv`` (q, k and v share A) and the whole fused
``linear_fc1`` (gate and up share A). Targeting only some projections of a fused layer (say
``[q_proj, v_proj]``) cannot be expressed by one shared A, so those get separate per-projection
adapters (``adapter_q``, ``adapter_v``: own A and B each, their outputs placed into the fused
layout), which export exactly to PEFT's per-projection adapters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import attrs
import torch

from areal_core.config import ALL_LINEAR
from areal_core.errors import AdapterError
from areal_megatron import tensor_parallel
from areal_megatron.models import fused_layout
from areal_megatron.models.state_dict_adapter import GATE_UP, QKV, LinearTarget

#: The part names of fused layers, in fused order, as used in ``adapter_<part>``.
PARTS = {QKV: ("q", "k", "v"), GATE_UP: ("gate", "up")}


@attrs.frozen
class Placement:
    """Where adapters go in one decoder layer's linear layer.

    ``parts`` is empty for one adapter over the whole layer (``adapter``), or names the
    projections that get their own adapter (``adapter_q``...).
    """

    target: LinearTarget
    parts: tuple[str, ...] = ()

    @property
    def hf_modules(self) -> tuple[str, ...]:
        """The HF short module names this placement adapts (export's target_modules)."""
        if not self.parts:
            return self.target.hf_modules
        names = dict(zip(PARTS[self.target.kind], self.target.hf_modules))
        return tuple(names[p] for p in self.parts)


def resolve_targets(requested: list[str], targets: dict[str, LinearTarget]) -> list[Placement]:
    """Map ``actor.target_modules`` to placements on the megatron linear layers.

    Accepts ``all-linear`` (the four layers), megatron names (``linear_qkv``...) and HF names
    (``q_proj``...). Raises AdapterError naming any name that matches nothing, listing the
    names that do.
    """
    requested = list(requested) or [ALL_LINEAR]
    hf_to_target = {hf: t for t in targets.values() for hf in t.hf_modules}
    known = sorted(targets) + sorted(hf_to_target)
    unknown = [n for n in requested if n != ALL_LINEAR and n not in targets and n not in hf_to_target]
    if unknown:
        raise AdapterError(
            f"target module(s) {unknown} match no linear layer of this model; the megatron engine "
            f"adapts {', '.join(known)} (or all-linear)"
        )
    placements = []
    for name, target in targets.items():
        if ALL_LINEAR in requested or name in requested:
            placements.append(Placement(target))
            continue
        chosen = [hf for hf in target.hf_modules if hf in requested]
        if not chosen:
            continue
        if len(chosen) == len(target.hf_modules):
            placements.append(Placement(target))
        else:
            part_of = dict(zip(target.hf_modules, PARTS[target.kind]))
            placements.append(Placement(target, tuple(part_of[hf] for hf in chosen)))
    return placements


class LoRAAdapter(torch.nn.Module):
    """``linear_out(linear_in(x)) * scale``: megatron-bridge's ParallelLinearAdapter with identity activation."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float, *,
                 base_is_row_parallel: bool, config):
        super().__init__()
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        def no_init(weight):  # weights are set by init_lora_weights, the same on every rank
            return weight

        if base_is_row_parallel:
            self.linear_in = RowParallelLinear(in_features, rank, config=config, init_method=no_init,
                                               bias=False, input_is_parallel=True, skip_bias_add=True)
        else:
            self.linear_in = ColumnParallelLinear(in_features, rank, config=config, init_method=no_init,
                                                  bias=False, gather_output=True)
        self.linear_out = ColumnParallelLinear(rank, out_features, config=config, init_method=no_init,
                                               bias=False, gather_output=base_is_row_parallel)
        self.scale = scale

    def forward(self, x):
        hidden, _ = self.linear_in(x)
        out, _ = self.linear_out(hidden)
        return out * self.scale


class LoRALinear(torch.nn.Module):
    """A megatron-core linear layer plus its adapter(s); same call and return as the layer."""

    def __init__(self, to_wrap, placement: Placement, part_sizes: dict[str, int], local_groups: int):
        super().__init__()
        self.to_wrap = to_wrap
        self.placement = placement
        self.part_sizes = part_sizes  # this rank's output width of each part (split adapters)
        self.local_groups = local_groups  # query groups on this rank (linear_qkv's interleaving)
        self.adapter_enabled = True

    def adapters(self) -> dict[str, LoRAAdapter]:
        return {name: m for name, m in self.named_children() if name.startswith("adapter")}

    def forward(self, x, *args, **kwargs):
        out, bias = self.to_wrap(x, *args, **kwargs)
        if not self.adapter_enabled:
            return out, bias
        if not self.placement.parts:
            return out + self.adapter(x), bias
        return out + self._split_delta(x, out), bias

    def _split_delta(self, x, out):
        """Per-projection adapters' outputs, placed at their rows of the fused local output."""
        kind = self.placement.target.kind
        pieces = []
        for part in PARTS[kind]:
            if part in self.placement.parts:
                pieces.append(getattr(self, f"adapter_{part}")(x))
            else:
                pieces.append(out.new_zeros((*out.shape[:-1], self.part_sizes[part])))
        if kind == GATE_UP:
            return torch.cat(pieces, dim=-1)
        moved = [p.movedim(-1, 0) for p in pieces]
        return fused_layout.fuse_qkv(*moved, num_groups=self.local_groups).movedim(0, -1)


def _fused_part_sizes(target: LinearTarget, spec) -> dict[str, int]:
    """Whole-model output width of each projection of a fused layer."""
    if target.kind == QKV:
        return {"q": spec.num_heads * spec.head_dim, "k": spec.num_kv_heads * spec.head_dim,
                "v": spec.num_kv_heads * spec.head_dim}
    if target.kind == GATE_UP:
        return {"gate": spec.ffn_hidden_size, "up": spec.ffn_hidden_size}
    return {}


def _layer_dims(target: LinearTarget, spec) -> tuple[int, int, bool]:
    """(in, out, base is row-parallel) of a whole-model linear layer."""
    h, d = spec.hidden_size, spec.head_dim
    return {
        "linear_qkv": (h, (spec.num_heads + 2 * spec.num_kv_heads) * d, False),
        "linear_proj": (spec.num_heads * d, h, True),
        "linear_fc1": (h, 2 * spec.ffn_hidden_size, False),
        "linear_fc2": (spec.ffn_hidden_size, h, True),
    }[target.name]


def _get_submodule(root, path: str):
    module = root
    for piece in path.split("."):
        module = getattr(module, piece)
    return module


def inject(model, spec, placements: list[Placement], rank: int, alpha: float, tp_size: int) -> list[str]:
    """Wrap the placed linear layers of every decoder layer; freeze everything else.

    Returns the names of the trainable (adapter) parameters. Adapter weights are left
    uninitialised: call ``init_lora_weights``.
    """
    if rank % tp_size:
        raise AdapterError(f"lora_rank={rank} must be a multiple of tensor_parallel_size={tp_size}: "
                           f"A of a column-parallel layer is split along the rank")
    for param in model.parameters():
        param.requires_grad_(False)
    scale = alpha / rank
    config = model.config
    for index, layer in enumerate(model.decoder.layers):
        for placement in placements:
            target = placement.target
            parent_path, _, attr = target.path.rpartition(".")
            parent = _get_submodule(layer, parent_path)
            base = getattr(parent, attr)
            if isinstance(base, LoRALinear):
                raise AdapterError("the model already carries LoRA adapters; inject once")
            in_f, out_f, row_parallel = _layer_dims(target, spec)
            sizes = _fused_part_sizes(target, spec)
            local_sizes = {p: s // tp_size for p, s in sizes.items()}
            wrapper = LoRALinear(base, placement, local_sizes, spec.num_kv_heads // tp_size)
            if not placement.parts:
                wrapper.adapter = LoRAAdapter(in_f, out_f, rank, scale,
                                              base_is_row_parallel=row_parallel, config=config)
            else:
                for part in placement.parts:
                    setattr(wrapper, f"adapter_{part}",
                            LoRAAdapter(in_f, sizes[part], rank, scale, base_is_row_parallel=False,
                                        config=config))
            setattr(parent, attr, wrapper)
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(".adapter" in name)
        if param.requires_grad:
            names.append(name)
    return names


def init_lora_weights(model, seed: int, tp_rank: int, tp_size: int) -> None:
    """A as PEFT initialises it (Kaiming-uniform), B zero, drawn whole from ``seed`` and cut per rank.

    Drawing the whole-model tensor makes the initial adapter the same for every TP/DP layout.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".adapter" not in name:
                continue
            rule = tensor_parallel.partition_rule(name)
            shape = list(param.shape)
            shape[1 if rule == tensor_parallel.ROW else 0] *= tp_size
            if name.endswith("linear_in.weight"):
                whole = torch.empty(shape)
                bound = 1.0 / math.sqrt(shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
                whole.uniform_(-bound, bound, generator=generator)
            else:
                whole = torch.zeros(shape)
            param.copy_(tensor_parallel.shard(name, whole, tp_rank, tp_size).to(param.dtype))


def lora_modules(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


@contextmanager
def adapters_disabled(model):
    """Bypass every adapter inside the block (the base model's outputs)."""
    modules = lora_modules(model)
    previous = [m.adapter_enabled for m in modules]
    for m in modules:
        m.adapter_enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            m.adapter_enabled = state
