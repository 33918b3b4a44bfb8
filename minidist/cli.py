"""Command-line plumbing shared by ``dcenter`` and ``dworker`` (and ``dssh``'s stop).

A stop request flows one way: a SIGINT/SIGTERM handler (or the stdin
watcher, at EOF) sets a :class:`StopFlag`, which writes a byte to its
pipe; the main thread, waiting on that pipe in ``run_until_signalled``,
wakes, ignores further stop signals and calls ``stop``.  A handler runs on
the main thread between two bytecodes of whatever it interrupted, so it
takes no lock (an ``Event``'s lock may be held by the very code it
interrupted, and a second signal would deadlock on it): it only sets a
flag and writes to a non-blocking pipe.  ``--help`` shows every default
(:class:`DefaultsHelpFormatter`).
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import threading
import time
from typing import Any
from collections.abc import Callable, Iterable

from .wire import Security


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, as ``(default: X)`` after its help.

    Options without a default (None, or off for a flag) say nothing more: their
    help says what happens without them.  A help that already places
    ``%(default)s`` itself is left as it is.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or default is None or default is False
                or default == argparse.SUPPRESS or default == []
                or not (action.option_strings or action.nargs == "?")):
            return text
        return f"{text} (default: %(default)s)"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags ``dcenter`` and ``dworker`` share: where to bind, logging, auth and TLS."""
    parser.add_argument("--host", default=None,
                        help="interface to bind (default 127.0.0.1, or 0.0.0.0 with an auth key)")
    parser.add_argument("--log-level", default="warning",
                        help="debug, info, warning or error: what goes to stderr")
    parser.add_argument("--auth-key-file", help="file holding the shared auth key "
                        "(default: the MINIDIST_AUTH_KEY environment variable)")
    parser.add_argument("--tls-cert", help="PEM certificate to present")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--tls-ca", help="PEM CA bundle to verify peers against")
    parser.add_argument("--exit-on-stdin-close", action="store_true",
                        help=argparse.SUPPRESS)  # used by LocalCluster: die with the parent


def start_process(args: argparse.Namespace) -> tuple[Security, str]:
    """First steps of both programs: signals, logging, parent watch; returns security and host."""
    catch_stop_signals()
    configure_logging(args.log_level)
    if args.exit_on_stdin_close:
        exit_when_parent_goes()
    security = Security(auth_key_file=args.auth_key_file, tls_cert=args.tls_cert,
                        tls_key=args.tls_key, tls_ca=args.tls_ca)
    host = args.host or ("0.0.0.0" if security.auth_key else "127.0.0.1")
    return security, host


_stdin_action: list[Callable[[], None]] = []


def watch_stdin(on_close: Callable[[], None]) -> None:
    """Call ``on_close`` when stdin (a pipe from the parent) reaches EOF.

    One watcher per process; a later call only changes what EOF does.
    """
    first = not _stdin_action
    _stdin_action[:] = [on_close]
    if not first:
        return

    def watch() -> None:
        try:
            while os.read(0, 4096):
                pass
        except OSError:
            pass
        _stdin_action[0]()
    threading.Thread(target=watch, name="stdin-watch", daemon=True).start()


def exit_when_parent_goes() -> None:
    """Until the process is ready: if the parent's pipe closes, exit at once."""
    watch_stdin(lambda: os._exit(1))


class StopFlag:
    """A one-way flag that a signal handler may set: ``set``, ``is_set``, ``wait``.

    Unlike ``threading.Event``, ``set`` takes no lock, so a handler that
    interrupts a ``wait`` (or another ``set``) on the same thread cannot
    deadlock: it stores a boolean and writes a byte to a non-blocking pipe.
    ``wait`` blocks in ``select`` on that pipe.  The kernel may deliver a
    signal to any thread, and Python runs its handler on the main thread
    only once that thread runs bytecode again: ``wake_on_signals`` makes the
    C-level handler write to the pipe too, so a waiting main thread wakes at
    once (``wait`` also looks every ``POLL`` seconds).
    """

    POLL = 0.5

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        os.set_blocking(self._read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._set = False

    def set(self) -> None:
        """Raise the flag; safe from a signal handler and from any thread."""
        if self._set:
            return
        self._set = True
        try:
            os.write(self._write_fd, b"\0")
        except OSError:  # the pipe is full: a byte is already there to wake the waiters
            pass

    def is_set(self) -> bool:
        """True once ``set`` has been called."""
        return self._set

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the flag is set or ``timeout`` seconds pass; return ``is_set()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._set:
            remaining = self.POLL if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                break
            readable = select.select([self._read_fd], [], [], min(remaining, self.POLL))[0]
            if readable and not self._set:  # a signal's wake-up byte; its handler runs next
                self._drain()
        return self._set

    def wake_on_signals(self) -> None:
        """Wake ``wait`` as soon as any handled signal arrives (main thread only)."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)

    def _drain(self) -> None:
        try:
            while os.read(self._read_fd, 512):
                pass
        except BlockingIOError:
            pass


_stop_flag: StopFlag | None = None
_serving = False


def _stop_requested() -> StopFlag:
    """The process's stop flag, made on first use (before any handler can need it)."""
    global _stop_flag
    if _stop_flag is None:
        _stop_flag = StopFlag()
    return _stop_flag


def catch_stop_signals() -> None:
    """Handle SIGINT/SIGTERM from now on; call it first thing in ``main``.

    Until the process serves, the first signal ends it at once with status 0
    (there is nothing to hand over yet); once ``run_until_signalled`` runs,
    a signal only sets the stop flag, and the main thread calls ``stop``.
    Later signals of a burst are ignored: the stop under way is not interrupted.
    """
    flag = _stop_requested()

    def handler(signum: int, frame: Any) -> None:
        flag.set()
        if not _serving:
            ignore_stop_signals()
            raise SystemExit(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    flag.wake_on_signals()


def ignore_stop_signals(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> None:
    """Ignore ``signals`` from now on: the process is stopping, and says so with status 0.

    Python puts back the default handlers while it exits, so a late signal of
    a burst would otherwise end the process by that signal instead.  Safe from
    a handler (it takes no lock); children started afterwards inherit it.
    """
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)


def run_until_signalled(stop: Callable[[], None], exit_on_stdin_close: bool,
                        ready_lines: Iterable[str] = (), ready_fd: int | None = None) -> None:
    """Print the ready lines, block until SIGINT/SIGTERM (or stdin EOF), then call ``stop``.

    The lines go out only once a signal would be handled by ``stop``, so whoever
    waits for them may signal at once.  With ``ready_fd`` (a pipe from a nanny)
    they go there instead of stdout, followed by ``stopping`` when the process
    stops on purpose, so the nanny knows not to restart it.
    """
    global _serving
    catch_stop_signals()
    flag = _stop_requested()
    _serving = True
    if ready_fd is None:
        for line in ready_lines:
            print(line, flush=True)
    else:
        _tell(ready_fd, "".join(f"{line}\n" for line in ready_lines))
    if exit_on_stdin_close:
        watch_stdin(flag.set)
    flag.wait()
    ignore_stop_signals()
    if ready_fd is not None:
        _tell(ready_fd, "stopping\n")
    stop()


def tell_status(fd: int, line: str) -> None:
    """Write one line to the nanny's status pipe (``--ready-fd``); a nanny gone is no error."""
    _tell(fd, f"{line}\n")


def _tell(fd: int, text: str) -> None:
    """Write ``text`` to the nanny's status pipe; a nanny that is gone is no error."""
    try:
        os.write(fd, text.encode())
    except OSError:
        pass


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
