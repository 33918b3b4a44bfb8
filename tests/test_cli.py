"""The command line: ``python -m minidist.center`` / ``minidist.worker`` and their console scripts.

Each test starts its own center and workers as a user would, reads their
ready lines, and ends them by PID (the ``spawn`` fixture).
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

from minidist import Executor, wire

from conftest import reap, wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADDRESS = r"127\.0\.0\.1:(\d+)"


def inc(x):
    return x + 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_until(popen: subprocess.Popen, stream, prefix: str = "", timeout: float = 20.0,
               contains: str | None = None) -> list[str]:
    """Lines of ``stream`` up to the first that starts with ``prefix`` (or has ``contains``)."""
    lines: list[str] = []
    buffer = b""
    deadline = time.monotonic() + timeout
    fd = stream.fileno()
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line starting with {prefix!r} in {timeout}s: {lines}")
            if not sel.select(min(remaining, 0.2)):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                raise AssertionError(f"process exited ({popen.wait()}) before {prefix!r}: {lines}")
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            for raw in complete:
                line = raw.decode(errors="replace")
                lines.append(line)
                if (line.startswith(prefix) if contains is None else contains in line):
                    return lines


def entry_points() -> dict[str, str]:
    """``name -> module:function`` of the console scripts declared in setup.py."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "entry_points":
            scripts = ast.literal_eval(node.value)["console_scripts"]
            for spec in scripts:
                name, target = (part.strip() for part in spec.split("="))
                found[name] = target
    return found


# ---------------------------------------------------------------------------


def test_center_prints_ready_line_with_port(spawn):
    center = spawn("center", "--port", "0")
    assert len(center.lines) == 1
    m = re.fullmatch(rf"Start center at {ADDRESS}", center.lines[0])
    assert m and int(m.group(1)) > 0
    with socket.create_connection(("127.0.0.1", int(m.group(1))), timeout=5):
        pass  # it is listening once the line is out


