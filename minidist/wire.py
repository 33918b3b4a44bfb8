"""Bytes on sockets: framing, the handshake, servers and rpc.

Everything that crosses a socket in minidist goes through this module::

    obj --dumps--> [pickle, buf, buf, ...] --write_frames--> socket
    socket --read_frames--> [pickle, buf, buf, ...] --loads--> obj

A message is one pickle (protocol 5) plus the large buffers it refers to,
each sent as its own frame so that a 256 MB array is never copied into the
pickle.  On the wire a message is::

    !I   frame count n
    !nQ  frame lengths; the top bit marks a frame the receiver must be able
         to write to (a numpy array's memory), otherwise it arrives as bytes;
         the next bit says the writable frame was a bytearray, and arrives
         as one (others large enough get a mapping of their own, see
         ``fresh_buffer``; large read-only frames arrive as ``bytes``
         received in place, see ``_FreshBytes``)
    ...  the frames

Lengths are checked against ``max_frame_bytes`` before anything is
allocated.  Frames are sent with ``sendmsg`` (no concatenation) and read
into preallocated memory.  ``dumps``/``loads`` and ``serialize`` come from
``serialize``, which pickles and never touches a socket; they are
re-exported here.

Before any frame is read, both ends run a handshake made only of fixed-size
fields (nothing is unpickled): the client sends ``MAGIC``, a version and a
flag saying whether it holds an auth key; the server answers with a status
byte.  With an auth key both ends prove they hold it (HMAC-SHA256 over a
fresh random nonce from the other side), as ``multiprocessing.connection``
does with ``deliver_challenge`` / ``answer_challenge``.  TLS, when
configured, wraps the socket before the handshake.  A server gives each
new connection ``HANDSHAKE_TIMEOUT`` seconds for all of it, and lets at
most ``MAX_HANDSHAKES`` be in it at once.

On top of that sit a ``Server`` (a ``ThreadingTCPServer`` dispatching
``{"op": name, ...}`` to a table of handlers), a blocking ``rpc`` proxy
over pooled connections, and ``BatchedSender``, which turns many small
stream messages into one frame per send.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import mmap
import os
import re
import secrets
import select
import socket
import socketserver
import struct
import sys
import threading
import time
import weakref
from collections import defaultdict
from typing import TYPE_CHECKING, Any, TypeGuard
from collections.abc import Callable, Iterable

from .serialize import (OOB_THRESHOLD, SerializationError, Serialized,  # noqa: F401 (re-exported)
                        deserialize, dumps, loads, pickled_by_value, serialize, shipped_source)

if TYPE_CHECKING:
    import ssl

# ``ssl`` and ``cloudpickle`` are imported when first needed (TLS configured; a
# value plain pickle cannot carry): each costs a process about 10 ms to start.

logger = logging.getLogger("minidist.wire")

MAGIC = b"minidist"
VERSION = 2
DEFAULT_PORT = 8787
DEFAULT_MAX_FRAME_BYTES = int(os.environ.get("MINIDIST_MAX_FRAME_BYTES", 4 << 30))
MAX_FRAMES = 1 << 16
HANDSHAKE_TIMEOUT = 5.0
"""Seconds a server gives a new connection to finish the whole handshake (TLS included)."""
MAX_HANDSHAKES = int(os.environ.get("MINIDIST_MAX_HANDSHAKES", 256))
"""Connections a server lets be in the handshake at once; past it the oldest is closed."""
REFUSAL_LOG_INTERVAL = 1.0

_WRITABLE = 1 << 63   # length flag: the receiver must be able to write this frame
_BYTEARRAY = 1 << 62  # length flag: and it must arrive as a bytearray (it was one)
_FLAGS = _WRITABLE | _BYTEARRAY
MAPPED_FRAME_BYTES = 1 << 20
"""Writable frames this large are received into their own populated mapping (Linux)."""
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_COUNT = struct.Struct("!I")
_HELLO = struct.Struct("!8sBB")  # magic, version, flags
_FLAG_HAS_KEY = 1
# The server's one-byte answer to a hello.
_OK, _OK_AUTH, _NEEDS_KEY, _HAS_NO_KEY, _BAD_VERSION, _REJECTED = range(6)
_NONCE = 32


class ProtocolError(ConnectionError):
    """The peer sent bytes that are not a valid minidist message."""


class AuthenticationError(ConnectionError):
    """The handshake failed: missing or wrong auth key, or not a minidist peer."""


class RemoteError(Exception):
    """A server handler raised; carries the remote exception text."""


# ---------------------------------------------------------------------------
# Addresses and configuration


def parse_address(address: str | tuple[str, int]) -> tuple[str, int]:
    """Return ``(host, port)`` for ``"host:port"``, ``"tcp://host:port"`` or a tuple."""
    if isinstance(address, tuple):
        host, port = address
        return str(host), int(port)
    text = str(address)
    for prefix in ("tcp://", "tls://"):
        if text.startswith(prefix):
            text = text[len(prefix):]
    host, sep, port_text = text.rpartition(":")
    if not sep:
        return text, DEFAULT_PORT
    return host.strip("[]") or "127.0.0.1", int(port_text)


def format_address(host: str, port: int) -> str:
    """The canonical ``"host:port"`` form used as a worker's identity."""
    return f"{host}:{port}"


WILDCARD_HOSTS = frozenset({"0.0.0.0", "", "::"})


def reachable_host(bound: str = "0.0.0.0") -> str:
    """The host other machines should dial to reach a server bound to ``bound``.

    A specific interface is its own answer.  For a wildcard bind it is the
    host's primary routable address: the source address the kernel picks
    for a route to the outside (a UDP ``connect`` sends nothing), or, with
    no default route, for the first network in the routing table; failing
    that, the address of the host name if it is not loopback; else 127.0.0.1.
    """
    if bound not in WILDCARD_HOSTS:
        return bound
    for target in _route_probes():
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.connect((target, 9))
                host = s.getsockname()[0]
        except OSError:
            continue
        if not host.startswith("127."):
            return host
    try:
        host = socket.gethostbyname(socket.gethostname())
    except OSError:
        host = ""
    return host if host and not host.startswith("127.") else "127.0.0.1"


