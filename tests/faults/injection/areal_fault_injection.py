"""A test-only areal plugin that injects a fault into a real `areal train` run.

Installed only into the runs of tests/faults (``fault_injection_env`` puts it on PYTHONPATH with
an entry point in ``areal.plugins``); it wraps the real steps (pluggy wrappers, as a third-party
plugin may) and changes nothing unless ``AREAL_INJECT_FAULT`` asks for a fault:

    export-enospc@N       the Nth adapter export of the run fails as a full disk fails a write:
                          the bytes reach the page cache, then fsync answers ENOSPC
    checkpoint-enospc@N   the same, during the Nth checkpoint of the run

Counted per process, on every rank alike; the fault itself is raised on rank 0, which writes.

Wrong weights served, below the project's admission and checksum checks (rank 0, after the real
load of adapter version N and of every later one; ``-once``: version N only; see
``areal_fault_wrong_weights``, which also logs each one to ``<output_dir>/fault-injection.jsonl``):

    serve-base@N             requests for the version reach the server without the adapter
    serve-previous@N         the name serves the previous version's weights
    serve-double-scale@N     ... a copy with lora_alpha doubled
    serve-missing-module@N   ... a copy without the down_proj tensors
    serve-other-adapter@N    ... random LoRA tensors of the same keys, shapes and sizes
    serve-previous-once@N    (any of them with -once) only version N's load is wrong

Several serve-* faults, comma-separated, in one run (each at versions of its own), e.g.
``serve-base-once@2,serve-previous-once@4``.
"""

from __future__ import annotations

import contextlib
import errno
import os

from areal_core import hookimpl

import areal_fault_wrong_weights as wrong_weights

FAULT_ENV = "AREAL_INJECT_FAULT"
_calls: dict[str, int] = {}


def _due(kind: str) -> bool:
    wanted, _, nth = os.environ.get(FAULT_ENV, "").partition("@")
    if wanted != kind:
        return False
    _calls[kind] = _calls.get(kind, 0) + 1
    return _calls[kind] == int(nth or 1) and os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def _disk_full():
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    os.fsync = fsync
    try:
        yield
    finally:
        os.fsync = real_fsync


@hookimpl(wrapper=True)
def areal_export_adapter(backend, engine, directory, version):
    if not _due("export-enospc"):
        return (yield)
    with _disk_full():
        return (yield)


@hookimpl(wrapper=True)
def areal_build_engine(backend, config):
    engine = yield
    save = engine.save_checkpoint

    def save_checkpoint(directory):
        if not _due("checkpoint-enospc"):
            return save(directory)
        with _disk_full():
            return save(directory)

    engine.save_checkpoint = save_checkpoint
    return engine


@hookimpl(wrapper=True)
def areal_load_rollout_adapter(backend, server, adapter, lora_name):
    name = yield  # the real load: admitted, checksums verified, listed by the server
    faults = wrong_weights.parse_all(os.environ.get(FAULT_ENV, ""))
    if not faults:
        return name
    wrong_weights.remember_load(adapter)
    kind = wrong_weights.due(faults, adapter.version)
    if kind is not None:
        wrong_weights.inject(kind, backend, server, adapter, lora_name)
    return name
