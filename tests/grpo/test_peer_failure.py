"""Which errors the loop reads as another rank gone (not as a failure of its own work)."""

from areal_core.grpo.comm import is_peer_failure


def test_a_gloo_timeout_is_a_peer_failure():
    # What a checkpoint's collective raised on rank 0 when rank 1 was SIGSTOPped (tests/faults).
    assert is_peer_failure(RuntimeError("Application timeout caused pair closure"))
    assert is_peer_failure(RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer"))


def test_a_write_error_is_not():
    assert not is_peer_failure(OSError(28, "No space left on device"))
    assert not is_peer_failure(RuntimeError("shape mismatch"))
