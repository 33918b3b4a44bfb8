"""What a script sees of its work: progress bars, task streams and performance reports.

* ``progress(futures)`` draws a tqdm-style bar on stderr from the futures'
  done callbacks: a thread redraws it every ``interval`` on a terminal; on
  a pipe or file it prints a plain line at 0, 25, 50, 75 and 100 % instead.
* ``Client.get_task_stream()`` returns a ``TaskStream``: on entry it asks
  the center for the mark of its run history (``center.history``), on exit
  for every run recorded since, with start, stop, worker, thread, status.
* ``performance_report(filename)`` wraps a ``TaskStream`` and, on exit,
  writes one HTML file with the summary and the task stream drawn by the
  dashboard's own script, inlined, so it opens offline.
"""

from __future__ import annotations

import html
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from .task import collect, key_name

if TYPE_CHECKING:
    from .executor import Executor, Future

logger = logging.getLogger("minidist.diagnostics")

__all__ = ["ProgressBar", "TaskStream", "performance_report", "progress"]


# ---------------------------------------------------------------------- progress


def _futures_in(objs: tuple) -> list[Future]:
    """The distinct Futures in futures, lists/dicts of them, or persisted dask collections."""
    from .executor import Future
    found: dict = {}
    for obj in objs:
        graph = getattr(obj, "__dask_graph__", None)
        if graph is not None and not isinstance(obj, Future):
            for value in dict(graph()).values():
                if isinstance(value, Future):
                    found.setdefault(value.key, value)
                elif isinstance(getattr(value, "value", None), Future):  # dask's DataNode
                    found.setdefault(value.value.key, value.value)
        else:
            collect(obj, found, Future)
    return list(found.values())


