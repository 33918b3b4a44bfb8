"""The center's dashboard: the page in a real browser, /metrics, /status.json, bad requests."""

from __future__ import annotations

import html
import json
import re
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import cloudpickle
import pytest
from prometheus_client.parser import text_string_to_metric_families

from minidist import Client, LocalCluster
from minidist.dashboard import key_split

from browser import dump_dom
from conftest import wait_for
from slow_talkers import SlowTalkers


def inc(x):
    return x + 1


def boom(x):
    raise ValueError(f"boom {x}")


@pytest.fixture(scope="module")
def dcluster():
    with LocalCluster(n_workers=2, threads_per_worker=2, dashboard_port=0) as c:
        yield c


@pytest.fixture(scope="module")
def worked(dcluster):
    """30 inc tasks and one that raises, kept in memory while the module runs."""
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # before the autouse fixture
    client = Client(dcluster, set_as_default=False)
    futures = client.map(inc, range(30))
    client.gather(futures)
    bad = client.submit(boom, 1)
    with pytest.raises(ValueError):
        bad.result()
    yield client, futures
    client.close()


def get(url: str, timeout: float = 10) -> tuple[str, str]:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.headers["Content-Type"], r.read().decode()


def data(link: str) -> dict:
    return json.loads(get(link + "data.json")[1])


@pytest.mark.timeout(90)
def test_page_in_a_browser_shows_every_worker_and_the_finished_counts(dcluster, worked):
    client, futures = worked
    expected = wait_for(lambda: (d := data(dcluster.dashboard_link))["completed_total"] >= 30
                        and d, message="the runs to reach the dashboard")
    dom = dump_dom(dcluster.dashboard_link)
    workers = client.nthreads()
    assert len(workers) == 2
    for address in workers:
        assert f'<tr data-address="{address}"><td>{address}</td>' in dom
    assert f'<span id="completed">{expected["completed_total"]}</span>' in dom
    assert '<span id="erred">1</span>' in dom
    assert '<span id="nworkers">2</span> workers, <span id="nthreads">4</span>' in dom
    assert re.search(r'<tr data-state="memory">.*?<td class="n">30</td>', dom)
    row = re.search(r'<tr class="prefix" data-prefix="inc">(.*?)</tr>', dom).group(1)
    assert "30 / 30" in row and '<td class="n done">30</td>' in row
    assert 'data-prefix="boom"' in dom
    summary = re.search(r'<span id="stream-summary" class="muted">(\d+) task runs on (\d+) '
                        r'threads</span>', dom)
    assert summary and int(summary.group(1)) == 31 and int(summary.group(2)) == 4
    events = html.unescape(re.search(r'<div id="events">(.*?)</section>', dom, re.S).group(1))
    assert events.count("joined with 2 threads") == 2
    assert "erred on" in events and "ValueError: boom 1" in events
    assert re.search(r'<span id="status" class="muted">updated ', dom)


def test_page_fetches_nothing_from_elsewhere(dcluster):
    ctype, page = get(dcluster.dashboard_link)
    assert ctype.startswith("text/html")
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', page)
    assert "<canvas" in page and "fetch('data.json" in page


def test_metrics_parse_with_prometheus_client(dcluster, worked):
    client, futures = worked
    wait_for(lambda: data(dcluster.dashboard_link)["completed_total"] >= 30)
    ctype, text = get(dcluster.dashboard_link + "metrics")
    assert ctype.startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for f in families.values():
        assert f.name.startswith("minidist_")

    def value(family: str, **labels: str) -> float:
        samples = [s for s in families[family].samples if s.labels == labels]
        assert len(samples) == 1, (family, labels, families[family].samples)
        return samples[0].value

    assert value("minidist_workers") == 2
    assert value("minidist_threads") == 4
    completed = families.get("minidist_tasks_completed") or \
        families["minidist_tasks_completed_total"]
    assert completed.type == "counter"
    assert [s.name for s in completed.samples] == ["minidist_tasks_completed_total"]
    assert completed.samples[0].value >= 30
    erred = families.get("minidist_tasks_erred") or families["minidist_tasks_erred_total"]
    assert erred.type == "counter" and erred.samples[0].value == 1
    assert value("minidist_tasks", state="memory") == 30
    assert value("minidist_tasks", state="erred") == 1
    assert families["minidist_tasks_per_second"].type == "gauge"
    held = {s.labels["worker"]: s.value for s in families["minidist_worker_held_bytes"].samples}
    assert set(held) == set(client.nthreads()) and sum(held.values()) > 0
    assert set(s.labels["worker"] for s in families["minidist_worker_threads"].samples) == \
        set(client.nthreads())


