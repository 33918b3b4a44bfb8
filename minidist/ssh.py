"""Start a cluster on many hosts through the system ``ssh`` client: ``dssh HOST [HOST ...]``.

The center runs on the first host, workers on every host.  One ssh session
per program group, and nothing to install beyond minidist itself::

  dssh (here)                                        each host
  -----------                                        ---------
  ssh HOST python3 -u -c BOOTSTRAP ---stdin------->  bootstrap: reads one JSON line
                                    (JSON line,      (environment with the key, and
                                     then held open)  the programs to start), then
       <--- stdout: the programs' lines -----------   starts them; each one's stdin
       printed here as "[HOST] line"                  is a pipe from the bootstrap

1. dssh opens a session to the first host whose bootstrap starts
   ``python -m minidist.center`` and waits for ``Start center at ADDR``.
2. It opens a session to every host whose bootstrap starts
   ``python -m minidist.worker ADDR --nthreads T`` (with ``--nworkers N``
   when N > 1, for the supervisor to start N worker processes).
3. It prints every line each session sends, prefixed with the host, until
   SIGINT or SIGTERM.  Then it closes the workers' sessions' stdin, then the
   center's, and waits for each session to end.

The auth key travels in the JSON line on the session's stdin and reaches
the programs through their environment (``MINIDIST_AUTH_KEY``): it is never
on a command line, here or there.  The bootstrap watches its stdin: when
it closes, because dssh stops or dies or the connection drops, it sends
SIGTERM to its programs, SIGKILL to any still running 10 s later, and
exits.  The programs also run with ``--exit-on-stdin-close``, so they go
if the bootstrap itself is killed.  Nothing is left running on any host.
"""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import signal
import subprocess
import sys
import threading
import time
from typing import Any
from collections.abc import Sequence

from . import wire
from .cli import DefaultsHelpFormatter, StopFlag, configure_logging, ignore_stop_signals

logger = logging.getLogger("minidist.ssh")

_BOOTSTRAP = """\
import json, os, select, signal, subprocess, sys, threading
spec = json.loads(sys.stdin.buffer.readline())
env = dict(os.environ, **spec["env"])
procs = [subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env) for argv in spec["commands"]]
wake_r, wake_w = os.pipe()
os.set_blocking(wake_w, False)
def request_stop(*_):
    try:
        os.write(wake_w, b"x")
    except OSError:
        pass
def watch():
    while sys.stdin.buffer.read1(4096):
        pass
    request_stop()
for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
    signal.signal(sig, request_stop)
signal.set_wakeup_fd(wake_w)
threading.Thread(target=watch, daemon=True).start()
while not select.select([wake_r], [], [], 0.2)[0]:
    if all(p.poll() is not None for p in procs):
        os._exit(1 if any(p.returncode for p in procs) else 0)
for p in procs:
    if p.poll() is None:
        p.terminate()
for p in procs:
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
os._exit(0)
"""
"""Runs on each host (stdlib only): start the programs, stop them when stdin closes.

A signal or stdin's EOF only writes a byte to a pipe; the main thread, which
polls the programs while waiting on that pipe, does the stopping, so a burst
of signals never re-enters it."""

CENTER_READY = "Start center at"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
"""Signals that stop dssh: workers first, then the center."""
STOP_WAIT = 15.0
"""Seconds a session may take to stop its programs before its ssh client is killed."""


