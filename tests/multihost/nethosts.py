"""Separate hosts on one machine: network namespaces on a bridge; the ``net`` fixture.

Each test that takes ``net`` gets a private /24 (``10.200.X.0/24``, X picked at
random and not in use) on a bridge of its own; ``net.host("w1")`` adds a
network namespace joined to the bridge by a veth pair, with loopback up and
one address.  Processes run inside a host with ``ip netns exec`` (which
execs, so the PID is the program's) and are ended by PID::

    root namespace:  bridge <name>br ── <ns>h ═ veth ═ <ns>n (10.200.X.k, in namespace <ns>)

Clients run in a host too, as an :class:`Agent`: a Python process that
executes the functions the test sends it (cloudpickled over its stdin) and
sends back what they return, keeping a ``state`` dict between calls.

Partitions take the host-side end of a veth down (``link_down``) or add
blackhole routes between two hosts only (``block``); ``limit`` puts a tbf
qdisc on a link.  Every name starts with this run's prefix; when the test
ends, whether it passed or not, its processes are killed, its namespaces
(and with them the veths) and its bridge deleted, and the fixture checks
that nothing with the prefix is left in ``ip netns list`` or ``ip link``.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable

import cloudpickle
import pytest

from conftest import address_in

RUN_PREFIX = "m" + uuid.uuid4().hex[:3]
"""Every namespace, link and bridge of this run starts with this (names are at most 15 chars)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run ``ip ARGS`` (iproute2); raise with its stderr when it fails and ``check``."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if check and done.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def leftovers(prefix: str = RUN_PREFIX) -> list[str]:
    """Namespaces and links whose names start with ``prefix``."""
    names = [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line]
    for line in ip("-o", "link").stdout.splitlines():
        names.append(line.split(":")[1].strip().split("@")[0])
    return [n for n in names if n.startswith(prefix)]


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "multi-host tests need root to create network namespaces"
    if shutil.which("ip") is None:
        return "multi-host tests need iproute2 (`ip`) to create network namespaces"
    probe = f"{RUN_PREFIX}probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if done.returncode:
        return f"cannot create a network namespace: {done.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


_skip_reason: list[str | None] = []


def require_namespaces() -> None:
    if not _skip_reason:
        _skip_reason.append(_why_no_namespaces())
    if _skip_reason[0]:
        pytest.skip(_skip_reason[0])


class Host:
    """One namespace: name, address, and both ends of its veth."""

    def __init__(self, name: str, ns: str, addr: str) -> None:
        self.name = name
        self.ns = ns
        self.ip = addr
        self.outer = ns + "h"  # in the root namespace, a port of the bridge
        self.inner = ns + "n"  # in the host's namespace

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.ip}>"


