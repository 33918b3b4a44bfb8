"""The center's dashboard: a live page, JSON and Prometheus metrics (``--dashboard-port``).

The following diagram shows how a browser or a Prometheus server sees the
center::

  browser  --GET /-----------> page (HTML, CSS, JS inline; nothing fetched elsewhere)
  page JS  --GET /data.json?since=N every second--+
  Prometheus --GET /metrics-----------------------+--> _Monitor.refresh (at most every 0.5 s)
  scripts  --GET /status.json---------------------+      |  one query on the scheduler thread:
                                                  |      v  task counts by prefix and state,
                                                  +-- snapshot  workers, runs and events since
                                                                its last mark (center.history)

Every request handler reads the cached snapshot; only when it is older
than ``REFRESH_SECONDS`` does one of them refresh it, through the center's
query path, so the scheduler thread runs one short read however many pages
poll.  A refresh that cost more CPU than ``MAX_SHARE`` of that interval
stretches the interval, so watching never costs the center more.  Every
run counts in the totals per prefix; the newest
``STREAM_SAMPLE`` runs of each refresh are kept here, in a ring of
``PAGE_RUNS`` numbered records, for the task stream: the page asks for
those after the last number it has.

The server is read-only: GET only, nothing it serves runs code, requests
are bounded (the stdlib's 64 KiB request line and 100 headers, one
``REQUEST_TIMEOUT`` deadline for the whole request and its answer, at most
``MAX_CONNECTIONS`` at once, where a new connection takes the place of the
one that has waited longest for its request), it answers 403 to a ``Host``
header that is not one of its own names (a page that rebinds its own
name to this address reads nothing), and it binds 127.0.0.1 unless told
otherwise.  What it shows (worker addresses, task keys, error lines) is
readable by anyone who can reach its port.
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import re
import socket
import sys
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from .task import key_name
from .wire import format_address

if TYPE_CHECKING:
    from .center import Center

logger = logging.getLogger("minidist.dashboard")

REFRESH_SECONDS = 1.0
"""The snapshot is read from the center at most this often, however many clients poll."""
PAGE_RUNS = 5000
"""Task runs the page's task stream shows (and that one poll may return)."""
MAX_SHARE = 0.025
"""A refresh waits at least its own CPU cost divided by this, so watching a large cluster
takes at most this share of the center's CPU; the page then updates less often."""
STREAM_SAMPLE = 2000
"""Runs of one refresh that join the task stream (the newest): past 2,000 tasks/s the page
shows a sample, which keeps watching cheap.  Totals count every run."""
PAGE_EVENTS = 100
MAX_CONNECTIONS = 64
"""Connections served at once; past it, one still waiting for its request makes room."""
REQUEST_TIMEOUT = 10.0
"""Seconds a connection has to send its request and take the answer, however it paces bytes."""
MEMORY_FIELDS = ("memory_managed", "memory_spilled", "memory_unmanaged", "paused")
"""Worker fields shown when the worker reports them."""

_HEX8 = re.compile(r"[a-f0-9]{8}$")
_HEX32 = re.compile(r"[a-f0-9]{32}$")


def key_split(key: Any) -> str:
    """The task prefix of a key, as dask names it: ``'inc-ab31c2'`` -> ``'inc'``.

    Tuple keys use their first element (``('x-<token>', 0, 1)`` -> ``'x'``);
    words after the first are kept while they are alphabetic and not hex
    tokens (``'read-csv-<token>'`` -> ``'read-csv'``).
    """
    if type(key) is tuple:
        key = key[0] if key else ""
    if type(key) is bytes:
        key = key.decode(errors="replace")
    if type(key) is not str:
        key = str(key)
    try:
        words = key.split("-")
        first = words[0]
        result = first if first[:1].isalpha() else first.split(",")[0].strip("_'()\"")
        for word in words[1:]:
            if word.isalpha() and not (len(word) == 8 and _HEX8.match(word)):
                result += "-" + word
            else:
                break
        if len(result) == 32 and _HEX32.match(result):
            return "data"
        if result[:1] == "<":
            result = result.strip("<>").split()[0].split(".")[-1]
        return sys.intern(result) if result else "other"
    except Exception:
        return "other"


