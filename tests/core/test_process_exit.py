"""exit_now ends the process with the given status and loses nothing it printed or logged."""

import subprocess
import sys

SCRIPT = """
import atexit, logging, sys
from areal_core.process_exit import exit_now
logging.basicConfig(stream=sys.stderr, format="%(message)s")
atexit.register(lambda: print("atexit ran"))
print("to stdout, unflushed", end="")
sys.stderr.write("to stderr, unflushed")
logging.getLogger("x").warning(" and logged")
exit_now(7)
print("after exit_now")
"""


def test_exit_now_flushes_and_skips_the_teardown():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert result.returncode == 7
    assert result.stdout == "to stdout, unflushed"  # no atexit handler, nothing after the call
    assert result.stderr == "to stderr, unflushed and logged\n"