def _route_probes() -> Iterable[str]:
    """Destinations whose route reveals a routable source address, best first."""
    yield "192.0.2.1"  # TEST-NET-1 (RFC 5737): reached only through a default route
    try:
        with open("/proc/net/route") as f:  # Linux: this network namespace's IPv4 routes
            rows = [line.split() for line in f.read().splitlines()[1:]]
    except OSError:
        return
    for row in rows:
        if len(row) > 7 and row[0] != "lo" and int(row[1], 16):
            yield socket.inet_ntoa(struct.pack("=I", int(row[1], 16)))


def resolve_auth_key(auth_key: bytes | str | None = None,
                     auth_key_file: str | None = None) -> bytes | None:
    """The auth key to use: explicit, else from a file, else ``MINIDIST_AUTH_KEY``."""
    if auth_key is None and auth_key_file:
        with open(auth_key_file, "rb") as f:
            auth_key = f.read().strip()
    if auth_key is None:
        auth_key = os.environ.get("MINIDIST_AUTH_KEY") or None
    if isinstance(auth_key, str):
        auth_key = auth_key.encode()
    return auth_key or None


def ssl_context(*, server_side: bool, cert: str | None = None, key: str | None = None,
                ca: str | None = None) -> ssl.SSLContext | None:
    """A TLS context from PEM files, or None when no TLS option is given.

    A server with ``ca`` requires client certificates signed by it; a client
    with ``ca`` verifies the server against it (hostname checks are off
    because workers are dialled by IP address).
    """
    if not (cert or key or ca):
        return None
    import ssl
    if server_side:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        if ca:
            ctx.load_verify_locations(ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
        else:
            ctx.verify_mode = ssl.CERT_NONE
    if cert:
        ctx.load_cert_chain(cert, key)
    return ctx


class Security:
    """What a process needs to open or accept connections: key and TLS contexts."""

    def __init__(self, auth_key: bytes | str | None = None, *, auth_key_file: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None,
                 tls_ca: str | None = None) -> None:
        self.auth_key = resolve_auth_key(auth_key, auth_key_file)
        self.tls = dict(cert=tls_cert, key=tls_key, ca=tls_ca)
        self.server_ssl = ssl_context(server_side=True, **self.tls) if tls_cert else None
        self.client_ssl = ssl_context(server_side=False, **self.tls)

    def cli_args(self) -> list[str]:
        """Command-line flags that give a child process the same TLS files."""
        args = []
        for name, value in self.tls.items():
            if value:
                args += [f"--tls-{name}", value]
        return args


# ---------------------------------------------------------------------------
# Framing


def _exporter(view: memoryview) -> type:
    """The type of the object whose memory ``view`` shows (through views of views)."""
    obj = view.obj
    while type(obj) is memoryview:
        obj = obj.obj
    return type(obj)


def frame_views(frames: list) -> list[memoryview]:
    """The header and the frames of one message, as byte views ready to write."""
    views = [memoryview(f).cast("B") for f in frames]
    lengths = [v.nbytes if v.readonly else
               v.nbytes | _WRITABLE | (_BYTEARRAY if _exporter(v) is bytearray else 0)
               for v in views]
    header = _COUNT.pack(len(views)) + struct.pack(f"!{len(views)}Q", *lengths)
    return [memoryview(header), *views]


def _is_tls(sock: socket.socket) -> TypeGuard[ssl.SSLSocket]:
    # ``ssl`` may be half imported by another thread (http.server, say): then no
    # TLS socket exists yet, and its attributes may not either.
    tls_socket = getattr(sys.modules.get("ssl"), "SSLSocket", None)
    return tls_socket is not None and isinstance(sock, tls_socket)


def _tls_errors() -> tuple[type[BaseException], ...]:
    """What an ``except`` clause catches for TLS failures (nothing before ``ssl`` is loaded)."""
    error = getattr(sys.modules.get("ssl"), "SSLError", None)
    return (error,) if error is not None else ()


def write_views(sock: socket.socket, views: list, blocking: bool = True) -> list:
    """Write views with ``sendmsg`` (no concatenation); returns what is left unsent.

    Non-blocking mode stops when the socket buffer is full.  Over TLS there
    is no ``sendmsg``: small views are joined and written with ``sendall``.
    """
    if _is_tls(sock):
        small: list = []
        for v in views:
            if v.nbytes < 65536:
                small.append(v)
                continue
            if small:
                sock.sendall(b"".join(small))
                small = []
            sock.sendall(v)
        if small:
            sock.sendall(b"".join(small))
        return []
    pending = [v for v in views if v.nbytes]
    flags = 0 if blocking else socket.MSG_DONTWAIT
    while pending:
        try:
            sent = sock.sendmsg(pending[:1024], [], flags)
        except BlockingIOError:
            return pending
        while sent:
            n = pending[0].nbytes
            if sent >= n:
                sent -= n
                pending.pop(0)
            else:
                pending[0] = pending[0][sent:]
                sent = 0
    return pending


def write_frames(sock: socket.socket, frames: list) -> None:
    """Send one message's frames, blocking until done."""
    write_views(sock, frame_views(frames))


def _read_exact(rfile: Any, n: int, first: bool = False) -> bytes:
    data = rfile.read(n)
    if data is None or len(data) != n:
        if first and not data:  # EOF between messages: a clean close
            raise ConnectionError("connection closed by peer")
        raise ProtocolError(f"truncated message: connection closed after {len(data or b'')} "
                            f"of {n} bytes")
    return data


def _readinto_exact(rfile: Any, buf: bytearray | memoryview | mmap.mmap) -> None:
    view = memoryview(buf)
    while view.nbytes:
        n = rfile.readinto(view)
        if not n:
            raise ProtocolError(f"truncated message: connection closed {view.nbytes} bytes "
                                "before the end of a frame")
        view = view[n:]


def _huge_pages_mode() -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or ""."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            text = f.read()
    except OSError:
        return ""
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else ""


HUGE_FRAME_BYTES = 4 << 20
"""Frames this large are received into memory marked for transparent huge pages."""
_MADV_HUGEPAGE = (getattr(mmap, "MADV_HUGEPAGE", None)
                  if _huge_pages_mode() in ("always", "madvise") else None)


def fresh_buffer(size: int) -> bytearray | mmap.mmap:
    """Writable memory for one frame (numpy arrays, memoryviews) to be received into.

    Receiving into memory nobody has touched costs a page fault per page,
    and for a large frame the faults, not the copy out of the socket, set
    the pace.  A large frame gets its own anonymous mapping, freed with the
    last array that uses it.  Where the kernel offers transparent huge pages
    on request (``madvise`` or ``always`` mode) the mapping asks for them, as
    numpy does for its own large arrays: 256 MB then arrive with 128 faults
    of 2 MB instead of 65,536 of 4 KB.  Without them the kernel populates
    the mapping in one go (``MAP_POPULATE``), still faster than a
    zero-filled ``bytearray``.
    """
    if size >= HUGE_FRAME_BYTES and _MADV_HUGEPAGE is not None:
        mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        mapping.madvise(_MADV_HUGEPAGE)
        return mapping
    if size >= MAPPED_FRAME_BYTES and _POPULATE:
        return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _POPULATE)
    return bytearray(size)