class _Prefixes:
    """``key_split`` memoised by what precedes a key's token, so a new key rarely costs a split.

    ``inc-<token>`` and ``('x-<token>', 0, 1)`` look up ``inc`` and ``x``: when
    a key's last word is a token (not alphabetic, or 8 hex digits), the words
    before it decide its prefix.  Other keys are looked up whole.
    """

    MAX = 100_000

    def __init__(self) -> None:
        self.memo: dict = {}

    def __call__(self, key: Any) -> str:
        name = key[0] if type(key) is tuple and key else key
        head = name
        if type(name) is str:
            before, dash, last = name.rpartition("-")
            if dash and before and not (last.isalpha() and not
                                        (len(last) == 8 and _HEX8.match(last))):
                head = before
        try:
            prefix = self.memo.get(head)
        except TypeError:  # an unhashable part: no memo
            return key_split(key)
        if prefix is None:
            if len(self.memo) >= self.MAX:
                self.memo.clear()
            prefix = self.memo[head] = key_split(head if head is not name else key)
        return prefix


def _read_center(center: Center, mark: int, event_mark: int, prefixes: dict,
                 split: _Prefixes) -> dict:
    """Runs on the scheduler thread: everything the snapshot needs from the center's tables.

    ``prefixes`` (key -> prefix of the keys the center knows) is this
    monitor's memo, used only under the monitor's lock, like ``split``.
    """
    cpu = time.thread_time()
    counts: dict[tuple[str, str], int] = {}
    get = prefixes.get
    sched = center.scheduler
    tasks = sched.tasks
    for key, ts in tasks.items():
        prefix = get(key)
        if prefix is None:
            prefix = prefixes[key] = split(key)
        pair = (prefix, ts.state)
        counts[pair] = counts.get(pair, 0) + 1
    if len(prefixes) > 2 * len(tasks) + 10_000:
        kept = {key: prefixes[key] for key in tasks if key in prefixes}
        prefixes.clear()
        prefixes.update(kept)
    history = center.history
    runs = history.runs_since(mark)  # all of them, for the totals per prefix
    event_mark, events = history.events_since(event_mark)
    return {"counts": counts, "workers": center.worker_info(), "clients": len(sched.clients),
            "queued": len(sched.queued), "runs": runs, "events": events, "event_mark": event_mark,
            "completed": history.nruns - history.nerred, "erred": history.nerred,
            "started": history.started, "cpu": time.thread_time() - cpu}


