"""The package passes the linter CI runs: ruff with the rules of ``ruff.toml``."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_ruff_finds_nothing_in_the_package():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "minidist"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