class _FreshBytes:
    """Make ``bytes`` of a given size whose memory can still be received into (CPython).

    A read-only frame must arrive as ``bytes`` (the value it carries may be
    one), and ``bytes`` cannot be written once made.  This does what
    CPython's own buffered reader does: it asks for an uninitialised bytes
    object and fills its memory before anyone else holds it, having first
    marked that memory for huge pages as ``fresh_buffer`` does.
    """

    def __init__(self) -> None:
        import ctypes
        self.ctypes = ctypes
        self.new = ctypes.pythonapi.PyBytes_FromStringAndSize
        self.new.restype = ctypes.py_object
        self.new.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
        self.madvise = ctypes.CDLL(None, use_errno=True).madvise
        self.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.offset = bytes.__basicsize__ - 1  # where a bytes object's characters start
        self.page = mmap.PAGESIZE

    def __call__(self, size: int) -> tuple[bytes, memoryview]:
        data = self.new(None, size)
        start = id(data) + self.offset
        first = -(-start // self.page) * self.page
        last = (start + size) // self.page * self.page
        if last > first:
            self.madvise(first, last - first, _MADV_HUGEPAGE)
        view = memoryview((self.ctypes.c_char * size).from_address(start)).cast("B")
        return data, view


_fresh_bytes: _FreshBytes | None = None
FRESH_BYTES_MIN = 32 << 20
"""Read-only frames this large are received in place.  glibc serves an allocation this
size with a mapping of its own whatever its tuning (32 MiB is its largest threshold), so
marking its pages touches no memory the heap shares with anything else."""
_FRESH_BYTES_OK = (_MADV_HUGEPAGE is not None and sys.implementation.name == "cpython"
                   and sys.platform.startswith("linux"))


def _read_large_bytes(rfile: Any, size: int, sock: socket.socket | None = None) -> bytes:
    """A large read-only frame, received straight into a fresh ``bytes`` object."""
    global _fresh_bytes
    if _fresh_bytes is None:
        _fresh_bytes = _FreshBytes()  # two threads may both make one: harmless
    data, view = _fresh_bytes(size)
    try:
        if sock is not None:
            _recv_large(rfile, sock, view)
        else:
            _readinto_exact(rfile, view)
    finally:
        view.release()
    return data


LOWAT_FRAME_BYTES = 4 << 20
"""Frames this large are read from the socket itself in chunks of at least ``LOWAT_BYTES``."""
LOWAT_BYTES = 1 << 20
_SO_RCVLOWAT: int | None = getattr(socket, "SO_RCVLOWAT", None)


def _recv_large(rfile: Any, sock: socket.socket, view: memoryview) -> None:
    """Fill ``view`` (a large frame) from ``sock``, after what ``rfile`` already buffered.

    Read through the buffered reader, a large frame arrives in as many
    ``recv`` calls as the sender's segments wake the reader for.  Here the
    socket's low-water mark asks the kernel to wake it only once a
    megabyte is waiting (about 20% faster for 256 MB on loopback); the
    last megabyte is read through the reader with the mark back at one
    byte, since a read may wait for no more than the frame still holds.
    """
    buffered = rfile.peek(1)[:view.nbytes]  # what the reader holds of this frame (>= 1 byte)
    n = len(buffered)
    view[:n] = buffered
    rfile.read(n)  # consumes exactly the buffered bytes: no raw read
    view = view[n:]
    assert _SO_RCVLOWAT is not None  # a connection reads its socket directly only with it
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, LOWAT_BYTES)
        while view.nbytes > LOWAT_BYTES:
            got = sock.recv_into(view, view.nbytes - LOWAT_BYTES)
            if not got:
                break
            view = view[got:]
    finally:
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, 1)
    _readinto_exact(rfile, view)  # the rest through the reader again, its buffer empty