class _Monitor:
    """The dashboard's view of one center: a snapshot refreshed on demand, runs and totals."""

    def __init__(self, center: Center) -> None:
        self.center = center
        self._read = center._query(_read_center)
        self._lock = threading.Lock()
        self._prefixes: dict = {}
        self._split = _Prefixes()
        self._mark = 0          # center runs consumed so far
        self._event_mark = 0
        self.seq = 0            # runs kept here so far (the page's ``since``)
        # Drawn runs as JSON text, one chunk per refresh: (number of its first run, runs, text).
        self.chunks: deque[tuple[int, int, str]] = deque()
        self._kept = 0
        self.events: deque[list] = deque(maxlen=PAGE_EVENTS)
        self.done: dict[str, list[int]] = {}  # prefix -> [completed, erred] seen in runs
        self._rates: deque[tuple[float, int]] = deque([(time.monotonic(), 0)], maxlen=64)
        self.snapshot: dict | None = None
        self._refreshed = 0.0
        self._interval = REFRESH_SECONDS
        self.snapshot_json: str | None = None

    def current(self) -> dict:
        """The snapshot, refreshed first if it is older than ``REFRESH_SECONDS``."""
        with self._lock:
            now = time.monotonic()
            if self.snapshot is None or now - self._refreshed >= self._interval:
                cpu = time.thread_time()
                self._refresh(now)
                assert self.snapshot is not None  # just refreshed
                cost = time.thread_time() - cpu + self.snapshot.pop("_cpu")
                self._interval = max(REFRESH_SECONDS, cost / MAX_SHARE)
            return self.snapshot

    def _refresh(self, now: float) -> None:
        raw = self._read(None, center=self.center, mark=self._mark,
                         event_mark=self._event_mark, prefixes=self._prefixes,
                         split=self._split)
        stream = raw["runs"]
        self._mark = stream["mark"]
        self._event_mark = raw["event_mark"]
        get, split, done = self._prefixes.get, self._split, self.done
        new = stream["runs"]
        shown = len(new) - STREAM_SAMPLE  # older runs of this refresh are counted, not drawn
        drawn = []
        for i, (key, worker, run, erred) in enumerate(new):
            prefix = get(key) or split(key)
            if i >= shown:
                drawn.append([prefix, key_name(key), worker, run[2], run[0], run[1], erred])
            totals = done.get(prefix)
            if totals is None:
                totals = done[prefix] = [0, 0]
            totals[erred] += 1
        if drawn:  # encoded once here, so a poll only joins text
            text = json.dumps(drawn, separators=(",", ":"), default=str)[1:-1]
            self.chunks.append((self.seq, len(drawn), text))
            self.seq += len(drawn)
            self._kept += len(drawn)
            while self._kept - self.chunks[0][1] >= PAGE_RUNS:
                self._kept -= self.chunks.popleft()[1]
        for t, kind, text in raw["events"]:
            self.events.append([t, kind, text])
        completed = raw["completed"]
        rates = self._rates
        rates.append((now, completed))
        while len(rates) > 2 and now - rates[1][0] >= 10:  # a window of 10 s or more
            rates.popleft()
        then, before = rates[0]
        rate = (completed - before) / (now - then) if now > then else 0.0
        states: dict[str, int] = {}
        by_prefix: dict[str, dict[str, int]] = {}
        for (prefix, state), n in raw["counts"].items():
            states[state] = states.get(state, 0) + n
            by_prefix.setdefault(prefix, {})[state] = n
        workers = []
        for address, info in sorted(raw["workers"].items()):
            workers.append({"address": address, **info})
        names = sorted(set(by_prefix) | set(done))
        self.snapshot = {
            "center": self.center.address, "time": time.time(), "started": raw["started"],
            "workers": workers, "nworkers": len(workers),
            "nthreads": sum(w["nthreads"] for w in workers), "clients": raw["clients"],
            "states": states, "ntasks": sum(states.values()), "queued": raw["queued"],
            "completed_total": completed, "erred_total": raw["erred"],
            "tasks_per_second": rate,
            "prefixes": [[p, by_prefix.get(p, {}), *done.get(p, (0, 0))] for p in names],
            "events": list(self.events), "dropped_runs": stream["dropped"],
            "_cpu": raw["cpu"]}
        self._refreshed = now
        self.snapshot_json = None

    def _stream_json(self, since: int) -> str:
        """Drawn runs from ``since`` on as JSON, in whole refreshes: ``PAGE_RUNS`` at most."""
        parts: list[str] = []
        count = 0
        for first, n, text in reversed(self.chunks):
            if first + n <= since or (count and count + n > PAGE_RUNS):
                break
            parts.append(text)
            count += n
        parts.reverse()
        return f'{{"mark":{self.seq},"runs":[{",".join(parts)}]}}'
    def data_json(self, since: int) -> str:
        """What ``/data.json`` answers: the snapshot and the runs after ``since``, as JSON."""
        self.current()
        with self._lock:
            if self.snapshot_json is None:
                self.snapshot_json = json.dumps(self.snapshot, separators=(",", ":"),
                                                default=str)
            return f'{self.snapshot_json[:-1]},"stream":{self._stream_json(since)}}}'

    def data(self, since: int) -> dict:
        """``data_json`` as a dict."""
        return json.loads(self.data_json(since))

    def status(self) -> dict:
        """``/status.json``: the center's ``info`` and ``workers``, from the snapshot."""
        snap = self.current()
        info = {"tasks": snap["states"], "ntasks": snap["ntasks"], "workers": snap["nworkers"],
                "clients": snap["clients"], "queued": snap["queued"]}
        workers = {w["address"]: {k: v for k, v in w.items() if k != "address"}
                   for w in snap["workers"]}
        return {"center": snap["center"], "info": info, "workers": workers}