def test_center_serves_the_listening_socket_it_is_handed(spawn):
    """LocalCluster binds the center's port; a dial queued before the center runs is served."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    early = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        center = spawn("center", "--listen-fd", str(listener.fileno()),
                       pass_fds=(listener.fileno(),))
    finally:
        listener.close()
    assert center.address == f"127.0.0.1:{port}"
    wire.answer_challenge(early, wire.resolve_auth_key(), center.address)
    conn = wire.Connection(early, center.address)
    try:
        assert conn.request({"op": "info"})["workers"] == 0
    finally:
        conn.close()
    spawn("worker", center.address)
    with Executor(center.address) as e:
        assert e.submit(inc, 1).result(timeout=10) == 2


def test_worker_prints_two_ready_lines_and_computes(spawn):
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address, "--nthreads", "2")
    assert len(worker.lines) == 3  # the seed's two lines, then the nanny names the process
    assert re.fullmatch(rf"Start worker at:            {ADDRESS}", worker.lines[0])
    assert worker.lines[1] == f"Registered with center at:  {center.address}"
    assert re.fullmatch(r"Worker pid:                 \d+", worker.lines[2])
    with Executor(center.address) as e:
        assert e.nthreads() == {worker.address: 2}
        assert e.submit(inc, 1).result(timeout=10) == 2
        assert list(e.map(pow, range(5), range(5))) == [1, 1, 4, 27, 256]


def test_console_scripts_declared_and_behave_the_same(spawn):
    scripts = entry_points()
    assert scripts == {"dcenter": "minidist.center:main", "dworker": "minidist.worker:main",
                       "dssh": "minidist.ssh:main"}  # dssh: tests/multihost/test_ssh.py
    procs = []
    try:
        def run(name, *args):
            module, func = scripts[name].split(":")
            code = f"import sys; from {module} import {func}; sys.exit({func}())"
            popen = subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            procs.append(popen)
            return popen

        center = run("dcenter", "--port", "0")
        lines = read_until(center, center.stdout, "Start center at")
        m = re.fullmatch(rf"Start center at {ADDRESS}", lines[-1])
        assert m
        address = lines[-1].split()[-1]
        worker = run("dworker", address, "--nthreads", "2", "--name", "scripted")
        lines = read_until(worker, worker.stdout, "Registered with center at:")
        assert re.fullmatch(rf"Start worker at:            {ADDRESS}", lines[0])
        assert lines[1] == f"Registered with center at:  {address}"
        with Executor(address) as e:
            info = e._center("workers")
            assert [w["name"] for w in info.values()] == ["scripted"]
            assert e.submit(inc, 41).result(timeout=10) == 42
        for popen in (worker, center):
            popen.send_signal(signal.SIGTERM)
            assert popen.wait(10) == 0
    finally:
        for popen in procs:
            reap(popen)


def test_installed_console_scripts_exist():
    from importlib.metadata import entry_points as installed
    names = {ep.name: ep.value for ep in installed(group="console_scripts")}
    assert names.get("dcenter") == "minidist.center:main"
    assert names.get("dworker") == "minidist.worker:main"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_worker_signal_leaves_cleanly(spawn, sig):
    # A long heartbeat timeout: only the worker saying goodbye can remove it quickly.
    center = spawn("center", "--port", "0", "--heartbeat-timeout", "120", "--log-level", "info")
    stays = spawn("worker", center.address)
    leaves = spawn("worker", center.address)
    with Executor(center.address) as e:
        assert set(e.nthreads()) == {stays.address, leaves.address}
        assert leaves.stop(sig) == 0
        wait_for(lambda: set(e.nthreads()) == {stays.address}, timeout=5,
                 message="the center to drop the worker")
        assert e.submit(inc, 1, pure=False).result(timeout=10) == 2
    center.popen.send_signal(signal.SIGTERM)
    assert center.popen.wait(10) == 0
    log = center.log()
    assert f"removing worker {leaves.address}: worker is leaving" in log


def test_center_sigterm_exits_zero(spawn):
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address)
    assert center.stop(signal.SIGTERM) == 0
    assert worker.popen.poll() is None  # a worker outlives its center and waits for it
    assert worker.stop(signal.SIGTERM) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_right_after_ready_lines_exits_zero(spawn, sig):
    # whoever waits for the ready lines may signal at once: the handlers are in place
    for _ in range(3):
        center = spawn("center", "--port", "0")
        worker = spawn("worker", center.address)
        assert worker.stop(sig) == 0
        assert center.stop(sig) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_worker_waiting_for_its_center_stops_on_signal(sig):
    worker = subprocess.Popen(
        [sys.executable, "-m", "minidist.worker", f"127.0.0.1:{free_port()}", "--log-level",
         "info"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        read_until(worker, worker.stderr, contains="unreachable", timeout=20)
        worker.send_signal(sig)
        assert worker.wait(10) == 0
        assert worker.stdout.read() == b""  # it never claimed to be ready
    finally:
        reap(worker)


def test_name_and_nthreads_reflected_in_workers(spawn):
    center = spawn("center", "--port", "0")
    w1 = spawn("worker", center.address, "--name", "alice", "--nthreads", "3")
    w2 = spawn("worker", center.address, "--name", "bob")
    with Executor(center.address) as e:
        info = e._center("workers")
        assert info[w1.address]["name"] == "alice" and info[w1.address]["nthreads"] == 3
        assert info[w2.address]["name"] == "bob" and info[w2.address]["nthreads"] == 1
        assert e.nthreads() == {w1.address: 3, w2.address: 1}
        assert info[w1.address]["pid"] == w1.pid
        # names work as placement targets
        pid = e.submit(os.getpid, workers=["bob"], pure=False).result(timeout=10)
        assert pid == w2.pid


def test_worker_port_option(spawn):
    center = spawn("center", "--port", "0")
    port = free_port()
    worker = spawn("worker", center.address, "--port", str(port))
    assert worker.address == f"127.0.0.1:{port}"


def test_worker_started_before_center_registers_when_it_comes_up(spawn):
    port = free_port()
    address = f"127.0.0.1:{port}"
    worker = subprocess.Popen(
        [sys.executable, "-m", "minidist.worker", address, "--log-level", "info"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        # it is trying (and failing) to reach the center
        read_until(worker, worker.stderr, contains="unreachable", timeout=20)
        assert worker.poll() is None
        center = spawn("center", "--port", str(port))
        assert center.address == address
        ready = read_until(worker, worker.stdout, "Registered with center at:", timeout=20)
        assert ready[-1] == f"Registered with center at:  {address}"
        with Executor(address) as e:
            assert len(e.nthreads()) == 1
            assert e.submit(inc, 5).result(timeout=10) == 6
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(10) == 0
    finally:
        reap(worker)


def test_bad_arguments_fail_clearly():
    out = subprocess.run([sys.executable, "-m", "minidist.worker"], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "center" in out.stderr
    out = subprocess.run([sys.executable, "-m", "minidist.center", "--port", "notaport"],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode != 0 and "--port" in out.stderr


def test_center_port_in_use_fails_clearly(spawn):
    center = spawn("center", "--port", "0")
    port = center.address.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "minidist.center", "--port", port], cwd=ROOT,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert "cannot start center" in out.stderr


def test_center_handed_a_closed_socket_fails_clearly():
    with socket.socket() as s:
        closed_fd = s.fileno()  # closed on leaving the block; not inherited either way
    out = subprocess.run([sys.executable, "-m", "minidist.center", "--listen-fd", str(closed_fd)],
                         cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1
    assert f"cannot start center on socket {closed_fd}" in out.stderr


def block_on(path):
    while not os.path.exists(path):
        time.sleep(0.01)
    return os.getpid()


def test_busy_worker_leaves_and_its_task_moves(spawn, tmp_path):
    flag = str(tmp_path / "flag")
    center = spawn("center", "--port", "0", "--heartbeat-timeout", "120")
    busy = spawn("worker", center.address)
    with Executor(center.address) as e:
        f = e.submit(block_on, flag, workers=[busy.address])
        wait_for(lambda: e._center("workers")[busy.address]["processing"], message="running")
        other = spawn("worker", center.address)
        assert busy.stop(signal.SIGTERM) == 0  # does not wait for its running task
        wait_for(lambda: set(e.nthreads()) == {other.address}, timeout=5,
                 message="the center to drop the worker")
        open(flag, "w").close()
        # its restriction cannot be met any more: the task waits, it is not lost or run
        # elsewhere; an unrestricted copy runs on the remaining worker
        assert e.submit(block_on, flag, pure=False).result(timeout=10) == other.pid
        assert not f.done()
        assert f.cancel()  # or leaving the with block would wait for it forever


def test_center_status_page(spawn):
    """``--dashboard-port`` serves JSON: task counts and the workers, read through the scheduler."""
    import json
    import urllib.request

    port = free_port()
    center = spawn("center", "--port", "0", "--dashboard-port", str(port))
    worker = spawn("worker", center.address, "--nthreads", "2", "--name", "w-status")

    def status():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/status.json", timeout=5) as r:
            assert r.headers["Content-Type"] == "application/json"
            return json.loads(r.read())

    page = wait_for(lambda: status() if status()["workers"] else None, message="worker listed")
    assert page["center"] == center.address
    [(address, info)] = page["workers"].items()
    assert address == worker.address and info["nthreads"] == 2 and info["name"] == "w-status"
    assert page["info"]["workers"] == 1
    with Executor(center.address) as e:
        f = e.submit(abs, -3)
        assert f.result(timeout=10) == 3
        wait_for(lambda: status()["info"]["tasks"] == {"memory": 1},  # read once a second
                 message="the task in status.json")
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=5)


# --------------------------------------------------------------------------- --help


class _Parsed(Exception):
    """Raised in place of parsing: carries the parser a program's main built."""

    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__()
        self.parser = parser


