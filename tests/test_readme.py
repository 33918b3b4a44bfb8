"""The README runs as written: every Python block, on its own, against a real cluster.

Each ```python block of README.md is written to a file and run as a script
by a fresh interpreter, as a user pasting it would, against a LocalCluster
started for that block (the documented addresses, ``192.168.0.100:8787``
and ``127.0.0.1:8787``, replaced by the cluster's; the key reaches the
script as ``MINIDIST_AUTH_KEY``, as the Quickstart exports it).  A
``print(...)  # OUTPUT`` line documents its output: the script's stdout must
be those comments, line by line.  The benchmark tables name their systems
as ``python -m benchmarks --systems`` takes them.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest

from minidist import LocalCluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BENCH_README = os.path.join(ROOT, "benchmarks", "README.md")
DOCUMENTED_ADDRESS = re.compile(r"(192\.168\.0\.100|127\.0\.0\.1):8787")
DOCUMENTED_HOST_PORT = re.compile(r'"192\.168\.0\.100", 8787')
PRINTED = re.compile(r"^\s*print\(.*\)\s*# (.+)$")
SNIPPET_TIMEOUT = 90.0
NOT_SYSTEMS = {"socket", "ideal"}  # columns of the tables that are not systems

if ROOT not in sys.path:  # ``benchmarks`` is a package of the source tree, not installed
    sys.path.insert(0, ROOT)


def python_blocks(path: str) -> list[tuple[int, str]]:
    """(first line number, code) of each ```python block of ``path``."""
    blocks, current, start = [], None, 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if current is None and line.rstrip() == "```python":
                current, start = [], number + 1
            elif current is not None and line.rstrip() == "```":
                blocks.append((start, "".join(current)))
                current = None
            elif current is not None:
                current.append(line)
    return blocks


BLOCKS = python_blocks(README)


def expected_output(code: str) -> list[str]:
    """The documented output: the comment of every ``print`` line, in order."""
    lines = []
    for line in code.splitlines():
        if line.lstrip().startswith("print("):
            match = PRINTED.match(line)
            assert match, f"a print without its output documented: {line!r}"
            lines.append(match.group(1).strip())
    return lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def localize(code: str, address: str | None) -> str:
    """``code`` with the documented addresses replaced by ``address``'s, and a free port."""
    if address is not None:
        host, port = address.rsplit(":", 1)
        code = DOCUMENTED_ADDRESS.sub(address, code)
        code = DOCUMENTED_HOST_PORT.sub(f'"{host}", {port}', code)
    code = re.sub(r"\b8888\b", str(free_port()), code)  # the foundations' own server
    assert "192.168." not in code and ":8787" not in code, code
    return code


def run_snippet(code: str, cwd: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    path = os.path.join(cwd, "snippet.py")
    with open(path, "w", encoding="utf-8") as f:
        f.write(code)
    return subprocess.run([sys.executable, path], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=SNIPPET_TIMEOUT)


def test_readme_has_the_python_blocks_it_documents():
    assert len(BLOCKS) >= 7
    for _, code in BLOCKS:
        compile(code, README, "exec")


@pytest.mark.timeout(180)
@pytest.mark.parametrize("start,code", BLOCKS, ids=[f"line{start}" for start, _ in BLOCKS])
def test_readme_block_runs_as_written(tmp_path, start, code):
    needs_cluster = DOCUMENTED_ADDRESS.search(code) or DOCUMENTED_HOST_PORT.search(code)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.pop("MINIDIST_AUTH_KEY", None)
    if needs_cluster:
        with LocalCluster(n_workers=2, threads_per_worker=1) as cluster:
            env["MINIDIST_AUTH_KEY"] = cluster.auth_key.decode()
            result = run_snippet(localize(code, cluster.address), str(tmp_path), env)
    else:
        result = run_snippet(localize(code, None), str(tmp_path), env)
    where = f"README.md line {start}"
    assert result.returncode == 0, f"{where} failed:\n{result.stderr}"
    assert result.stdout.splitlines() == expected_output(code), (where, result.stderr)
    if "progress(futures)" in code:  # the bar goes to stderr: on a pipe, plain lines
        assert re.search(r"100%\|#+\| 1000/1000 \[", result.stderr), result.stderr
    if "performance_report(" in code:  # the report shows the runs of its block
        with open(tmp_path / "report.html", encoding="utf-8") as f:
            assert "<td>task runs</td><td>100</td>" in f.read()


# --------------------------------------------------------------------------- benchmark names


def accepted_systems() -> tuple[str, ...]:
    from benchmarks.systems import SYSTEMS
    return SYSTEMS


def check_system_name(name: str) -> None:
    """``name`` is a column that is no system, or a name ``--systems`` accepts."""
    if name in NOT_SYSTEMS:
        return
    from benchmarks.runner import parse_args
    assert parse_args(["--systems", name]).systems == [name]


def test_benchmark_systems_table_names_what_systems_takes():
    with open(BENCH_README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## The systems", 1)[1].split("\n## ", 1)[0]
    names = re.findall(r"^\| `([^`]+)` \|", section, re.M)
    assert set(names) - NOT_SYSTEMS == set(accepted_systems()), names
    for name in names:
        check_system_name(name)


def test_performance_table_columns_are_system_names():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    header = next(line for line in text.splitlines()
                  if line.startswith("| workload | metric |") and "target" in line)
    cells = [cell.strip() for cell in header.strip("|").split("|")]
    columns = cells[cells.index("metric") + 1:cells.index("target")]
    assert set(columns) - NOT_SYSTEMS == set(accepted_systems()), columns
    for name in columns:
        check_system_name(name)


def test_systems_named_in_commands_are_accepted():
    found = []
    for path in (README, BENCH_README):
        with open(path, encoding="utf-8") as f:
            for value in re.findall(r"--systems[ =]([\w,]+)", f.read()):
                found += value.split(",")
    assert found
    for name in found:
        check_system_name(name)


def test_table_columns_use_the_names_of_systems():
    from benchmarks.runner import SHORT
    for system in accepted_systems():
        assert SHORT[system] == system