class Proc:
    """A process running in a host, with its ready lines and a log file."""

    def __init__(self, popen: subprocess.Popen, host: Host, log_path: Path) -> None:
        self.popen = popen
        self.host = host
        self.lines: list[str] = []
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def address(self) -> str:
        return address_in(self.lines)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_line(self, prefix: str, timeout: float = 30.0) -> str:
        """The first line (kept in ``lines``) that starts with ``prefix``, read if need be."""
        for line in self.lines:
            if line.startswith(prefix):
                return line
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.popen.stdout], [], [], deadline - time.monotonic())[0]:
                break
            line = self.popen.stdout.readline().decode()
            if not line:
                raise AssertionError(f"{self.popen.args[3:]} on {self.host} exited "
                                     f"({self.popen.wait()}): {self.lines}\n{self.log()}")
            self.lines.append(line.rstrip("\n"))
            if line.startswith(prefix):
                return self.lines[-1]
        raise AssertionError(f"{self.popen.args[3:]} on {self.host}: no {prefix!r} within "
                             f"{timeout}s: {self.lines}\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal by PID and wait; SIGKILL if it does not exit in time."""
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        for pipe in (self.popen.stdin, self.popen.stdout):
            if pipe:
                pipe.close()
        return self.popen.returncode


class Agent(Proc):
    """A Python process in a host that runs the functions it is sent: ``fn(state, ...)``."""

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        data = cloudpickle.dumps((fn, args, kwargs))
        self.popen.stdin.write(struct.pack("!Q", len(data)) + data)  # unbuffered: all of it

    def done(self, timeout: float = 0.0) -> bool:
        """Whether the reply to the last ``submit`` has (begun to) come back."""
        return bool(select.select([self.popen.stdout], [], [], timeout)[0])

    def result(self, timeout: float = 60.0) -> Any:
        if not self.done(timeout):
            raise AssertionError(f"no reply from the agent on {self.host} within {timeout}s;"
                                 f" its log:\n{self.log()}")
        head = self._read(8)
        ok, value = cloudpickle.loads(self._read(struct.unpack("!Q", head)[0]))
        if ok:
            return value
        exc, tb = value
        raise exc from AssertionError(f"in the agent on {self.host}:\n{tb}")

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 60.0,
             **kwargs: Any) -> Any:
        self.submit(fn, *args, **kwargs)
        return self.result(timeout)

    def _read(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.popen.stdout.read(n - len(data))  # unbuffered: select sees the rest
            if not chunk:
                raise AssertionError(f"the agent on {self.host} exited ({self.popen.wait()}):"
                                     f" {self.log()}")
            data += chunk
        return bytes(data)


_AGENT = r"""
import os, struct, sys, traceback
import cloudpickle
requests = sys.stdin.buffer
replies = os.fdopen(os.dup(1), "wb")
os.dup2(2, 1)  # print() in a function goes to the log, not into the replies
state = {}
while True:
    head = requests.read(8)
    if len(head) < 8:
        break
    fn, args, kwargs = cloudpickle.loads(requests.read(struct.unpack("!Q", head)[0]))
    try:
        reply = (True, fn(state, *args, **kwargs))
    except BaseException as e:
        reply = (False, (e, traceback.format_exc()))
    try:
        data = cloudpickle.dumps(reply)
    except Exception as e:
        data = cloudpickle.dumps((False, (RuntimeError(repr(e)), traceback.format_exc())))
    replies.write(struct.pack("!Q", len(data)) + data)
    replies.flush()
for value in state.values():
    if hasattr(value, "close"):
        value.close()
"""


class Network:
    """A bridge and the hosts on it; ``close()`` removes everything it made."""

    def __init__(self, prefix: str, tmp_path: Path) -> None:
        self.prefix = prefix
        self.tmp_path = tmp_path
        self.hosts: dict[str, Host] = {}
        self.procs: list[Proc] = []
        self.bridge = prefix + "br"
        used = ip("-o", "addr").stdout + ip("route").stdout
        free = [x for x in range(256) if f"10.200.{x}." not in used]
        self.subnet = f"10.200.{random.choice(free)}"
        ip("link", "add", self.bridge, "type", "bridge")
        ip("link", "set", self.bridge, "up")

    def host(self, name: str) -> Host:
        """Add a namespace on the bridge with the next address of the subnet."""
        ns = self.prefix + name
        assert len(ns) + 1 <= 15, ns
        h = Host(name, ns, f"{self.subnet}.{len(self.hosts) + 1}")
        self.hosts[name] = h
        ip("netns", "add", ns)
        ip("link", "add", h.outer, "type", "veth", "peer", "name", h.inner)
        ip("link", "set", h.inner, "netns", ns)
        ip("link", "set", h.outer, "master", self.bridge)
        ip("link", "set", h.outer, "up")
        ip("-n", ns, "addr", "add", f"{h.ip}/24", "dev", h.inner)
        ip("-n", ns, "link", "set", h.inner, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        return h

    # ------------------------------------------------------------------ processes

    def popen(self, host: Host, argv: list[str], *, env: dict | None = None,
              stdin: Any = subprocess.PIPE, tag: str = "proc", cls: type = Proc) -> Proc:
        """Start ``argv`` inside ``host``; stderr goes to a log file."""
        log_path = self.tmp_path / f"{host.name}-{tag}-{len(self.procs)}.log"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(["ip", "netns", "exec", host.ns, *argv], stdin=stdin,
                                     stdout=subprocess.PIPE, stderr=log, bufsize=0,
                                     env={**os.environ, **(env or {})})
        proc = cls(popen, host, log_path)
        self.procs.append(proc)
        return proc

    def spawn(self, host: Host, role: str, *args: str, env: dict | None = None,
              ready: str | None = None, timeout: float = 30.0) -> Proc:
        """``python -m minidist.<role> ARGS`` in ``host``; returns once its ready line is out."""
        ready = ready or ("Start center at" if role == "center" else "Registered with center")
        proc = self.popen(host, [sys.executable, "-m", f"minidist.{role}", *args], env=env,
                          tag=role)
        proc.wait_line(ready, timeout)
        return proc

    def agent(self, host: Host, env: dict | None = None) -> Agent:
        """A Python process in ``host`` that runs functions for the test (see ``Agent``)."""
        return self.popen(host, [sys.executable, "-c", _AGENT], env=env, tag="agent",
                          cls=Agent)

    # ------------------------------------------------------------------ links

    def link_down(self, host: Host) -> None:
        """Unplug ``host``: its link to the bridge goes down, it reaches nobody."""
        ip("link", "set", host.outer, "down")

    def link_up(self, host: Host) -> None:
        ip("link", "set", host.outer, "up")

    def block(self, a: Host, b: Host) -> None:
        """Cut ``a`` and ``b`` off from each other only (blackhole routes both ways)."""
        ip("-n", a.ns, "route", "add", "blackhole", f"{b.ip}/32")
        ip("-n", b.ns, "route", "add", "blackhole", f"{a.ip}/32")

    def unblock(self, a: Host, b: Host) -> None:
        ip("-n", a.ns, "route", "del", "blackhole", f"{b.ip}/32")
        ip("-n", b.ns, "route", "del", "blackhole", f"{a.ip}/32")

    def limit(self, host: Host, rate: str) -> None:
        """Limit ``host``'s link to ``rate`` (tc tbf, e.g. ``"16mbit"``) in both directions."""
        for cmd in (["tc"], ["ip", "netns", "exec", host.ns, "tc"]):
            dev = host.outer if len(cmd) == 1 else host.inner
            subprocess.run([*cmd, "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
                            "burst", "64kb", "latency", "400ms"],
                           check=True, capture_output=True, timeout=20)

    def sent_bytes(self, host: Host) -> int:
        """Bytes the limit on ``host``'s link passed towards it (``tc -s qdisc``)."""
        out = subprocess.run(["tc", "-s", "qdisc", "show", "dev", host.outer], check=True,
                             capture_output=True, text=True, timeout=20).stdout
        words = out.split()
        return int(words[words.index("Sent") + 1])

    # ------------------------------------------------------------------ teardown

    def close(self) -> None:
        """Kill every process by PID, then delete the namespaces (and veths) and the bridge.

        Besides the processes started here, whatever else runs inside a host
        (a program an ssh session started, say) is killed by PID too: once
        its namespace is gone, it could never be reached again.
        """
        for proc in self.procs:
            if proc.popen.poll() is None:
                proc.popen.kill()
            proc.stop()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            stray = [pid for h in self.hosts.values() for pid in pids_in_namespace(h.ns)]
            if not stray:
                break
            for pid in stray:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.02)
        for h in self.hosts.values():
            ip("netns", "del", h.ns, check=False)
            ip("link", "del", h.outer, check=False)
        ip("link", "del", self.bridge, check=False)


def pids_in_namespace(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns``."""
    try:
        target = os.stat(f"/run/netns/{ns}").st_ino
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                    found.append(int(entry))
            except OSError:
                pass
    return found


# --------------------------------------------------------------------------- fixtures
# (imported by the test modules: a conftest.py here would shadow tests/conftest.py)

_networks = iter("abcdefghijklmnopqrstuvwxyz")


@pytest.fixture
def net(tmp_path):
    """A fresh network of namespaces for one test; removed afterwards, pass or fail."""
    require_namespaces()
    prefix = RUN_PREFIX + next(_networks)
    network = Network(prefix, tmp_path)
    try:
        yield network
    finally:
        network.close()
        left = leftovers(prefix)
        assert not left, f"left behind: {left}"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, str]:
    """A CA and one certificate signed by it, for any 10.200.x.y address."""
    d = tmp_path_factory.mktemp("mh-tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=minidist multi-host test CA", cwd=d)
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node", cwd=d)
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2", cwd=d)
    return {name: str(d / name) for name in ("ca.pem", "node.pem", "node.key")}