class Session:
    """One ssh session running the bootstrap on ``host``; its lines are printed prefixed."""

    def __init__(self, host: str, ssh: list[str], remote_python: str, env: dict[str, str],
                 commands: list[list[str]], out_lock: threading.Lock) -> None:
        self.host = host
        self.center_address: str | None = None
        self._ready = threading.Event()
        self._lock = out_lock
        remote = shlex.join([remote_python, "-u", "-c", _BOOTSTRAP])
        # A session of its own: Ctrl-C in the terminal reaches dssh, which stops in order.
        # "--": a host named like an option (-oProxyCommand=...) stays a host name.
        self.popen = subprocess.Popen([*ssh, "--", host, remote], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      start_new_session=True)
        stdin, stdout = self.popen.stdin, self.popen.stdout
        assert stdin is not None and stdout is not None  # both are pipes
        self._stdin, self._stdout = stdin, stdout
        spec = json.dumps({"env": env, "commands": commands}) + "\n"
        try:
            self._stdin.write(spec.encode())
            self._stdin.flush()
        except OSError:
            pass  # ssh already gone: its output says why
        self._reader = threading.Thread(target=self._relay, name=f"ssh-{host}", daemon=True)
        self._reader.start()

    def _relay(self) -> None:
        for raw in self._stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            if line.startswith(CENTER_READY) and self.center_address is None:
                self.center_address = line.split()[-1]
                self._ready.set()
            with self._lock:
                print(f"[{self.host}] {line}", flush=True)
        self._ready.set()

    def wait_for_center(self, timeout: float) -> str | None:
        """The address the center printed, or None if the session ended or timed out first."""
        self._ready.wait(timeout)
        return self.center_address

    def alive(self) -> bool:
        return self.popen.poll() is None

    def close(self) -> None:
        """Close the session's stdin: the bootstrap stops its programs and exits."""
        try:
            self._stdin.close()
        except OSError:
            pass

    def wait(self, timeout: float) -> None:
        """Wait for the session to end; kill the ssh client if it takes longer."""
        try:
            self.popen.wait(max(timeout, 0))
        except subprocess.TimeoutExpired:
            logger.warning("%s: still running after %.0fs; dropping the session",
                           self.host, STOP_WAIT)
            self.popen.kill()
            self.popen.wait()
        self._reader.join(5)
        self._stdout.close()


def ssh_command(args: argparse.Namespace) -> list[str]:
    """``ssh`` and its options; the user's ``--ssh-option`` values come first, so they win."""
    cmd = ["ssh", "-T"]
    for option in args.ssh_option:
        cmd += ["-o", option]
    cmd += ["-o", "BatchMode=yes", "-o", "ServerAliveInterval=10",
            "-o", "ServerAliveCountMax=3"]
    if args.ssh_port is not None:
        cmd += ["-p", str(args.ssh_port)]
    if args.ssh_identity:
        cmd += ["-i", args.ssh_identity]
    return cmd


