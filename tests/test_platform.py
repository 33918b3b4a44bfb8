"""Where a process's memory cannot be read (no ``/proc``), a memory limit is refused, not ignored.

Linux is the platform minidist runs on; these tests take ``/proc`` away
from a real worker process by pointing its reader at a path that does
not exist, as on macOS.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from minidist.memory import parse_memory_limit, rss_readable

NO_PROC = "import minidist.memory as m; m._STATM = '/nonexistent/{pid}/statm'; "


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_PROC + code], capture_output=True,
                          text=True, timeout=60)


def test_this_platform_reads_memory():
    assert rss_readable()
    assert parse_memory_limit("1GB") == 10**9


def test_without_proc_a_limit_is_refused_and_auto_means_none():
    done = run("print(m.rss_readable(), m.parse_memory_limit('auto'), "
               "m.parse_memory_limit('none'))")
    assert done.stdout.split() == ["False", "None", "None"], done.stderr
    done = run("m.parse_memory_limit('2GB')")
    assert "refused: this platform has no /proc" in done.stderr


@pytest.mark.timeout(60)
def test_without_proc_dworker_refuses_a_memory_limit_with_a_clear_message():
    done = run("from minidist.worker import main; main(['127.0.0.1:1', '--no-nanny', "
               "'--memory-limit', '2GB'])")
    assert done.returncode != 0
    assert "refused: this platform has no /proc" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
