"""This process's random number generator states as JSON-able data, and back (no pickle)."""

from __future__ import annotations

import random

import torch


def capture() -> dict:
    """The states of torch (CPU, and CUDA when initialised), Python's ``random`` and numpy."""
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch
        return state
    kind, keys, position, has_gauss, cached = numpy.random.get_state()
    state["numpy"] = [kind, keys.tolist(), int(position), int(has_gauss), float(cached)]
    return state


def restore(state: dict) -> None:
    """Set the generators to what ``capture`` returned."""
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
    if "numpy" in state:
        import numpy

        kind, keys, position, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, cached))
