"""What the two-rank fsdp2 tests share: free loopback ports for a launch, and reading back what
the two processes of a case script wrote (``rank<R>.json`` and ``<case>.rank<R>.<what>.safetensors``)."""

from __future__ import annotations

import json
import socket
from contextlib import ExitStack
from pathlib import Path


def free_ports(count: int) -> list[int]:
    """``count`` distinct loopback ports, free when this returns."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]


class TwoRankRun:
    """What the two processes of a case script wrote."""

    def __init__(self, out: Path):
        self.out = out
        self.ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    def result(self, case: str, rank: int = 0) -> dict:
        return self.ranks[rank][case]

    def tensors(self, case: str, what: str, rank: int = 0) -> dict:
        from safetensors.torch import load_file

        return load_file(str(self.out / f"{case}.rank{rank}.{what}.safetensors"))

    def tensor_list(self, case: str, what: str, rank: int = 0) -> list:
        loaded = self.tensors(case, what, rank)
        return [loaded[str(i)] for i in range(len(loaded))]