# ---------------------------------------------------------------------- Prometheus


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(snapshot: dict) -> str:
    """The snapshot in the Prometheus text exposition format, version 0.0.4."""
    lines: list[str] = []

    def family(name: str, kind: str, help_text: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            label_text = ",".join(f'{k}="{_escape_label(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{label_text}}} {float(value)!r}" if label_text
                         else f"{name} {float(value)!r}")

    workers = snapshot["workers"]
    family("minidist_workers", "gauge", "Workers connected to the center.",
           [({}, snapshot["nworkers"])])
    family("minidist_threads", "gauge", "Task threads of all workers.",
           [({}, snapshot["nthreads"])])
    family("minidist_clients", "gauge", "Clients connected to the center.",
           [({}, snapshot["clients"])])
    family("minidist_tasks", "gauge", "Tasks the center knows, by state.",
           [({"state": s}, n) for s, n in sorted(snapshot["states"].items())])
    family("minidist_tasks_completed_total", "counter",
           "Task runs that finished since the center started.",
           [({}, snapshot["completed_total"])])
    family("minidist_tasks_erred_total", "counter",
           "Task runs that raised since the center started.", [({}, snapshot["erred_total"])])
    family("minidist_tasks_per_second", "gauge",
           "Tasks finished per second over the last 10 seconds or so.",
           [({}, snapshot["tasks_per_second"])])
    family("minidist_worker_threads", "gauge", "Task threads per worker.",
           [({"worker": w["address"]}, w["nthreads"]) for w in workers])
    family("minidist_worker_processing_tasks", "gauge",
           "Tasks running or prefetched per worker.",
           [({"worker": w["address"]}, w["processing"]) for w in workers])
    family("minidist_worker_held_bytes", "gauge", "Bytes of results held per worker.",
           [({"worker": w["address"]}, w["nbytes"]) for w in workers])
    family("minidist_worker_spilled_bytes", "gauge",
           "Bytes spilled to disk per worker (workers that report it).",
           [({"worker": w["address"]}, w["memory_spilled"]) for w in workers
            if w.get("memory_spilled") is not None])
    family("minidist_worker_last_seen_seconds", "gauge",
           "Seconds since each worker was last heard from.",
           [({"worker": w["address"]}, w["last_seen"]) for w in workers])
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- HTTP


class _DeadlineReader(io.RawIOBase):
    """A socket's bytes for a buffered reader, none after ``deadline`` (monotonic).

    A plain socket timeout restarts with every byte, so a client that sends
    one byte every few seconds could hold a connection for ever; here every
    read waits at most until the request's one deadline.
    """

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        super().__init__()
        self.sock = sock
        self.deadline = deadline

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("request timed out")
        self.sock.settimeout(left)
        return self.sock.recv_into(buffer)


class _Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer that serves at most ``MAX_CONNECTIONS`` connections at once.

    When all are taken, a new connection takes the place of the one that
    has waited longest for its request to arrive (closed at once); if every
    connection has its request already, the new one is closed instead.
    Connections that trickle their request in so cannot keep a page out.
    """

    server_address: tuple[str, int] | tuple[str, int, int, int]  # IPv4 or IPv6
    daemon_threads = True
    request_queue_size = 64

    def __init__(self, address: tuple, handler: type) -> None:
        self._lock = threading.Lock()
        self._reading: dict[Any, float] = {}  # connection -> since when, until its request came
        self._open = 0
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._admit(request):
            self.shutdown_request(request)  # busy with whole requests: refuse rather than queue
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def _admit(self, request: Any) -> bool:
        with self._lock:
            if self._open >= MAX_CONNECTIONS:
                if not self._reading:
                    return False
                oldest = min(self._reading, key=self._reading.__getitem__)
                del self._reading[oldest]
                _cut(oldest)  # its thread sees the end of the stream and goes
            self._open += 1
            self._reading[request] = time.monotonic()
        return True

    def request_read(self, request: Any) -> None:
        """The request on ``request`` has arrived whole: it is no longer a candidate to cut."""
        with self._lock:
            self._reading.pop(request, None)

    def _forget(self, request: Any) -> None:
        with self._lock:
            self._open -= 1
            self._reading.pop(request, None)


def _cut(sock: socket.socket) -> None:
    """End both directions of ``sock`` now; the thread that reads it gets the end of stream."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


def allowed_hosts(bound: str, contact: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """The ``Host`` header values (without port) the dashboard answers.

    Its bind address; ``localhost``, ``127.0.0.1`` and ``::1`` when bound to
    loopback or to every interface; the center's contact host; ``extra``.
    Any other name could be one an attacker's page rebound to this address.
    """
    names = {bound, contact, *extra}
    if bound in LOOPBACK_HOSTS or bound in _WILDCARD_HOSTS:
        names |= LOOPBACK_HOSTS
    return frozenset(_host_name(n) for n in names if n and n not in _WILDCARD_HOSTS)


def _host_name(value: str) -> str:
    """The host part of a ``Host`` header (``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        value = value.partition(":")[0]
    return value.rstrip(".")


def _is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _make_handler(center: Center, monitor: _Monitor, hosts: frozenset[str],
                  any_address: bool) -> type:
    """The request handler: routes, the Host check and the per-request deadline.

    ``hosts`` are the names answered; with ``any_address`` (bound to every
    interface) any IP address is answered too, since an address, unlike a
    name, cannot be rebound.
    """

    class Handler(BaseHTTPRequestHandler):
        server: _Server
        timeout = REQUEST_TIMEOUT
        server_version = "minidist-dashboard"

        def setup(self) -> None:
            super().setup()
            self.rfile.close()  # the plain reader: replaced by one that keeps the deadline
            self.deadline = time.monotonic() + REQUEST_TIMEOUT
            self.rfile = io.BufferedReader(_DeadlineReader(self.connection, self.deadline))

        def do_GET(self) -> None:
            self.server.request_read(self.connection)
            if not self.host_allowed():
                self.send_error(403, explain="unknown Host: pass it to --dashboard-allowed-host")
                return
            try:
                url = urlsplit(self.path)
                route = self.routes.get(url.path)
                if route is None:
                    self.send_error(404)
                    return
                status, ctype, body = route(self, parse_qs(url.query))
            except (ValueError, UnicodeError) as e:
                self.send_error(400, explain=str(e)[:200])
                return
            except Exception:
                logger.exception("dashboard request %.200r failed", self.path)
                self.send_error(500)
                return
            self.connection.settimeout(max(0.001, self.deadline - time.monotonic()))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.end_headers()
            self.wfile.write(body)

        def host_allowed(self) -> bool:
            """Is the ``Host`` header one this dashboard serves?  (None: not a browser, yes.)"""
            values = self.headers.get_all("Host") or []
            if not values:
                return True
            host = _host_name(values[0])
            ok = len(values) == 1 and (host in hosts or any_address and _is_ip_address(host))
            if not ok:
                logger.warning("dashboard: refused a request for Host %.100r from %s",
                               values[0], self.address_string())
            return ok

        def page(self, query: dict) -> tuple[int, str, bytes]:
            return 200, "text/html; charset=utf-8", PAGE_HTML.encode()

        def status_json(self, query: dict) -> tuple[int, str, bytes]:
            return 200, "application/json", json.dumps(monitor.status(), indent=1).encode()

        def data_json(self, query: dict) -> tuple[int, str, bytes]:
            since = int(query.get("since", ["0"])[0])
            body = monitor.data_json(since)
            return 200, "application/json", body.encode()

        def metrics(self, query: dict) -> tuple[int, str, bytes]:
            return 200, "text/plain; version=0.0.4; charset=utf-8", \
                metrics_text(monitor.current()).encode()

        routes = {"/": page, "/index.html": page, "/status.json": status_json,
                  "/data.json": data_json, "/metrics": metrics}

        def log_message(self, format: str, *args: Any) -> None:
            logger.debug("%s %s", self.address_string(), format % args)

    return Handler


def serve_dashboard(center: Center, host: str, port: int,
                    allowed: Iterable[str] = ()) -> str:
    """Serve the dashboard on ``host:port`` (0: any free port) in background threads.

    Requests whose ``Host`` is not a name of this dashboard (see
    ``allowed_hosts``; ``allowed`` adds names) get 403.  Returns its URL,
    ``http://HOST:PORT/``; a wildcard host is shown as the address other
    machines reach the center by.
    """
    monitor = _Monitor(center)
    contact = center.address.rpartition(":")[0].strip("[]")
    hosts = allowed_hosts(host, contact, allowed)
    handler = _make_handler(center, monitor, hosts, any_address=host in _WILDCARD_HOSTS)
    httpd = _Server((host, port), handler)
    threading.Thread(target=httpd.serve_forever, name="dashboard", daemon=True).start()
    bound_host, bound_port = httpd.server_address[:2]
    if bound_host in _WILDCARD_HOSTS:
        bound_host = contact
    return f"http://{format_address(bound_host, bound_port)}/"


# ---------------------------------------------------------------------- the page

STYLE = """
body{font:13px/1.4 system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:8px 16px;display:flex;gap:24px;flex-wrap:wrap}
header b{font-size:15px} header span{opacity:.9}
main{padding:8px 16px;display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:12px}
section{background:#fff;border:1px solid #ddd;border-radius:4px;padding:8px 12px}
section.wide{grid-column:1/-1} h2{font-size:14px;margin:2px 0 8px}
table{border-collapse:collapse;width:100%} th,td{text-align:left;padding:2px 8px;
border-bottom:1px solid #eee;white-space:nowrap} td.n,th.n{text-align:right}
.bar{display:flex;height:14px;background:#eee;border-radius:2px;overflow:hidden;min-width:120px}
.bar div{height:100%} .prefix td:first-child{font-weight:600}
.swatch{display:inline-block;width:10px;height:10px;margin-right:6px;border-radius:2px}
#events{max-height:220px;overflow:auto;font-family:monospace;font-size:12px}
#events div.warn{color:#b35c00} #events div.err{color:#c00}
canvas{width:100%;display:block} .muted{color:#777} #tip{position:fixed;display:none;
background:#333;color:#fff;padding:3px 6px;border-radius:3px;font-size:12px;pointer-events:none}
"""

STREAM_JS = r"""
const STATE_COLOURS = {memory: '#2ca02c', erred: '#d62728', processing: '#1f77b4',
  queued: '#9ecae1', waiting: '#c7c7c7', 'no-worker': '#ff7f0e', released: '#e7e7e7',
  lost: '#8c564b'};
const PREFIX_COLOURS = new Map();
// Each new prefix gets the next hue a golden angle away, so neighbours differ;
// reds are left to errors.
function prefixColour(prefix) {
  let c = PREFIX_COLOURS.get(prefix);
  if (c === undefined) {
    let hue = (PREFIX_COLOURS.size * 137.508 + 200) % 360;
    if (hue < 25 || hue > 335) hue = (hue + 50) % 360;
    c = 'hsl(' + Math.round(hue) + ',60%,50%)';
    PREFIX_COLOURS.set(prefix, c);
  }
  return c;
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}
// runs: [prefix, key, worker, thread, start, stop, erred]; lanes: "worker #thread" names.
function drawStream(canvas, runs, lanes) {
  const index = new Map();
  for (const l of lanes) if (!index.has(l)) index.set(l, index.size);
  for (const r of runs) { const l = r[2] + ' #' + r[3]; if (!index.has(l)) index.set(l, index.size); }
  const laneH = 18, left = 190, dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth || 900, H = Math.max(1, index.size) * laneH + 22;
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = H + 'px';
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H); ctx.font = '11px sans-serif';
  let t0 = Infinity, t1 = -Infinity;
  for (const r of runs) { if (r[4] < t0) t0 = r[4]; if (r[5] > t1) t1 = r[5]; }
  if (!runs.length) { t0 = 0; t1 = 1; }
  const span = Math.max(t1 - t0, 1e-3), sx = (W - left - 10) / span;
  for (const [name, i] of index) {
    ctx.fillStyle = i % 2 ? '#f4f6f8' : '#fff'; ctx.fillRect(0, i * laneH, W, laneH);
    ctx.fillStyle = '#333'; ctx.fillText(name, 4, i * laneH + 13);
  }
  for (const r of runs) {
    const i = index.get(r[2] + ' #' + r[3]);
    const x = left + (r[4] - t0) * sx, w = Math.max(1, (r[5] - r[4]) * sx);
    ctx.fillStyle = r[6] ? '#d62728' : prefixColour(r[0]);
    ctx.fillRect(x, i * laneH + 2, w, laneH - 4);
    if (r[6]) { ctx.strokeStyle = '#000'; ctx.strokeRect(x, i * laneH + 2, w, laneH - 4); }
  }
  ctx.fillStyle = '#555'; const y = index.size * laneH + 14;
  ctx.fillText('0 s', left, y);
  const end = span.toFixed(span < 10 ? 3 : 1) + ' s'; ctx.fillText(end, W - 10 - ctx.measureText(end).width, y);
  canvas._geometry = {index: index, t0: t0, sx: sx, left: left, laneH: laneH, runs: runs};
  return index.size;
}
function streamTooltip(canvas, tip) {
  canvas.addEventListener('mousemove', ev => {
    const g = canvas._geometry; if (!g) return;
    const rect = canvas.getBoundingClientRect(), x = ev.clientX - rect.left, y = ev.clientY - rect.top;
    const lane = Math.floor(y / g.laneH), t = g.t0 + (x - g.left) / g.sx;
    let hit = null;
    for (const r of g.runs) {
      if (g.index.get(r[2] + ' #' + r[3]) === lane && r[4] <= t + 2 / g.sx && r[5] >= t - 2 / g.sx) { hit = r; break; }
    }
    if (!hit) { tip.style.display = 'none'; return; }
    tip.textContent = hit[1] + ' on ' + hit[2] + ' #' + hit[3] + ': ' +
      ((hit[5] - hit[4]) * 1000).toFixed(2) + ' ms' + (hit[6] ? ' (erred)' : '');
    tip.style.left = (ev.clientX + 12) + 'px'; tip.style.top = (ev.clientY + 12) + 'px';
    tip.style.display = 'block';
  });
  canvas.addEventListener('mouseleave', () => { tip.style.display = 'none'; });
}
"""

_PAGE_JS = r"""
const $ = id => document.getElementById(id);
let mark = 0, runs = [];
const KEEP = %(keep)d;
function bytes(n) {
  if (n === undefined || n === null) return '';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB']; let i = 0;
  while (Math.abs(n) >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function render(d) {
  $('center').textContent = d.center;
  $('nworkers').textContent = d.nworkers; $('nthreads').textContent = d.nthreads;
  $('completed').textContent = d.completed_total; $('erred').textContent = d.erred_total;
  $('rate').textContent = d.tasks_per_second.toFixed(1); $('ntasks').textContent = d.ntasks;
  const states = Object.keys(d.states).sort();
  fill($('states').tBodies[0], states.map(s => {
    const tr = el('tr'); tr.dataset.state = s;
    const sw = el('span', '', 'swatch'); sw.style.background = STATE_COLOURS[s] || '#999';
    const td = el('td'); td.append(sw, s); tr.append(td, el('td', d.states[s], 'n')); return tr;
  }));
  const mem = d.workers.some(w => MEMORY.some(f => w[f] !== undefined && w[f] !== null));
  for (const th of document.querySelectorAll('#workers .mem')) th.hidden = !mem;
  fill($('workers').tBodies[0], d.workers.map(w => {
    const tr = el('tr'); tr.dataset.address = w.address;
    tr.append(el('td', w.address), el('td', w.name), el('td', w.nthreads, 'n'),
      el('td', w.processing, 'n'), el('td', w.keys, 'n'), el('td', bytes(w.nbytes), 'n'));
    if (mem) tr.append(el('td', bytes(w.memory_managed), 'n'), el('td', bytes(w.memory_spilled), 'n'),
      el('td', bytes(w.memory_unmanaged), 'n'),
      el('td', w.paused === undefined || w.paused === null ? '' : (w.paused ? 'paused' : 'no')));
    tr.append(el('td', w.last_seen.toFixed(1) + ' s ago', 'n'));
    return tr;
  }));
  fill($('prefixes').tBodies[0], d.prefixes.map(([p, st, done, erred]) => {
    const tr = el('tr', null, 'prefix'); tr.dataset.prefix = p;
    const total = Object.values(st).reduce((a, b) => a + b, 0);
    const bar = el('div', null, 'bar');
    for (const s of ['memory', 'erred', 'lost', 'processing', 'queued', 'no-worker', 'waiting', 'released']) {
      if (!st[s]) continue;
      const seg = el('div'); seg.style.width = (100 * st[s] / total) + '%%';
      seg.style.background = STATE_COLOURS[s]; seg.title = s + ': ' + st[s]; bar.append(seg);
    }
    const sw = el('span', '', 'swatch'); sw.style.background = prefixColour(p);
    const name = el('td'); name.append(sw, p);
    const barCell = el('td'); barCell.style.width = '45%%'; barCell.append(bar);
    tr.append(name, barCell, el('td', (st.memory || 0) + ' / ' + total, 'n'),
      el('td', done, 'n done'), el('td', erred, 'n erred'));
    return tr;
  }));
  const ev = $('events');
  ev.replaceChildren(...d.events.slice().reverse().map(([t, kind, text]) => {
    const cls = kind === 'task-erred' ? 'err' : (kind === 'worker-removed' ? 'warn' : '');
    return el('div', new Date(t * 1000).toLocaleTimeString() + '  ' + text, cls);
  }));
  if (!d.events.length) ev.append(el('div', 'nothing yet', 'muted'));
  if (d.stream.mark < mark) runs = [];
  runs = runs.concat(d.stream.runs);
  if (runs.length > KEEP) runs = runs.slice(runs.length - KEEP);
  mark = d.stream.mark;
  const lanes = [];
  for (const w of d.workers) for (let i = 0; i < w.nthreads; i++) lanes.push(w.address + ' #' + i);
  const n = drawStream($('stream'), runs, lanes);
  $('stream-summary').textContent = runs.length + ' task runs on ' + n + ' threads';
}
async function poll() {
  try {
    const r = await fetch('data.json?since=' + mark, {cache: 'no-store'});
    if (!r.ok) throw new Error('HTTP ' + r.status);
    render(await r.json());
    $('status').textContent = 'updated ' + new Date().toLocaleTimeString();
  } catch (e) {
    $('status').textContent = 'cannot reach the center (' + e.message + ')';
  }
  setTimeout(poll, 1000);
}
const MEMORY = %(memory)s;
streamTooltip($('stream'), $('tip'));
poll();
"""

PAGE_HTML = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>minidist dashboard</title><style>%(style)s</style></head>
<body>
<header><b>minidist</b><span>center <span id="center">?</span></span>
<span><span id="nworkers">0</span> workers, <span id="nthreads">0</span> threads</span>
<span><span id="ntasks">0</span> tasks known</span>
<span>completed <span id="completed">0</span></span><span>erred <span id="erred">0</span></span>
<span><span id="rate">0</span> tasks/s</span><span id="status" class="muted">loading</span></header>
<main>
<section class="wide"><h2>Workers</h2><table id="workers"><thead><tr><th>address</th>
<th>name</th><th class="n">threads</th><th class="n">processing</th><th class="n">keys</th>
<th class="n">bytes held</th><th class="n mem" hidden>managed</th>
<th class="n mem" hidden>spilled</th><th class="n mem" hidden>unmanaged</th>
<th class="mem" hidden>paused</th><th class="n">last seen</th></tr></thead><tbody></tbody>
</table></section>
<section><h2>Tasks by state</h2><table id="states"><tbody></tbody></table></section>
<section><h2>Progress by task prefix</h2><table id="prefixes"><thead><tr><th>prefix</th>
<th>known tasks</th><th class="n">in memory</th><th class="n">done</th><th class="n">erred</th>
</tr></thead><tbody></tbody></table></section>
<section class="wide"><h2>Task stream <span id="stream-summary" class="muted"></span></h2>
<canvas id="stream"></canvas></section>
<section class="wide"><h2>Events</h2><div id="events"></div></section>
</main><div id="tip"></div>
<script>%(stream_js)s</script>
<script>%(page_js)s</script>
</body></html>
""" % {"style": STYLE, "stream_js": STREAM_JS,
       "page_js": _PAGE_JS % {"keep": PAGE_RUNS, "memory": json.dumps(list(MEMORY_FIELDS))}}