def program_args(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The options the center and the workers share, and the workers' extra options."""
    common = ["--log-level", args.log_level, "--exit-on-stdin-close"]
    for flag in ("tls_cert", "tls_key", "tls_ca"):
        if getattr(args, flag):
            common += ["--" + flag.replace("_", "-"), getattr(args, flag)]
    worker = ["--nthreads", str(args.nthreads)]
    if args.nworkers > 1:
        worker += ["--nworkers", str(args.nworkers)]
    return common, worker


def remote_env(args: argparse.Namespace, key: bytes) -> dict[str, str]:
    env = {"MINIDIST_AUTH_KEY": key.decode(errors="surrogateescape"), "PYTHONUNBUFFERED": "1"}
    for item in args.remote_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError(f"--remote-env wants NAME=VALUE, got {item!r}")
        env[name] = value
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="dssh", description="Start a minidist cluster over ssh: the center on the first "
        "host, workers on every host.  Ctrl-C or SIGTERM stops it everywhere.",
        formatter_class=DefaultsHelpFormatter)
    parser.add_argument("hosts", nargs="+", metavar="HOST",
                        help="[USER@]HOST to ssh to; the first also runs the center")
    parser.add_argument("--nworkers", type=int, default=1, help="worker processes per host")
    parser.add_argument("--nthreads", type=int, default=1, help="task threads per worker")
    parser.add_argument("--center-port", type=int, default=wire.DEFAULT_PORT,
                        help="port of the center (0: any free port)")
    parser.add_argument("--ssh-port", type=int, default=None,
                        help="port sshd listens on (default: ssh's own, usually 22)")
    parser.add_argument("--ssh-identity", default=None,
                        help="private key file for ssh -i (default: ssh's own)")
    parser.add_argument("--ssh-option", action="append", default=[], metavar="OPTION",
                        help="passed to ssh as -o OPTION (repeatable)")
    parser.add_argument("--remote-python", default="python3",
                        help="Python on the hosts that can import minidist")
    parser.add_argument("--remote-env", action="append", default=[], metavar="NAME=VALUE",
                        help="environment variable for the remote programs (repeatable)")
    parser.add_argument("--center-option", action="append", default=[], metavar="ARG",
                        help="extra argument for dcenter, e.g. --center-option=--dashboard-port"
                             "=8788 (repeatable)")
    parser.add_argument("--worker-option", action="append", default=[], metavar="ARG",
                        help="extra argument for dworker, e.g. --worker-option=--death-timeout"
                             "=60 (repeatable)")
    parser.add_argument("--auth-key-file", help="file holding the shared auth key "
                        "(default: the MINIDIST_AUTH_KEY environment variable)")
    parser.add_argument("--tls-cert", help="PEM certificate, a path on the hosts")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert, a path on the hosts")
    parser.add_argument("--tls-ca", help="PEM CA bundle, a path on the hosts")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds to wait for the center to start")
    parser.add_argument("--log-level", default="warning",
                        help="debug, info, warning or error: what goes to stderr")
    args = parser.parse_args(argv)
    if args.nworkers < 1 or args.nthreads < 1:
        parser.error("--nworkers and --nthreads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m minidist.ssh HOST [HOST ...]`` / ``dssh``."""
    args = parse_args(argv)
    configure_logging(args.log_level)
    try:
        key = wire.resolve_auth_key(auth_key_file=args.auth_key_file)
        env = remote_env(args, key or b"")
    except (OSError, ValueError) as e:
        print(f"dssh: {e}", file=sys.stderr)
        return 2
    if key is None:
        print("dssh: a cluster across hosts needs a shared auth key: export "
              "MINIDIST_AUTH_KEY or pass --auth-key-file", file=sys.stderr)
        return 2

    stop = StopFlag()  # set from the handler: it must take no lock

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()
    for sig in STOP_SIGNALS:
        signal.signal(sig, on_signal)
    stop.wake_on_signals()

    ssh = ssh_command(args)
    common, worker_only = program_args(args)
    lock = threading.Lock()
    center = Session(args.hosts[0], ssh, args.remote_python, env,
                     [["-m", "minidist.center", "--port", str(args.center_port), *common,
                       *args.center_option]], lock)
    workers: list[Session] = []
    code = 0
    try:
        deadline = time.monotonic() + args.timeout
        address = None
        while address is None and not stop.is_set() and center.alive():
            if time.monotonic() > deadline:
                break
            address = center.wait_for_center(0.2)
        if address is None:
            if not stop.is_set():
                logger.error("no center started on %s", args.hosts[0])
                code = 1
            return code
        worker_cmd = ["-m", "minidist.worker", address, *worker_only, *common,
                      *args.worker_option]
        workers = [Session(host, ssh, args.remote_python, env, [worker_cmd], lock)
                   for host in args.hosts]
        reported: set[str] = set()
        while not stop.wait(0.2):
            if not center.alive():
                logger.error("the center's session on %s ended; stopping", center.host)
                code = 1
                break
            for s in workers:
                if not s.alive() and s.host not in reported:
                    reported.add(s.host)
                    logger.warning("the workers' session on %s ended (status %s)", s.host,
                                   s.popen.returncode)
        return code
    finally:
        ignore_stop_signals(STOP_SIGNALS)  # stopping: a late signal must not end dssh midway
        _shutdown(workers, center)


def _shutdown(workers: list[Session], center: Session) -> None:
    """Workers first (they tell the center they leave), then the center."""
    for group in (workers, [center]):
        for s in group:
            s.close()
        deadline = time.monotonic() + STOP_WAIT
        for s in group:
            s.wait(deadline - time.monotonic())


if __name__ == "__main__":
    sys.exit(main())