def _clock(seconds: float) -> str:
    """tqdm's time format: ``MM:SS``, or ``H:MM:SS`` past an hour."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_bar(done: int, total: int, elapsed: float, errors: int = 0, width: int = 25) -> str:
    """One progress line in tqdm's layout.

    ``45%|###########              | 450/1000 [00:03<00:04, 150.00it/s, errors=2]``
    """
    fraction = done / total if total else 1.0
    filled = int(fraction * width)
    bar = "#" * filled + " " * (width - filled)
    rate = done / elapsed if elapsed > 0 else 0.0
    if rate <= 0:
        rate_text, remaining = "?it/s", "?"
    else:
        rate_text = f"{rate:.2f}it/s" if rate >= 1 else f"{1 / rate:.2f}s/it"
        remaining = _clock((total - done) / rate)
    postfix = f", errors={errors}" if errors else ""
    return (f"{fraction * 100:3.0f}%|{bar}| {done}/{total} "
            f"[{_clock(elapsed)}<{remaining}, {rate_text}{postfix}]")


class ProgressBar:
    """Progress of a set of futures, drawn on ``file`` (stderr) until all are done.

    ``done``, ``errors`` and ``total`` are counts (a future that raised,
    was lost or cancelled counts as done and as an error); ``join()``
    waits for the end, ``stop()`` stops drawing early.
    """

    def __init__(self, futures: list[Future], file: TextIO | None = None,
                 complete: bool = True, interval: float = 0.1) -> None:
        self.futures = futures
        self.total = len(futures)
        self.done = 0
        self.errors = 0
        self.file = file if file is not None else sys.stderr
        self.complete = complete
        self.interval = interval
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._changed = threading.Event()
        self._finished = threading.Event()
        self._stopped = threading.Event()
        try:
            self._tty = self.file.isatty()
        except (AttributeError, ValueError):
            self._tty = False
        self._next_line = 0.0  # next fraction at which a non-terminal gets a line
        self._width = 0
        self._thread = threading.Thread(target=self._draw_loop, name="progress", daemon=True)

    def start(self) -> ProgressBar:
        """Watch the futures and start drawing in a background thread."""
        if not self.total:
            self._finished.set()
        for future in self.futures:
            future.add_done_callback(self._on_done)
        self._thread.start()
        return self

    def _on_done(self, future: Future) -> None:
        failed = future.status != "finished"
        with self._lock:
            self.done += 1
            self.errors += failed
            if self.done >= self.total:
                self._finished.set()
        self._changed.set()

    def _draw_loop(self) -> None:
        try:
            while not self._stopped.is_set():
                finished = self._finished.is_set()
                self._draw(final=finished)
                if finished:
                    return
                if self._tty:  # redraw every interval (the clock moves), at once at the end
                    self._finished.wait(self.interval)
                else:
                    self._changed.wait(1.0)
                    self._changed.clear()
        except (OSError, ValueError) as e:  # the stream was closed under us
            logger.debug("progress bar stopped drawing: %s", e)

    def _draw(self, final: bool) -> None:
        with self._lock:
            done, errors = self.done, self.errors
        line = format_bar(done, self.total, time.monotonic() - self.started, errors)
        if self._tty:
            pad = " " * max(0, self._width - len(line))
            self._width = len(line)
            if final and not self.complete:
                self.file.write("\r" + " " * len(line) + "\r")
            else:
                self.file.write("\r" + line + pad + ("\n" if final else ""))
        else:
            fraction = done / self.total if self.total else 1.0
            if not final and fraction < self._next_line:
                return
            if final and self._next_line > 1.0:
                return
            self.file.write(line + "\n")
            self._next_line = 2.0 if final else (int(fraction * 4) + 1) / 4
        self.file.flush()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every future is done and the last line is drawn; False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def stop(self) -> None:
        """Stop drawing now (the futures are not touched)."""
        self._stopped.set()
        self._changed.set()
        self._thread.join()

    def __repr__(self) -> str:
        return f"<ProgressBar {self.done}/{self.total} errors={self.errors}>"


def progress(*futures: Any, notebook: bool = False, complete: bool = True, wait: bool = True,
             file: TextIO | None = None, interval: float = 0.1) -> ProgressBar:
    """Show a progress bar on stderr for futures (lists, dicts, persisted dask collections).

    Blocks until every future is done (finished, erred, lost or cancelled)
    unless ``wait=False``, which returns the running ``ProgressBar`` at
    once (``.join()`` waits).  On a terminal the bar redraws in place and,
    with ``complete=False``, is erased at the end; on a pipe or file a few
    plain lines are printed.  ``notebook=True`` draws the same text (there
    is no widget).  Errors do not raise here: they are counted and shown.
    """
    found = _futures_in(futures)
    bar = ProgressBar(found, file=file, complete=complete, interval=interval).start()
    if wait:
        bar.join()
    return bar


# ---------------------------------------------------------------------- task stream


class TaskStream:
    """Every task run on the cluster while the ``with`` block ran (``Client.get_task_stream()``).

    After the block, ``data`` is a list of dicts with ``key``, ``worker``,
    ``thread``, ``start``, ``stop`` (wall-clock seconds) and ``status``
    (``"OK"`` or ``"error"``), oldest first.  The center keeps the last
    ``history.RUNS_KEPT`` runs: ``dropped`` counts any older ones lost.
    """

    def __init__(self, session: Executor) -> None:
        self.session = session
        self.data: list[dict] = []
        self.dropped = 0
        self.started = self.stopped = 0.0
        self._mark: int | None = None

    def __enter__(self) -> TaskStream:
        self._mark = self.session._center("task_stream", mark=0, limit=0)["mark"]
        self.started = time.time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.collect()

    def collect(self) -> list[dict]:
        """Fetch the runs recorded since the block began (called on exit)."""
        if self._mark is None:
            raise RuntimeError("use the task stream in a with block")
        reply = self.session._center("task_stream", mark=self._mark)
        self.stopped = time.time()
        self.dropped = reply["dropped"]
        if self.dropped:
            logger.warning("the task stream lost its %d oldest runs: the center keeps the last "
                           "%d", self.dropped, len(reply["runs"]))
        self.data = [{"key": key, "worker": worker, "thread": thread, "start": start,
                      "stop": stop, "status": "error" if erred else "OK"}
                     for key, worker, (start, stop, thread), erred in reply["runs"]]
        return self.data

    def __len__(self) -> int:
        return len(self.data)


# ---------------------------------------------------------------------- performance report


def _only_client() -> Executor:
    from .executor import Client, _sessions
    clients = [s for s in list(_sessions) if isinstance(s, Client) and not s._shutdown]
    if len(clients) != 1:
        raise ValueError(f"performance_report needs client= when {len(clients)} Clients are "
                         "open in this process")
    return clients[0]


class performance_report:  # noqa: N801 - a context manager named as dask names it
    """``with performance_report("report.html"):`` writes an offline HTML report on exit.

    The file holds the summary (wall time, task runs, errors, time per task
    prefix and per worker) and the task stream of every run on the cluster
    during the block.  ``client`` defaults to the one open Client of this
    process.  The report is written even when the block raises.
    """

    def __init__(self, filename: str | os.PathLike = "minidist-report.html",
                 client: Executor | None = None) -> None:
        self.filename = os.fspath(filename)
        self.client = client
        self.stream: TaskStream | None = None

    def __enter__(self) -> performance_report:
        self.client = self.client or _only_client()
        self.stream = TaskStream(self.client).__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        stream, client = self.stream, self.client
        assert stream is not None and client is not None  # set by __enter__
        stream.collect()
        try:
            lanes = [f"{address} #{i}" for address, n in sorted(client.nthreads().items())
                     for i in range(n)]
        except Exception:  # the cluster is gone: draw the lanes the runs name
            lanes = []
        text = report_html(stream, lanes, title=os.path.basename(self.filename))
        with open(self.filename, "w", encoding="utf-8") as f:
            f.write(text)


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def report_html(stream: TaskStream, lanes: list[str], title: str = "minidist report") -> str:
    """A self-contained HTML page with the summary and task stream of ``stream``."""
    from .dashboard import STREAM_JS, STYLE, key_split
    runs = [[key_split(r["key"]), key_name(r["key"]), r["worker"], r["thread"], r["start"],
             r["stop"], r["status"] != "OK"] for r in stream.data]
    wall = max(stream.stopped - stream.started, 1e-9)
    busy = sum(r[5] - r[4] for r in runs)
    by_prefix: dict[str, list] = {}
    by_worker: dict[str, list] = {}
    for r in runs:
        for table, name in ((by_prefix, r[0]), (by_worker, r[2])):
            row = table.setdefault(name, [0, 0, 0.0, 0.0])
            row[0] += 1
            row[1] += r[6]
            row[2] += r[5] - r[4]
            row[3] = max(row[3], r[5] - r[4])
    summary = _table(["", ""], [
        ["started", time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stream.started))],
        ["wall time", f"{wall:.3f} s"], ["task runs", len(runs)],
        ["erred", sum(r[6] for r in runs)], ["compute time", f"{busy:.3f} s"],
        ["parallelism", f"{busy / wall:.2f}"], ["threads", len(lanes) or "?"],
        ["runs lost (center ring full)", stream.dropped]])
    prefixes = _table(["prefix", "runs", "erred", "total s", "mean ms", "max ms"], [
        [p, n, e, f"{t:.3f}", f"{1e3 * t / n:.3f}", f"{1e3 * m:.3f}"]
        for p, (n, e, t, m) in sorted(by_prefix.items(), key=lambda kv: -kv[1][2])])
    workers = _table(["worker", "runs", "erred", "busy s", "busy %"], [
        [w, n, e, f"{t:.3f}", f"{100 * t / wall:.1f}"]
        for w, (n, e, t, m) in sorted(by_worker.items())])
    errors = [html.escape(r[1]) for r in runs if r[6]][:100]
    data = json.dumps({"runs": runs, "lanes": lanes}, separators=(",", ":"))
    data = data.replace("<", "\\u003c")  # nothing in the data can close the script element
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{STYLE}</style></head><body>
<header><b>minidist performance report</b><span>{html.escape(title)}</span></header>
<main>
<section><h2>Summary</h2><div id="summary">{summary}</div></section>
<section><h2>Time per task prefix</h2><div id="prefixes">{prefixes}</div></section>
<section class="wide"><h2>Task stream <span id="stream-summary" class="muted"></span></h2>
<canvas id="stream"></canvas></section>
<section><h2>Workers</h2><div id="workers">{workers}</div></section>
<section><h2>Erred tasks</h2><div id="errors">{"<br>".join(errors) or "none"}</div></section>
</main><div id="tip"></div>
<script id="report-data" type="application/json">{data}</script>
<script>{STREAM_JS}</script>
<script>
const report = JSON.parse(document.getElementById('report-data').textContent);
const canvas = document.getElementById('stream');
function draw() {{
  const n = drawStream(canvas, report.runs, report.lanes);
  document.getElementById('stream-summary').textContent =
    report.runs.length + ' task runs on ' + n + ' threads';
}}
streamTooltip(canvas, document.getElementById('tip'));
window.addEventListener('resize', draw);
draw();
</script></body></html>
"""