def raw_request(link: str, payload: bytes, timeout: float = 10) -> bytes:
    host, port = link.split("//")[1].rstrip("/").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all
        chunks = []
        try:
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


@pytest.mark.timeout(60)
def test_malformed_and_huge_requests_get_errors_and_the_center_keeps_serving(dcluster, worked):
    link = dcluster.dashboard_link
    status = lambda reply: reply.split(b"\r\n", 1)[0]  # noqa: E731
    assert b" 400 " in status(raw_request(link, b"\x00\xff\xfe garbage\r\n\r\n"))
    assert b" 414 " in status(raw_request(link, b"GET /" + b"a" * 200_000 + b" HTTP/1.1\r\n\r\n"))
    many = b"".join(b"X-%d: y\r\n" % i for i in range(200))
    assert b" 431 " in status(raw_request(link, b"GET / HTTP/1.1\r\n" + many + b"\r\n"))
    assert b" 501 " in status(raw_request(link, b"POST /metrics HTTP/1.1\r\n"
                                                 b"Content-Length: 5\r\n\r\nhello"))
    assert b" 404 " in status(raw_request(link, b"GET /nothing HTTP/1.1\r\n\r\n"))
    assert b" 400 " in status(raw_request(link, b"GET /data.json?since=abc HTTP/1.1\r\n\r\n"))
    huge = b"GET /metrics HTTP/1.1\r\nContent-Length: 50000000\r\n\r\n" + b"x" * 4_000_000
    assert b" 200 " in status(raw_request(link, huge))
    # Connections that never send a request hold at most a few threads, for a while.
    idle = [socket.create_connection(link.split("//")[1].rstrip("/").rsplit(":", 1))
            for _ in range(24)]
    try:
        client, _ = worked
        assert client.submit(inc, 1000).result(timeout=10) == 1001  # the center is unmoved
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: get(link + "metrics")[0].startswith("text/plain"), timeout=20,
             message="the dashboard to serve again")
    assert client.submit(inc, 2000).result(timeout=10) == 2001


def test_status_json_stays_as_it_was(dcluster, worked):
    ctype, body = get(dcluster.dashboard_link + "status.json")
    assert ctype == "application/json"
    status = json.loads(body)
    assert set(status) == {"center", "info", "workers"}
    assert status["center"] == dcluster.address
    assert status["info"]["workers"] == 2 and status["info"]["tasks"]["memory"] >= 30
    for info in status["workers"].values():
        assert {"name", "nthreads", "processing", "keys", "nbytes", "last_seen"} <= set(info)


def test_dcenter_prints_the_dashboard_ready_line(spawn):
    center = spawn("center", "--port", "0", "--dashboard-port", "0", ready="Dashboard at")
    assert center.lines[-2].startswith("Start center at 127.0.0.1:")
    url = center.lines[-1].split()[-1]
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", url)
    assert get(url)[0].startswith("text/html")
    assert json.loads(get(url + "data.json")[1])["nworkers"] == 0


def test_dashboard_port_in_use_is_a_clear_error(spawn):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "minidist.center", "--port", "0",
                               "--dashboard-port", str(port)], capture_output=True, text=True,
                              timeout=30)
    assert proc.returncode == 1
    assert f"cannot serve the dashboard on 127.0.0.1:{port}" in proc.stderr


@pytest.mark.parametrize("key, prefix", [
    ("inc-79963f7e8a3c4e9bb8c7f9a0c6a2b1d4", "inc"), ("inc", "inc"),
    (("x-2b5d0c1f9e8a7b6c5d4e3f2a1b0c9d8e", 0, 1), "x"), ("read-csv-ab12cd34", "read-csv"),
    ("sum-aggregate-2b5d0c1f", "sum-aggregate"), ("('x-1', 0)", "x"),
    ("79963f7e8a3c4e9bb8c7f9a0c6a2b1d4", "data"), (b"inc-1", "inc"), (42, "42"),
    ("<lambda>-1234", "lambda"), ("f-1b4e28ba-2fa1-11d2-883f-0016d3cca427", "f"),
    ("read-abcdefgh", "read-abcdefgh"), ("read-abc12345", "read"),
])
def test_key_split(key, prefix):
    assert key_split(key) == prefix