def read_frames(rfile: Any, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                sock: socket.socket | None = None) -> list:
    """Read one message's frames from a buffered reader, checking every length first.

    ``sock``, the plain socket under ``rfile`` if given, is read directly
    for large frames.  Raises ConnectionError on EOF between messages and
    ProtocolError on anything else that is not a whole, well-formed
    message (EOF inside one included).
    """
    (count,) = _COUNT.unpack(_read_exact(rfile, 4, first=True))
    if not 0 < count <= MAX_FRAMES or 8 * count > max_frame_bytes:
        raise ProtocolError(f"bad frame count {count}")
    lengths = struct.unpack(f"!{count}Q", _read_exact(rfile, 8 * count))
    sizes = [length & ~_FLAGS for length in lengths]
    if max(sizes) > max_frame_bytes or sum(sizes) > 4 * max_frame_bytes:
        raise ProtocolError(f"frame of {max(sizes)} bytes exceeds limit {max_frame_bytes}")
    frames: list[bytes | bytearray | mmap.mmap] = []
    for length, size in zip(lengths, sizes, strict=False):
        if length & _WRITABLE:
            buf = bytearray(size) if length & _BYTEARRAY else fresh_buffer(size)
            if sock is not None and size >= LOWAT_FRAME_BYTES:
                _recv_large(rfile, sock, memoryview(buf))
            else:
                _readinto_exact(rfile, buf)
            frames.append(buf)
        elif size >= FRESH_BYTES_MIN and _FRESH_BYTES_OK:
            frames.append(_read_large_bytes(rfile, size, sock))
        else:
            frames.append(_read_exact(rfile, size))
    return frames


# ---------------------------------------------------------------------------
# Handshake: fixed-size fields only, nothing unpickled


def _recv_exact(sock: socket.socket, n: int, deadline: float | None = None) -> bytes:
    """``n`` bytes from ``sock``; with a ``deadline`` (monotonic), all of them before it."""
    data = b""
    while len(data) < n:
        _time_left(sock, deadline)
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed during handshake")
        data += chunk
    return data


def _time_left(sock: socket.socket, deadline: float | None) -> None:
    """Make the next blocking call on ``sock`` give up at ``deadline``; raise if it passed.

    A peer that sends one byte at a time resets a plain socket timeout with
    every byte: only a deadline bounds the whole exchange.
    """
    if deadline is None:
        return
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("handshake timed out")
    sock.settimeout(left)


def _send_before(sock: socket.socket, data: bytes, deadline: float | None) -> None:
    _time_left(sock, deadline)
    sock.sendall(data)


