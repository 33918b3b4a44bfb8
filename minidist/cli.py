"""Command-line plumbing shared by ``dcenter`` and ``dworker``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Callable

from .wire import Security


def add_security_args(parser: argparse.ArgumentParser) -> None:
    """The auth and TLS flags shared by ``dcenter`` and ``dworker``."""
    parser.add_argument("--auth-key-file", help="file holding the shared auth key "
                        "(default: the MINIDIST_AUTH_KEY environment variable)")
    parser.add_argument("--tls-cert", help="PEM certificate to present")
    parser.add_argument("--tls-key", help="PEM private key for --tls-cert")
    parser.add_argument("--tls-ca", help="PEM CA bundle to verify peers against")
    parser.add_argument("--exit-on-stdin-close", action="store_true",
                        help=argparse.SUPPRESS)  # used by LocalCluster: die with the parent


def security_from_args(args: argparse.Namespace) -> Security:
    return Security(auth_key_file=args.auth_key_file, tls_cert=args.tls_cert,
                    tls_key=args.tls_key, tls_ca=args.tls_ca)


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


def run_until_signalled(stop: Callable[[], None], exit_on_stdin_close: bool) -> None:
    """Block the main thread until SIGINT/SIGTERM (or stdin EOF), then call ``stop``."""
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    if exit_on_stdin_close:
        watch_stdin(done.set)
    while not done.wait(0.5):
        pass
    stop()


def configure_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
