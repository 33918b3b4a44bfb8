"""``dssh`` against real sshd servers running in the test's hosts.

Each host runs ``sshd -D`` with its own config (a throwaway host key, key
login for root only, no PAM); dssh runs on a third host and starts the
center on the first and a worker on each, a client computes on it, and
once dssh is stopped (or killed) nothing but sshd is left on any host.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import minidist
from nethosts import net, pids_in_namespace  # noqa: F401  (net: a fixture)

pytestmark = pytest.mark.multihost

KEY = secrets.token_hex(16)
ENV = {"MINIDIST_AUTH_KEY": KEY}
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SOURCE_ROOT = str(Path(minidist.__file__).resolve().parents[1])


def inc(x):
    return x + 1


def connect(state, address, expect):
    """In the agent: a Client on ``address``; the workers' hosts once ``expect`` are there."""
    from minidist import Client
    c = state["c"] = Client(address, set_as_default=False)
    deadline = time.monotonic() + 30
    while len(c.nthreads()) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(a.rpartition(":")[0] for a in c.nthreads())


@pytest.fixture
def ssh_keys(tmp_path):
    if not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")):
        pytest.skip("dssh tests need OpenSSH (ssh, ssh-keygen, sshd: apt-get install "
                    "openssh-server openssh-client)")
    keys = {}
    for name in ("host", "user"):
        path = tmp_path / f"{name}_ed25519"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"test {name}",
                        "-f", str(path)], check=True, capture_output=True, timeout=30)
        keys[name] = str(path)
    return keys


def start_sshd(net, host, keys, tmp_path):
    """sshd on ``host``'s address, port 22, root by key only; returns once it listens."""
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege-separation directory
    config = tmp_path / f"sshd_{host.name}.conf"
    config.write_text(f"""\
ListenAddress {host.ip}:22
HostKey {keys['host']}
PidFile none
AuthorizedKeysFile {keys['user']}.pub
UsePAM no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
""")
    proc = net.popen(host, [SSHD, "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                     tag="sshd")
    deadline = time.monotonic() + 20
    while "Server listening on" not in proc.log():
        assert proc.popen.poll() is None and time.monotonic() < deadline, proc.log()
        time.sleep(0.02)
    return proc


def cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def others_in(ns, allowed):
    return sorted(set(pids_in_namespace(ns)) - set(allowed))


@pytest.mark.timeout(90)
@pytest.mark.parametrize("stop", [(signal.SIGTERM,), (signal.SIGINT,), (signal.SIGKILL,),
                                  (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                   signal.SIGTERM, signal.SIGINT)],
                         ids=["SIGTERM", "Ctrl-C", "SIGKILL", "burst"])
def test_dssh_starts_a_cluster_and_leaves_nothing(net, tmp_path, ssh_keys, stop):
    h1, h2, here = net.host("h1"), net.host("h2"), net.host("cl")
    sshds = [start_sshd(net, h, ssh_keys, tmp_path) for h in (h1, h2)]
    pythonpath = os.pathsep.join(p for p in (SOURCE_ROOT, os.environ.get("PYTHONPATH")) if p)
    dssh = net.popen(here, [
        sys.executable, "-m", "minidist.ssh", h1.ip, h2.ip, "--nthreads", "2",
        "--center-port", "8786", "--ssh-identity", ssh_keys["user"],
        "--ssh-option", "StrictHostKeyChecking=no", "--ssh-option", "UserKnownHostsFile=/dev/null",
        "--ssh-option", "LogLevel=ERROR", "--remote-python", sys.executable,
        "--remote-env", f"PYTHONPATH={pythonpath}",
        "--remote-env", f"MINIDIST_TEST_SESSION={os.environ['MINIDIST_TEST_SESSION']}",
        "--worker-option=--heartbeat-interval=0.5"], env=ENV, tag="dssh")
    assert dssh.wait_line(f"[{h1.ip}] Start center at") == \
        f"[{h1.ip}] Start center at {h1.ip}:8786"

    agent = net.agent(here, env=ENV)
    assert agent.call(connect, f"{h1.ip}:8786", expect=2) == sorted([h1.ip, h2.ip])
    assert agent.call(lambda s: s["c"].submit(sum, s["c"].map(inc, range(50))).result(30)) \
        == sum(range(1, 51))
    for h in (h1, h2):  # each host's lines come prefixed with it
        dssh.wait_line(f"[{h.ip}] Registered with center at:  {h1.ip}:8786", timeout=10)
    assert any(line.startswith(f"[{h2.ip}] Start worker at:            {h2.ip}:")
               for line in dssh.lines), dssh.lines
    programs = [p for h in (h1, h2) for p in others_in(h.ns, [s.pid for s in sshds])]
    assert len(programs) >= 6, programs  # sshd sessions, bootstraps, center, workers
    for pid in programs + others_in(here.ns, [agent.pid]):  # the key is on no command line
        assert KEY.encode() not in cmdline(pid), cmdline(pid)

    for sig in stop:
        dssh.popen.send_signal(sig)
    if signal.SIGKILL not in stop:  # every session ended by itself once its stdin closed
        assert dssh.popen.wait(30) == 0, dssh.log()
        assert "dropping the session" not in dssh.log()
    deadline = time.monotonic() + 30
    while any(others_in(h.ns, [s.pid for s in sshds]) for h in (h1, h2)) or \
            others_in(here.ns, [agent.pid]):
        assert time.monotonic() < deadline, \
            {h.name: others_in(h.ns, [s.pid for s in sshds]) for h in (h1, h2, here)}
        time.sleep(0.05)
    assert all(s.popen.poll() is None for s in sshds)  # only the sessions went
