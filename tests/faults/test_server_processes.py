"""Servers a killed rank 0 leaves behind are found from its record and stopped (real processes)."""

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from areal_core.grpo.server_processes import read_record, stop_recorded_servers

# A "server" as the plugins launch one: leader of its own session, with a child in its group.
SERVER = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); time.sleep(600)"


def group_alive(group: int) -> bool:
    """Whether a process of ``group`` still runs (zombies, already dead, do not count)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z" and int(fields[2]) == group:
                return True
    return False


def test_the_groups_rank_0_recorded_are_stopped_after_it_was_killed(tmp_path):
    record = tmp_path / "server-processes.json"
    rank0 = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from areal_core.grpo.server_processes import record_launched_servers
        server = subprocess.Popen([sys.executable, "-c", {SERVER!r}], start_new_session=True)
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])  # no session of its own
        time.sleep(0.5)
        record_launched_servers({str(record)!r})
        print(server.pid, helper.pid, flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        server, helper = map(int, rank0.stdout.readline().split())
        assert read_record(record) == [server]  # session leaders only: the servers
        rank0.kill()
        rank0.wait(10)
        assert group_alive(server)  # orphaned, still running

        assert stop_recorded_servers(record, grace=10) == [server]
        deadline = time.monotonic() + 10
        while group_alive(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not group_alive(server)  # the leader and its child
        assert stop_recorded_servers(record) == []  # nothing left to stop
    finally:
        if rank0.poll() is None:
            rank0.kill()
        if "helper" in locals():
            try:
                os.kill(helper, 9)
            except ProcessLookupError:
                pass
