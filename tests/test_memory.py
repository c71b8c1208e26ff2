"""util/memory.py reads real /proc entries: this process and a child that holds a known buffer."""
import subprocess
import sys
import time

import pytest

from util.memory import child_pids, children_peak_mib, status_mib

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_child_holding_100_mib_is_found_with_its_peak():
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; b = bytearray(100 * 2**20); "
                              "b[::4096] = b'x' * len(b[::4096]); print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        assert child.pid in child_pids()
        peak = status_mib(child.pid, "VmHWM")
        assert peak in children_peak_mib()
        assert 100 <= peak < 100 + 200  # the buffer plus the interpreter
        assert status_mib(child.pid, "VmRSS") <= peak
    finally:
        child.kill()
        child.wait()
    time.sleep(0.05)
    assert child.pid not in child_pids()


def test_unreadable_process_gives_none():
    assert status_mib(2**22 + 12345, "VmRSS") is None
    assert status_mib("self", "NoSuchField") is None
    assert status_mib("self", "VmHWM") > 0