# ---------------------------------------------------------------------- who may ask, how slowly


def request_with_host(link: str, host: str | None, path: str = "/status.json",
                      extra: bytes = b"") -> bytes:
    """The raw reply to ``GET path`` with the given ``Host`` header (None: no header)."""
    line = b"GET " + path.encode() + b" HTTP/1.1\r\n"
    header = b"" if host is None else b"Host: " + host.encode() + b"\r\n"
    return raw_request(link, line + header + extra + b"\r\n")


def status_code(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def test_host_header_must_name_the_dashboard(dcluster):
    link = dcluster.dashboard_link
    port = link.rstrip("/").rpartition(":")[2]
    for path in ("/", "/status.json", "/data.json", "/metrics"):
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example",
                     "attacker.localhost"):
            reply = request_with_host(link, host, path)
            assert status_code(reply) == 403, (path, host, reply[:200])
            assert dcluster.address.encode() not in reply and b"<canvas" not in reply
        for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LOCALHOST",
                     f"[::1]:{port}", None):
            reply = request_with_host(link, host, path)
            assert status_code(reply) == 200, (path, host, reply[:200])
    two_hosts = request_with_host(link, f"127.0.0.1:{port}", extra=b"Host: evil.example\r\n")
    assert status_code(two_hosts) == 403
    # What a browser does: urllib sends the Host of the URL it was given.
    assert get(link + "status.json")[0] == "application/json"


def test_dashboard_allowed_host_and_contact_address_are_answered(spawn):
    center = spawn("center", "--port", "0", "--dashboard-port", "0",
                   "--contact-address", "head.cluster.example",
                   "--dashboard-allowed-host", "dash.example",
                   "--dashboard-allowed-host", "Other.Example", ready="Dashboard at")
    link = center.lines[-1].split()[-1]
    port = link.rstrip("/").rpartition(":")[2]
    for host in ("dash.example", f"dash.example:{port}", "other.example", "head.cluster.example",
                 f"127.0.0.1:{port}", "localhost"):
        assert status_code(request_with_host(link, host)) == 200, host
    for host in ("evil.example", "dash.example.evil.example", "cluster.example"):
        assert status_code(request_with_host(link, host)) == 403, host
    assert "refused a request for Host 'evil.example'" in center.log()


@pytest.mark.timeout(60)
def test_slow_requests_neither_keep_pages_out_nor_live_past_the_deadline(dcluster):
    from minidist.dashboard import MAX_CONNECTIONS, REQUEST_TIMEOUT
    link = dcluster.dashboard_link
    address = link.split("//")[1].rstrip("/")
    slow = SlowTalkers(address, MAX_CONNECTIONS, b"GET / HTTP/1.1\r\n" + b"X-Slow: y\r\n" * 100,
                       pace=0.5)
    try:
        wait_for(lambda: min(slow.sent) >= 2, 10, message="every slow request to begin")
        # Every slot holds a request that has not arrived: a page load still gets in, at once.
        for _ in range(3):
            ctype, body = get(link, timeout=5)
            assert ctype.startswith("text/html") and "<canvas" in body
        assert json.loads(get(link + "status.json", timeout=5)[1])["center"] == dcluster.address
        assert len(slow.closed_at) <= 4  # each page load made room by closing one slow request
        # However steadily they trickle, the others are cut at the request's deadline.
        wait_for(lambda: len(slow.closed_at) == MAX_CONNECTIONS, REQUEST_TIMEOUT + 5,
                 message="the slow requests to be closed")
    finally:
        slow.close()
    lasted = sorted(slow.closed_at[i] - slow.opened for i in range(MAX_CONNECTIONS))
    assert lasted[4] > REQUEST_TIMEOUT - 1.5 and lasted[-1] < REQUEST_TIMEOUT + 2, lasted
    assert sorted(slow.sent)[4] >= 15  # the survivors kept talking all along


def test_status_json_comes_from_the_snapshot(dcluster, worked):
    """Many polls, one read of the center: answers within a refresh interval are identical.

    Read per request, as before, every answer differs (each worker's
    ``last_seen`` is computed at the moment of the read).
    """
    link = dcluster.dashboard_link
    bodies = [get(link + "status.json")[1] for _ in range(8)]
    assert len(set(bodies)) <= 2, "status.json read the center more than once a second"
    status = json.loads(bodies[-1])
    assert status["info"]["workers"] == 2 and status["info"]["tasks"]["memory"] >= 30
