"""Which errors the loop reads as another rank gone (not as a failure of its own work)."""

import pytest

from areal_core.grpo.comm import is_peer_failure


def test_a_gloo_timeout_is_a_peer_failure():
    # What a checkpoint's collective raised on rank 0 when rank 1 was SIGSTOPped (tests/faults).
    assert is_peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_peer_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))


def test_a_write_error_is_not():
    assert not is_peer_failure(OSError(28, "No space left on device"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))


def test_after_ctrl_c_a_lost_collective_is_reported_as_the_interrupt(monkeypatch, capsys):
    from areal_core.grpo import worker

    monkeypatch.setattr(worker, "_interrupted", False)  # restored after the test
    lost = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert worker._report_failure(lost) == 1  # no Ctrl-C: a lost rank
    assert "lost another training rank" in capsys.readouterr().err
    with pytest.raises(KeyboardInterrupt):
        worker._raise_interrupted(2, None)
    assert worker._report_failure(lost) == 130  # the other rank, interrupted too, left first
    assert "interrupted (Ctrl-C)" in capsys.readouterr().err


def test_a_checkpoint_whose_collective_lost_a_rank_is_a_peer_failure():
    # DCP wraps each rank's error in a CheckpointException (a BaseException, not a RuntimeError):
    # read as a write error, a killed rank during a checkpoint said "fix the free space" (CI).
    from torch.distributed.checkpoint.api import CheckpointException

    lost = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234")
    assert is_peer_failure(CheckpointException("reduce_scatter", {0: (lost, None)}))
    assert not is_peer_failure(CheckpointException("write", {0: (OSError(28, "No space left on device"), None)}))


def test_an_error_raised_from_a_lost_collective_is_a_peer_failure():
    try:
        try:
            raise RuntimeError("Connection reset by peer")
        except RuntimeError as lost:
            raise ValueError("could not gather the step's figures") from lost
    except ValueError as wrapped:
        assert is_peer_failure(wrapped)