def _proof(key: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(key, MAGIC + role + nonce, hashlib.sha256).digest()


def deliver_challenge(sock: socket.socket, key: bytes | None,
                      deadline: float | None = None) -> None:
    """Server side: check the client's hello and, with a key, authenticate both ways.

    With a ``deadline`` (``time.monotonic()`` value) the whole exchange must
    end before it, however the peer paces its bytes; else TimeoutError.
    """
    magic, version, flags = _HELLO.unpack(_recv_exact(sock, _HELLO.size, deadline))
    if magic != MAGIC:
        raise ProtocolError("not a minidist peer (bad magic)")
    if version != VERSION:
        _send_before(sock, bytes([_BAD_VERSION]), deadline)
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    client_has_key = bool(flags & _FLAG_HAS_KEY)
    if key is None:
        _send_before(sock, bytes([_HAS_NO_KEY if client_has_key else _OK]), deadline)
        if client_has_key:
            raise AuthenticationError("client offered an auth key but this server has none")
        return
    if not client_has_key:
        _send_before(sock, bytes([_NEEDS_KEY]), deadline)
        raise AuthenticationError("client has no auth key")
    nonce = secrets.token_bytes(_NONCE)
    _send_before(sock, bytes([_OK_AUTH]) + nonce, deadline)
    answer = _recv_exact(sock, 32 + _NONCE, deadline)
    proof, client_nonce = answer[:32], answer[32:]
    if not hmac.compare_digest(proof, _proof(key, b"client", nonce)):
        _send_before(sock, bytes([_REJECTED]), deadline)
        raise AuthenticationError("wrong auth key")
    _send_before(sock, bytes([_OK]) + _proof(key, b"server", client_nonce), deadline)


def answer_challenge(sock: socket.socket, key: bytes | None, peer: str) -> None:
    """Client side of ``deliver_challenge``; raises AuthenticationError on mismatch."""
    sock.sendall(_HELLO.pack(MAGIC, VERSION, _FLAG_HAS_KEY if key else 0))
    status = _recv_exact(sock, 1)[0]
    if status == _OK:
        if key:  # a real server with a key never waives the proof: this one cannot give it
            raise AuthenticationError(
                f"{peer} did not prove it holds the auth key (it claims to need none)")
        return
    if status == _NEEDS_KEY:
        raise AuthenticationError(
            f"{peer} requires an auth key: pass auth_key= or set MINIDIST_AUTH_KEY")
    if status == _HAS_NO_KEY:
        raise AuthenticationError(
            f"{peer} has no auth key configured but one was given; it cannot prove "
            "who it is, so the connection was refused")
    if status == _BAD_VERSION:
        raise AuthenticationError(f"{peer} speaks another minidist protocol version")
    if status != _OK_AUTH:
        raise ProtocolError(f"{peer} is not a minidist server (status {status})")
    if key is None:
        raise ProtocolError(f"{peer} asked to prove an auth key this side did not offer")
    nonce = _recv_exact(sock, _NONCE)
    my_nonce = secrets.token_bytes(_NONCE)
    sock.sendall(_proof(key, b"client", nonce) + my_nonce)
    reply = _recv_exact(sock, 1)
    if reply[0] != _OK:
        raise AuthenticationError(f"{peer} rejected the auth key")
    if not hmac.compare_digest(_recv_exact(sock, 32), _proof(key, b"server", my_nonce)):
        raise AuthenticationError(f"{peer} failed to prove it holds the auth key")


# ---------------------------------------------------------------------------
# Connections


class Connection:
    """A blocking, authenticated message connection.  ``send`` is thread-safe.

    ``quiet_since()`` tells how long a thread has been waiting in ``recv``
    with no message arriving: the peer's silence as the network shows it,
    however busy the reading process is with what it already read.
    """

    def __init__(self, sock: socket.socket, peer: str,
                 max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> None:
        self.sock = sock
        self.peer = peer
        self.max_frame_bytes = max_frame_bytes
        self._rfile = sock.makefile("rb", buffering=1 << 16)
        # Large frames are read from the socket itself (not through TLS, which has its own
        # buffering): see _recv_large.
        self._plain_sock = None if _is_tls(sock) or _SO_RCVLOWAT is None else sock
        self._send_lock = threading.Lock()
        self.closed = False
        self._waiting_since: float | None = None  # a thread waits in recv() since then

    def send(self, obj: Any) -> None:
        """Send one message; raises ConnectionError when the peer is gone."""
        self.send_views(frame_views(dumps(obj)))

    def send_views(self, views: list) -> None:
        """Write prepared frame views (``frame_views``), blocking until all are sent."""
        with self._send_lock:
            if self.closed:
                raise ConnectionError(f"connection to {self.peer} is closed")
            try:
                write_views(self.sock, views)
            except OSError as e:
                self.close()
                raise ConnectionError(f"lost connection to {self.peer}: {e}") from e

    def send_nowait(self, obj: Any) -> list | None:
        """Write one message as far as the socket takes it now; return the unsent views."""
        views = frame_views(dumps(obj))
        with self._send_lock:
            if self.closed:
                raise ConnectionError(f"connection to {self.peer} is closed")
            try:
                return write_views(self.sock, views, blocking=False) or None
            except OSError as e:
                self.close()
                raise ConnectionError(f"lost connection to {self.peer}: {e}") from e

    def recv(self) -> Any:
        """Receive one message; raises ConnectionError on EOF, ProtocolError on garbage."""
        self._waiting_since = time.monotonic()
        try:
            frames = read_frames(self._rfile, self.max_frame_bytes, self._plain_sock)
        except (OSError, ValueError) as e:
            self.close()
            if isinstance(e, ConnectionError):
                raise
            raise ConnectionError(f"lost connection to {self.peer}: {e}") from e
        except struct.error as e:
            self.close()
            raise ProtocolError(f"truncated header from {self.peer}") from e
        finally:
            self._waiting_since = None
        try:
            return loads(frames)
        except Exception as e:
            self.close()
            raise ProtocolError(f"undecodable message from {self.peer}: {e!r}") from e

    def write(self, msg: Any) -> None:
        """Send one message (the seeds' name for ``send``)."""
        self.send(msg)

    def read(self) -> Any:
        """Receive one message; an error reply from a server's handler raises RemoteError.

        The seeds' name for ``recv``, for a connection to a ``Server``: an
        operation that failed or that the server does not have is an error
        here, and the connection stays usable.
        """
        msg = self.recv()
        if isinstance(msg, _ErrorReply):
            raise RemoteError(msg.text)
        return msg

    def quiet_since(self) -> float:
        """Since when (monotonic) a reader has waited in ``recv`` with nothing arriving.

        Now when no thread is waiting (the reader is busy with the last
        message, or nobody reads): only time spent waiting for bytes that
        do not come counts as the peer's silence.
        """
        since = self._waiting_since
        return time.monotonic() if since is None else since

    def input_waiting(self) -> bool:
        """Are there bytes from the peer that no one has read yet?  Never blocks."""
        if self.closed:
            return False
        try:
            if _is_tls(self.sock) and self.sock.pending():
                return True
            poller = select.poll()  # no limit on descriptor numbers, unlike select()
            poller.register(self.sock, select.POLLIN)
            return bool(poller.poll(0))
        except (OSError, ValueError):  # closed meanwhile
            return False

    def request(self, msg: Any) -> Any:
        """Send ``msg`` and return the reply (no other thread may read this connection)."""
        self.send(msg)
        reply = self.recv()
        if isinstance(reply, _ErrorReply):
            raise RemoteError(reply.text)
        return reply

    def close(self) -> None:
        """Close the socket; safe to call more than once and from any thread."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self._rfile.close()
            self.sock.close()
        except OSError:
            pass

    def __repr__(self) -> str:
        return f"<Connection to {self.peer}{' closed' if self.closed else ''}>"


def connect(address: str | tuple[str, int], *, timeout: float = 10.0,
            security: Security | None = None) -> Connection:
    """Dial ``address``, wrap TLS if configured, run the handshake, return a Connection."""
    host, port = parse_address(address)
    peer = format_address(host, port)
    security = security or Security()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise ConnectionError(f"cannot connect to {peer}: {e}") from e
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if security.client_ssl is not None:
        try:
            sock = security.client_ssl.wrap_socket(sock)
        except OSError as e:  # SSLError, or a reset from a server that does not speak TLS
            sock.close()
            raise ConnectionError(f"TLS handshake with {peer} failed (is it a TLS server that "
                                  f"trusts this client's certificate?): {e}") from e
    try:
        answer_challenge(sock, security.auth_key, peer)
    except _tls_errors() as e:
        sock.close()
        raise ConnectionError(f"TLS handshake with {peer} failed: {e}") from e
    except ConnectionError as e:
        sock.close()
        if isinstance(e, (AuthenticationError, ProtocolError)):
            raise
        hint = "" if security.client_ssl else " (does it require TLS?)"
        raise ConnectionError(f"handshake with {peer} failed{hint}: {e}") from e
    except OSError as e:  # timeouts
        sock.close()
        raise ConnectionError(f"handshake with {peer} failed: {e}") from e
    sock.settimeout(None)
    return Connection(sock, peer)


class ConnectionPool:
    """Idle connections per address, reused across calls instead of redialled."""

    def __init__(self, security: Security | None = None, timeout: float = 10.0,
                 max_idle: int = 8) -> None:
        self.security = security or Security()
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: dict[str, list[Connection]] = defaultdict(list)
        self._busy: dict[str, set[Connection]] = defaultdict(set)  # in a call right now
        self._aborted: weakref.WeakSet[Connection] = weakref.WeakSet()
        self._lock = threading.Lock()

    def acquire(self, address: str) -> tuple[Connection, bool]:
        """An idle or new connection; the flag says whether it was reused."""
        with self._lock:
            idle = self._idle.get(address)
            while idle:
                conn = idle.pop()
                if not conn.closed:
                    return conn, True
        return connect(address, timeout=self.timeout, security=self.security), False

    def release(self, address: str, conn: Connection) -> None:
        with self._lock:
            idle = self._idle[address]
            if not conn.closed and len(idle) < self.max_idle:
                idle.append(conn)
                return
        conn.close()

    def call(self, address: str, op: str, **kwargs: Any) -> Any:
        """Run one request/response on a pooled connection (retries once if stale)."""
        msg = {"op": op, **kwargs}
        for attempt in (0, 1):
            conn, reused = self.acquire(address)
            with self._lock:
                self._busy[address].add(conn)
            try:
                reply = conn.request(msg)
            except RemoteError:
                self._done(address, conn)
                self.release(address, conn)
                raise
            except ConnectionError:
                self._done(address, conn)
                conn.close()
                if reused and attempt == 0 and conn not in self._aborted and not isinstance(
                        sys.exc_info()[1], ProtocolError):
                    continue
                raise
            self._done(address, conn)
            self.release(address, conn)
            return reply
        raise AssertionError("unreachable")

    def _done(self, address: str, conn: Connection) -> None:
        with self._lock:
            busy = self._busy.get(address)
            if busy is not None:
                busy.discard(conn)
                if not busy:
                    del self._busy[address]

    def abort(self, address: str) -> None:
        """Close every connection to ``address``: calls waiting on it fail at once.

        For a peer known to be dead or hung (e.g. a worker the center has
        removed), whose replies would otherwise be awaited forever.
        """
        with self._lock:
            conns = self._idle.pop(address, []) + list(self._busy.pop(address, ()))
            self._aborted.update(conns)
        for conn in conns:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()


class rpc:
    """``rpc(addr).get_data(keys=[...])`` sends ``{"op": "get_data", ...}`` and returns the reply.

    Calls from many threads at once each get a connection of their own from
    the pool (idle ones are reused).  A handler that raises, or an operation
    the server does not have, raises ``RemoteError`` in the caller and
    leaves the connection usable.  ``with rpc(addr) as r:`` closes the
    connections it opened (only ``close`` cannot be called as an operation).
    """

    def __init__(self, address: str | tuple[str, int], pool: ConnectionPool | None = None, *,
                 security: Security | None = None, timeout: float = 10.0) -> None:
        self.address = format_address(*parse_address(address))
        self._own_pool = pool is None
        self.pool = pool or ConnectionPool(security, timeout=timeout)

    def __getattr__(self, op: str) -> Callable[..., Any]:
        if op.startswith("_"):
            raise AttributeError(op)
        return lambda **kwargs: self.pool.call(self.address, op, **kwargs)

    def close(self) -> None:
        """Close the idle connections of a pool this rpc made itself (a shared one stays)."""
        if self._own_pool:
            self.pool.close()

    def __enter__(self) -> rpc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<rpc to {self.address}>"


# ---------------------------------------------------------------------------
# Batched stream writes


class BatchedSender:
    """Send many small messages on one stream as lists: one frame per write.

    Messages queue in a buffer; whoever writes takes the whole buffer as one
    message.  Exactly one party owns the stream at a time (``_writer``): no
    one, a calling thread, or the writer thread; ownership changes hands
    only under the lock, so frames are never reordered or interleaved.

    - ``send(msg)``: queue; if no one is writing and the last write was not a
      moment ago, write now in the caller's thread (no thread hop for a lone
      message); in a burst, the writer thread takes over and batches.
    - ``append(msg)`` + ``flush()``: queue now, write later in one frame (the
      center's scheduler flushes every stream it touched once per tick).
    - A caller never blocks on the network: a frame the socket cannot take
      whole is handed, with everything queued after it, to the writer
      thread.  Over TLS every write goes through the writer thread.
    """

    _CALLER, _THREAD = "caller", "thread"

    def __init__(self, conn: Connection, name: str = "batched-sender",
                 burst_gap: float = 2e-4) -> None:
        self.conn = conn
        self.burst_gap = burst_gap
        self._buffer: list = []
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the writer thread waits here for work
        self._idle = threading.Condition(lock)  # close() waits here for the stream to be free
        self._writer: str | None = None     # who owns the stream right now
        self._leftover: list | None = None  # unsent views of a frame, for the writer thread
        self._last_write = 0.0
        self._closing = False
        self._inline_ok = not _is_tls(conn.sock)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def append(self, msg: Any) -> None:
        """Queue ``msg`` for the next ``flush`` (or the next write of any kind)."""
        with self._cond:
            self._buffer.append(msg)

    def send(self, msg: Any) -> None:
        """Queue ``msg`` and have it written soon, never blocking the caller on the network."""
        with self._cond:
            self._buffer.append(msg)
            if self._writer is not None or self._closing:
                return  # the owner picks it up before giving the stream back
            if self._inline_ok and time.monotonic() - self._last_write >= self.burst_gap:
                self._writer = self._CALLER
            else:
                self._hand_to_thread()
                return
        self._write_inline()

    def flush(self) -> None:
        """Write what is queued now, unless someone is already writing (they will)."""
        with self._cond:
            if self._writer is not None or not self._buffer or self._closing:
                return
            if not self._inline_ok:
                self._hand_to_thread()
                return
            self._writer = self._CALLER
        self._write_inline()

    def _hand_to_thread(self) -> None:
        self._writer = self._THREAD
        self._cond.notify()

    def _release_stream(self) -> None:
        self._writer = None
        self._idle.notify_all()  # no waiters (the usual case) costs no wakeup

    def _write_inline(self) -> None:
        """The caller owns the stream: write the buffer without blocking, then give it back."""
        while True:
            with self._cond:
                batch, self._buffer = self._buffer, []
                if not batch:
                    self._release_stream()
                    return
                self._last_write = time.monotonic()
            try:
                leftover = self.conn.send_nowait(batch)
            except ConnectionError as e:
                self._fail(e)
                return
            if leftover:
                with self._cond:
                    self._leftover = leftover
                    self._hand_to_thread()
                return

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._writer != self._THREAD and not (self._closing and self._writer is None):
                    self._cond.wait()
                if self._writer != self._THREAD:
                    return  # closing and idle
                leftover, self._leftover = self._leftover, None
                batch, self._buffer = self._buffer, []
                self._last_write = time.monotonic()
            try:
                if leftover:
                    self.conn.send_views(leftover)
                if batch:
                    self.conn.send(batch)
            except ConnectionError as e:
                self._fail(e)
                return
            with self._cond:
                if not self._buffer:
                    self._release_stream()

    def _fail(self, exc: BaseException) -> None:
        if not self.conn.closed:
            logger.warning("stream to %s failed: %r", self.conn.peer, exc)
        self.conn.close()
        with self._cond:
            self._buffer.clear()
            self._leftover = None
            self._closing = True
            self._release_stream()
            self._cond.notify_all()

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued (waiting up to ``timeout``), then stop the writer thread."""
        with self._cond:
            if self._buffer and self._writer is None and not self._closing:
                self._hand_to_thread()
            self._idle.wait_for(lambda: self._writer is None, timeout)
            self._closing = True
            self._cond.notify_all()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)


# ---------------------------------------------------------------------------
# Servers


class _ErrorReply:
    """The reply sent when a handler raises (so the caller raises RemoteError)."""

    def __init__(self, text: str) -> None:
        self.text = text


NO_REPLY = object()
"""Returned by a handler that has answered (or taken over the connection) itself."""


class _TCPServer(socketserver.ThreadingTCPServer):
    server_address: tuple[str, int] | tuple[str, int, int, int]  # IPv4 or IPv6
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512

    def __init__(self, address: tuple[str, int], owner: Server,
                 sock: socket.socket | None = None) -> None:
        self.owner = owner
        super().__init__(address, _Handler, bind_and_activate=sock is None)
        if sock is not None:  # adopt a socket that is already bound and listening
            self.socket.close()
            self.socket = sock
            self.server_address = sock.getsockname()

    def process_request(self, request: Any, client_address: Any) -> None:
        """A thread for the new connection, unless too many are still in the handshake."""
        self.owner._admit(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.owner._handshake_over(request)
            raise

    def handle_error(self, request: Any, client_address: Any) -> None:
        logger.exception("error on connection from %s", client_address)


class _Handler(socketserver.BaseRequestHandler):
    server: _TCPServer

    def handle(self) -> None:
        self.server.owner._serve_connection(self.request, self.client_address)


class Server:
    """A table of named operations served over authenticated connections.

    Each connection gets a thread; each message ``{"op": name, **kwargs}``
    calls ``handlers[name](conn, **kwargs)`` and sends back its return value.
    A handler may also ``conn.write`` as many messages as it likes (a
    stream); one that returns ``NO_REPLY`` has answered itself or has taken
    the connection over.  A handler that raises, or an op the table does not
    have, gets an error reply (``RemoteError`` at the caller) and the
    connection stays open.  Bad bytes, failed handshakes and messages that
    are not operations close that one connection with a log line; the
    server keeps serving.

    Before authentication a peer gets little: ``handshake_timeout`` seconds
    for the whole handshake (TLS included), however it paces its bytes, and
    at most ``max_handshakes`` connections may be in the handshake at once.
    Past that, the connection that has been in the handshake longest is
    closed to make room (a log line at most once a second): a peer with the
    key needs milliseconds, so it gets through while slow talkers are shed;
    connections that have passed the handshake are served as before.
    """

    def __init__(self, handlers: dict[str, Callable[..., Any]], *,
                 security: Security | None = None, name: str = "server",
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_handshakes: int = MAX_HANDSHAKES) -> None:
        self.handlers = handlers
        self.security = security or Security()
        self.name = name
        self.handshake_timeout = handshake_timeout
        self.max_handshakes = max_handshakes
        # Connections accepted and not yet through the handshake, oldest first: each one's
        # socket -> a duplicate of it, through which it is shut down if it must make room.
        self._handshakes: dict[socket.socket, socket.socket] = {}
        self._refused = 0           # shed since the last log line about it
        self._shed: set[socket.socket] = set()  # shed, their threads not yet out
        self._refusal_logged = float("-inf")
        self._admit_lock = threading.Lock()
        self._tcp: _TCPServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[Connection] = set()
        self._conns_lock = threading.Lock()

    def listen(self, host: str | int | None = None, port: int | None = None,
               sock: socket.socket | None = None) -> tuple[str, int]:
        """Bind and start serving in a background thread; returns the bound address.

        Either ``host`` and ``port``, or, as in the seeds, one address as
        ``host``: a port (``8888`` or ``"8888"``), ``":8888"``,
        ``"tcp://host:8888"`` or ``"tcp://:8888"``.  Without a host it binds
        127.0.0.1, or every interface when this server has an auth key.
        Port 0 (the default) picks a free port; ``.port`` tells which.
        ``sock``, a socket already bound and listening, is served instead of
        binding: connections it queued before are served too.
        """
        if port is None and sock is None:
            host, port = self._bind_address(host)
            warn_if_exposed(host, self.security, self.name)
        self._tcp = _TCPServer(("127.0.0.1" if host is None else str(host), port or 0), self, sock)
        self._thread = threading.Thread(target=self._tcp.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"{self.name}-accept", daemon=True)
        self._thread.start()
        return self._tcp.server_address[:2]

    def _bind_address(self, address: str | int | None) -> tuple[str, int]:
        """``(host, port)`` to bind for the address forms ``listen`` takes."""
        default = "127.0.0.1" if self.security.auth_key is None else "0.0.0.0"
        if address is None:
            return "127.0.0.1", 0
        if isinstance(address, int):
            return default, address
        text = str(address).strip()
        for prefix in ("tcp://", "tls://"):
            if text.startswith(prefix):
                text = text[len(prefix):]
        if text.isdigit():
            return default, int(text)
        host, sep, port = text.rpartition(":")
        if not sep or (host.count(":") and not host.startswith("[")):
            return text, 0  # a host alone (IPv6 included): any free port
        try:
            return host.strip("[]") or default, int(port)
        except ValueError:
            raise ValueError(f"not an address to listen on: {address!r} (expected a port, "
                             "':port', 'tcp://host:port' or 'tcp://:port')") from None

    @property
    def port(self) -> int:
        """The port this server is bound to (the one picked, after ``listen(0)``)."""
        assert self._tcp is not None, "listen() first"
        return self._tcp.server_address[1]

    def _admit(self, sock: socket.socket) -> None:
        """Count a new connection into the handshake; when that is full, shed the oldest."""
        try:
            handle = sock.dup()  # stays usable after TLS takes over ``sock``
        except OSError:
            handle = None
        shed: list[socket.socket] = []
        with self._admit_lock:
            while len(self._handshakes) >= self.max_handshakes:
                oldest = next(iter(self._handshakes))
                shed.append(self._handshakes.pop(oldest))
                self._shed.add(oldest)
            if handle is not None:
                self._handshakes[sock] = handle
            if shed:
                self._refused += len(shed)
                now = time.monotonic()
                log = now - self._refusal_logged >= REFUSAL_LOG_INTERVAL
                if log:
                    self._refusal_logged, refused, self._refused = now, self._refused, 0
        for old in shed:
            try:
                old.shutdown(socket.SHUT_RDWR)  # its thread's read fails at once
            except OSError:
                pass
            old.close()
        if shed and log:
            logger.warning("%s: closed %d connection(s) still in the handshake to make room "
                           "(at most %d at once)", self.name, refused, self.max_handshakes)

    def _handshake_over(self, sock: socket.socket) -> None:
        with self._admit_lock:
            handle = self._handshakes.pop(sock, None)
            self._shed.discard(sock)
        if handle is not None:
            handle.close()

    def _serve_connection(self, accepted: socket.socket, client_address: Any) -> None:
        peer = format_address(*client_address[:2])
        sock: socket.socket | None = None
        try:
            sock = self._handshake(accepted, peer)
        finally:
            self._handshake_over(accepted)
        if sock is not None:
            self._serve_authenticated(sock, peer)

    def _handshake(self, sock: socket.socket, peer: str) -> socket.socket | None:
        """TLS and the auth handshake within ``handshake_timeout``: the socket, or None."""
        deadline = time.monotonic() + self.handshake_timeout
        accepted = sock
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.handshake_timeout)  # bounds the TLS handshake as a whole
            if self.security.server_ssl is not None:
                sock = self.security.server_ssl.wrap_socket(sock, server_side=True)
            deliver_challenge(sock, self.security.auth_key, deadline)
        except (OSError, ValueError) as e:
            if accepted in self._shed:  # logged with the others shed, once a second at most
                logger.debug("%s: shed connection from %s: %s", self.name, peer, e)
            else:
                logger.warning("%s: dropped connection from %s: handshake failed: %s",
                               self.name, peer, e)
            sock.close()
            return None
        sock.settimeout(None)
        return sock

    def _serve_authenticated(self, sock: socket.socket, peer: str) -> None:
        conn = Connection(sock, peer)
        with self._conns_lock:
            self._conns.add(conn)
        try:
            self._dispatch(conn)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
            conn.close()

    def _dispatch(self, conn: Connection) -> None:
        reply: Any
        while True:
            try:
                msg = conn.recv()
            except ProtocolError as e:
                logger.warning("%s: dropped connection from %s: %s", self.name, conn.peer, e)
                return
            except ConnectionError:
                return
            op = msg.pop("op", None) if type(msg) is dict else None
            if type(op) is not str:
                logger.warning("%s: dropped connection from %s: not an operation: %.200r",
                               self.name, conn.peer, msg)
                return
            handler = self.handlers.get(op)
            if handler is None:
                logger.warning("%s: unknown operation %.100r from %s", self.name, op, conn.peer)
                reply = _ErrorReply(f"unknown operation {op[:100]!r}: {self.name} has "
                                    f"{', '.join(sorted(self.handlers))}")
            else:
                try:
                    reply = handler(conn, **msg)
                except ConnectionError:
                    return
                except Exception as e:
                    logger.exception("%s: operation %r from %s failed", self.name, op, conn.peer)
                    reply = _ErrorReply(f"{type(e).__name__}: {e}")
            if reply is NO_REPLY:
                if conn.closed:
                    return
                continue
            try:
                conn.send(reply)
            except ConnectionError:
                return
            msg = reply = None  # not held while waiting: a reply may be a spilled key's frames

    def stop(self) -> None:
        """Stop accepting and close every open connection."""
        if self._tcp is not None:
            try:  # wakes the accept loop at once instead of at its next poll (Linux)
                self._tcp.socket.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._tcp.shutdown()
            self._tcp.server_close()
            self._tcp = None
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            conn.close()


def warn_if_exposed(host: str, security: Security, what: str) -> None:
    """Warn loudly when binding beyond loopback without an auth key."""
    if security.auth_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "\n%s\n%s listens on %s WITHOUT an auth key: anyone who can reach this port "
            "can run arbitrary code here (messages are pickles).\nSet MINIDIST_AUTH_KEY "
            "or pass --auth-key-file.\n%s", "!" * 72, what, host, "!" * 72)