def program_parser(monkeypatch, main, argv: list[str]) -> argparse.ArgumentParser:
    """The parser ``main(argv)`` builds, caught when it starts to parse."""
    def capture(parser, *args, **kwargs):
        raise _Parsed(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as caught:
        main(argv)
    monkeypatch.undo()
    return caught.value.parser


def help_entries(text: str) -> dict[str, str]:
    """Each option's help in ``--help`` output, whitespace collapsed, by its first flag."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"  (-[-\w]+|[A-Z]+|\w+)\b", line)
        if match and not line.startswith("   "):
            current = match.group(1)
            entries[current] = line
        elif current and line.startswith("   "):
            entries[current] += " " + line
    return {flag: " ".join(entry.split()) for flag, entry in entries.items()}


PROGRAMS = {
    "center": ("minidist.center", []),
    "worker": ("minidist.worker", ["127.0.0.1:8787"]),
    "ssh": ("minidist.ssh", ["host"]),
}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_help_shows_every_default(monkeypatch, program):
    module_name, argv = PROGRAMS[program]
    module = __import__(module_name, fromlist=["main"])
    parser = program_parser(monkeypatch, module.main, argv)
    shown = subprocess.run([sys.executable, "-m", module_name, "--help"], capture_output=True,
                           text=True, timeout=60, check=True).stdout
    entries = help_entries(shown)
    checked = 0
    for action in parser._actions:
        default = action.default
        if (not action.option_strings or action.help == argparse.SUPPRESS or default is None
                or default is False or default == [] or default == argparse.SUPPRESS):
            continue
        entry = entries.get(action.option_strings[0], "")
        assert f"(default: {default})" in entry, (action.option_strings, entry)
        checked += 1
    assert checked >= 3


def test_help_shows_the_defaults_the_readme_states():
    def shown(module: str) -> str:
        out = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
        return " ".join(out.split())
    center, ssh = shown("minidist.center"), shown("minidist.ssh")
    for expected in ("(default: 8787)", "(default: 5.0)", "(default: 3)"):
        assert expected in center
    for expected in ("(default: python3)", "(default: 8787)", "(default: 60.0)"):
        assert expected in ssh
