"""A record of the server process groups rank 0 launched, so that none outlives the run.

Rank 0 stops the servers it launched on every way out it lives through (an error, Ctrl-C,
SIGTERM from torchrun). If rank 0 itself is killed outright, nothing in it runs; its servers,
which lead sessions of their own, would run on. So rank 0 writes down the session leaders among
its children after each server start (``record_launched_servers``), and ``areal train`` stops
whatever of those groups is left once the ranks have ended (``stop_recorded_servers``).

Linux only (``/proc``); elsewhere both are no-ops. No torch import: the launcher uses it.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

#: The environment variable through which ``areal train`` tells rank 0 where to write the record.
RECORD_ENV = "AREAL_SERVER_RECORD"


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rfind(")") + 2:].split()


def _session_leading_children(parent: int) -> list[int]:
    leaders = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = stat_fields(int(entry.name))
        # fields[1] is the parent pid, fields[3] the session id
        if fields and int(fields[1]) == parent and int(fields[3]) == int(entry.name):
            leaders.append(int(entry.name))
    return sorted(leaders)


def record_launched_servers(path: str | os.PathLike | None = None) -> list[int]:
    """Add this process's session-leading children (the servers it launched) to the record.

    ``path`` defaults to ``$AREAL_SERVER_RECORD``; without either, or without /proc, nothing
    is written. Returns the process group ids recorded so far.
    """
    path = path or os.environ.get(RECORD_ENV)
    if not path or not Path("/proc").is_dir():
        return []
    record = Path(path)
    known = set(read_record(record))
    known.update(_session_leading_children(os.getpid()))
    record.parent.mkdir(parents=True, exist_ok=True)
    staging = record.with_name(f".{record.name}.tmp")
    staging.write_text(json.dumps(sorted(known)) + "\n")
    os.replace(staging, record)
    return sorted(known)


def read_record(path: str | os.PathLike) -> list[int]:
    try:
        return [int(pid) for pid in json.loads(Path(path).read_text())]
    except (OSError, ValueError, TypeError):
        return []


def _group_members(group: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            # fields[0] is the state (Z: a zombie, already dead), fields[2] the group, [3] the session
            if fields and fields[0] != "Z" and int(fields[2]) == group and int(fields[3]) == group:
                members.append(int(entry.name))
    return members


def stop_recorded_servers(path: str | os.PathLike, grace: float = 20.0) -> list[int]:
    """SIGTERM every recorded group that still has live members, SIGKILL what is left after
    ``grace`` s. Returns the groups that were still running."""
    if not Path("/proc").is_dir():
        return []
    running = [group for group in read_record(path) if _group_members(group)]
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        left = [group for group in running if _group_members(group)]
        for group in left:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + wait
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = [group for group in left if _group_members(group)]
        if not left:
            break
    return running
