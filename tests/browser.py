"""Headless Chromium for the tests: dump a page's DOM after its scripts ran, or screenshot it.

Each run gets a fresh profile directory and is ended by its PID (its
process group, which it leads) if it outlives its timeout.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile

import pytest

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
         "--disable-dev-shm-usage"]


def chromium() -> str:
    """The browser's path; skips the test when it is not installed (``.ci/run`` installs it)."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def run_browser(url: str, *args: str, budget_ms: int = 4000, timeout: float = 60.0) -> str:
    """Load ``url`` with ``args`` (e.g. ``--dump-dom``); returns what the browser printed."""
    with tempfile.TemporaryDirectory(prefix="minidist-chromium-") as profile:
        cmd = [chromium(), *FLAGS, f"--user-data-dir={profile}",
               f"--virtual-time-budget={budget_ms}", *args, url]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                stdin=subprocess.DEVNULL, text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the group this browser leads
            proc.communicate()
            raise AssertionError(f"chromium did not finish loading {url} in {timeout}s")
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # helpers it left behind, if any
            except ProcessLookupError:
                pass
        assert proc.returncode == 0, f"chromium exited with {proc.returncode}"
        return out


def dump_dom(url: str, budget_ms: int = 4000) -> str:
    """The page's DOM as serialized after ``budget_ms`` of virtual time."""
    return run_browser(url, "--dump-dom", budget_ms=budget_ms)


def screenshot(url: str, path: str, size: str = "1280,900", budget_ms: int = 4000) -> None:
    """A PNG of the page after ``budget_ms`` of virtual time."""
    run_browser(url, f"--screenshot={path}", f"--window-size={size}", "--hide-scrollbars",
                budget_ms=budget_ms)
