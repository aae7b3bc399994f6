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

Several adapters on one frozen base: each adapted layer holds every adapter that targets it under
``<layer>.lora.<key>`` (``key``: the adapter's position in the run, ``"0"`` for the first), each
with its own rank, alpha and placement. Within an adapter its parameters keep megatron-bridge's
names (``local_name`` drops ``lora.<key>``), the names its export, checkpoint and tensor-parallel
split rules read. Every adapter's parameters stay trainable; ``route`` picks the one adapter a
forward runs through, so only its parameters can get a gradient.
"""

from __future__ import annotations

import math
import re
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


class LayerAdapter(torch.nn.Module):
    """One adapter on one linear layer: ``adapter``, or one ``adapter_<part>`` per projection."""

    def __init__(self, placement: Placement):
        super().__init__()
        self.placement = placement


class LoRALinear(torch.nn.Module):
    """A megatron-core linear layer plus the adapters on it; same call and return as the layer.

    A forward adds the output of the adapter ``active`` names (nothing when it has none here).
    """

    def __init__(self, to_wrap, part_sizes: dict[str, int], local_groups: int):
        super().__init__()
        self.to_wrap = to_wrap
        self.lora = torch.nn.ModuleDict()  # adapter key -> LayerAdapter
        self.part_sizes = part_sizes  # this rank's output width of each part (split adapters)
        self.local_groups = local_groups  # query groups on this rank (linear_qkv's interleaving)
        self.active: str | None = None  # the key of the adapter forwards run through
        self.adapter_enabled = True

    def forward(self, x, *args, **kwargs):
        out, bias = self.to_wrap(x, *args, **kwargs)
        if not self.adapter_enabled or self.active not in self.lora:
            return out, bias
        layer_adapter = self.lora[self.active]
        if not layer_adapter.placement.parts:
            return out + layer_adapter.adapter(x), bias
        return out + self._split_delta(layer_adapter, x, out), bias

    def _split_delta(self, layer_adapter, x, out):
        """Per-projection adapters' outputs, placed at their rows of the fused local output."""
        placement = layer_adapter.placement
        kind = placement.target.kind
        pieces = []
        for part in PARTS[kind]:
            if part in placement.parts:
                pieces.append(getattr(layer_adapter, f"adapter_{part}")(x))
            else:
                pieces.append(out.new_zeros((*out.shape[:-1], self.part_sizes[part])))
        if kind == GATE_UP:
            return torch.cat(pieces, dim=-1)
        moved = [p.movedim(-1, 0) for p in pieces]
        return fused_layout.fuse_qkv(*moved, num_groups=self.local_groups).movedim(0, -1)


_ADAPTER_KEY = re.compile(r"\.lora\.(?P<key>[^.]+)\.")


def adapter_key_of(name: str) -> str | None:
    """The key of the adapter a model parameter belongs to (None for a base weight)."""
    match = _ADAPTER_KEY.search(name)
    return match["key"] if match else None


def local_name(name: str) -> str:
    """A model parameter's name within its adapter, in megatron-bridge's naming
    (``...linear_qkv.lora.1.adapter.linear_in.weight`` -> ``...linear_qkv.adapter.linear_in.weight``)."""
    return _ADAPTER_KEY.sub(".", name, count=1)


def adapter_parameters(model, key: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of adapter ``key`` by their local names, in the model's order."""
    return {local_name(name): param for name, param in model.named_parameters() if adapter_key_of(name) == key}


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


def inject(model, spec, placements: list[Placement], rank: int, alpha: float, tp_size: int, key: str
           ) -> dict[str, torch.nn.Parameter]:
    """Add adapter ``key`` to the placed linear layers of every decoder layer (wrapping a layer
    no adapter has yet); freeze everything but the adapters.

    Returns the new adapter's parameters by local name. Its weights are left uninitialised: call
    ``init_lora_weights``.
    """
    if rank % tp_size:
        raise AdapterError(f"lora_rank={rank} must be a multiple of tensor_parallel_size={tp_size}: "
                           f"A of a column-parallel layer is split along the rank")
    scale = alpha / rank
    config = model.config
    for layer in model.decoder.layers:
        for placement in placements:
            target = placement.target
            parent_path, _, attr = target.path.rpartition(".")
            parent = _get_submodule(layer, parent_path)
            wrapper = getattr(parent, attr)
            if not isinstance(wrapper, LoRALinear):
                sizes = _fused_part_sizes(target, spec)
                wrapper = LoRALinear(wrapper, {p: s // tp_size for p, s in sizes.items()},
                                     spec.num_kv_heads // tp_size)
                setattr(parent, attr, wrapper)
            if key in wrapper.lora:
                raise AdapterError(f"the model already carries adapter {key!r}; inject each adapter once")
            in_f, out_f, row_parallel = _layer_dims(target, spec)
            layer_adapter = LayerAdapter(placement)
            if not placement.parts:
                layer_adapter.adapter = LoRAAdapter(in_f, out_f, rank, scale,
                                                    base_is_row_parallel=row_parallel, config=config)
            else:
                sizes = _fused_part_sizes(target, spec)
                for part in placement.parts:
                    setattr(layer_adapter, f"adapter_{part}",
                            LoRAAdapter(in_f, sizes[part], rank, scale, base_is_row_parallel=False,
                                        config=config))
            wrapper.lora[key] = layer_adapter
    for name, param in model.named_parameters():
        param.requires_grad_(adapter_key_of(name) is not None)
    return adapter_parameters(model, key)


def init_lora_weights(parameters: dict[str, torch.nn.Parameter], seed: int, tp_rank: int, tp_size: int) -> None:
    """A as PEFT initialises it (Kaiming-uniform), B zero, drawn whole from ``seed`` and cut per rank.

    ``parameters``: one adapter's, by local name. Drawing the whole-model tensor makes the
    initial adapter the same for every TP/DP layout.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in parameters.items():
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


def adapter_seed(seed: int, position: int) -> int:
    """The initialisation seed of the adapter at ``position``: ``seed`` itself for the first, so
    the first of several adapters starts where a run's only adapter starts."""
    return seed if position == 0 else seed + 1_000_003 * position


def lora_modules(model) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def route(model, key: str) -> None:
    """Make every forward of ``model`` run through adapter ``key`` only (``requires_grad`` untouched)."""
    for module in lora_modules(model):
        module.active = key


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
