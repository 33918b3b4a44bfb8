"""Command-line plumbing shared by ``dcenter`` and ``dworker``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterable

from .wire import Security


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """The flags ``dcenter`` and ``dworker`` share: where to bind, logging, auth and TLS."""
    parser.add_argument("--host", default=None,
                        help="interface to bind (default 127.0.0.1, or 0.0.0.0 with an auth key)")
    parser.add_argument("--log-level", default="warning")
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


_stop_requested = threading.Event()
_serving = False


def catch_stop_signals() -> None:
    """Handle SIGINT/SIGTERM from now on; call it first thing in ``main``.

    Until the process serves, a signal ends it at once with status 0 (there is
    nothing to hand over yet); once ``run_until_signalled`` runs, it calls ``stop``.
    """
    def handler(signum: int, frame: Any) -> None:
        _stop_requested.set()
        if not _serving:
            raise SystemExit(0)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


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
    _serving = True
    if ready_fd is None:
        for line in ready_lines:
            print(line, flush=True)
    else:
        _tell(ready_fd, "".join(f"{line}\n" for line in ready_lines))
    if exit_on_stdin_close:
        watch_stdin(_stop_requested.set)
    while not _stop_requested.wait(0.5):
        pass
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
