"""A cluster spread over separate hosts (network namespaces): addresses, partitions, slow links.

The center, each worker and each client run on hosts of their own (see
``nethosts.py``); clients are agents that run the functions below.  Links go
down, get cut between two hosts only, or are limited with tbf, and the
cluster must notice within the heartbeat timeout, recompute what it lost,
take back hosts that return, and never hang.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import time

import pytest

from nethosts import net, tls_files  # noqa: F401  (fixtures)

pytestmark = pytest.mark.multihost

KEY = secrets.token_hex(16)
ENV = {"MINIDIST_AUTH_KEY": KEY}
FAST = ["--heartbeat-timeout", "2"]          # center: declare a silent worker dead after 2 s
BEAT = ["--heartbeat-interval", "0.5"]       # worker


# --------------------------------------------------------------------------- run on the cluster


def inc(x):
    return x + 1


def whereami(x, delay=0.0, flag_dir=None):
    """``(x, address of the host that ran it)``; with ``flag_dir``, say so when starting."""
    from minidist.wire import reachable_host
    host = reachable_host()
    if flag_dir:
        open(os.path.join(flag_dir, f"{x}-{host}"), "w").close()
    time.sleep(delay)
    return x, host


def pattern(n, seed=0):
    """``n`` deterministic bytes (a value that must arrive intact)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 4096
    return (block * (n // len(block) + 1))[:n]


def digest(data):
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- run in the agents


def connect(state, address, **kwargs):
    """Open ``state["c"]``, a Client; return the workers' hosts once ``expect`` are there."""
    from minidist import Client
    expect = kwargs.pop("expect", 0)
    c = state["c"] = Client(address, set_as_default=False, **kwargs)
    deadline = time.monotonic() + 30
    while len(c.nthreads()) < expect and time.monotonic() < deadline:
        time.sleep(0.05)
    return sorted(c.nthreads())


def hosts_of(addresses):
    return sorted(a.rpartition(":")[0] for a in addresses)


def wait_workers(state, hosts, timeout):
    """Wait until the center lists exactly workers on ``hosts``; return the seconds it took."""
    c, start = state["c"], time.monotonic()
    while hosts_of(c.nthreads()) != sorted(hosts):
        if time.monotonic() - start > timeout:
            raise AssertionError(f"workers {c.nthreads()} are not on {hosts} after {timeout}s")
        time.sleep(0.05)
    return time.monotonic() - start


def spread(state, n, flag_dir=None, delay=0.0):
    """Map ``whereami`` over ``range(n)``; keep the futures; return key -> holders."""
    c = state["c"]
    futures = state["spread"] = c.map(whereami, range(n), delay=delay, flag_dir=flag_dir,
                                      pure=False)
    c.gather(futures)
    who = c.who_has(futures)
    return {f.key: who[f.key] for f in futures}


def submit_naps(state, n, delay, flag_dir):
    state["naps"] = [state["c"].submit(whereami, 100 + i, delay, flag_dir, pure=False)
                     for i in range(n)]


def gather_all(state, name, timeout=60):
    return state["c"].gather(state[name]) if timeout is None else \
        [f.result(timeout) for f in state[name]]


def wait_held(state, keys, hosts, timeout):
    """Wait until every key in ``keys`` is held on exactly ``hosts``."""
    c, deadline = state["c"], time.monotonic() + timeout
    while True:
        who = c.who_has([f for f in state["spread"] if f.key in keys])
        if all(hosts_of(who.get(k, ())) == sorted(hosts) for k in keys):
            return True
        if time.monotonic() > deadline:
            raise AssertionError(f"{who} not all on {hosts} after {timeout}s")
        time.sleep(0.05)


def tcp_reaches(state, address):
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5):
        return True


# --------------------------------------------------------------------------- the cluster


def start_cluster(net, n_workers=2, center_args=(), worker_args=(), env=ENV):
    hc = net.host("c")
    workers = [net.host(f"w{i + 1}") for i in range(n_workers)]
    center = net.spawn(hc, "center", "--port", "0", *center_args, env=env)
    procs = [net.spawn(h, "worker", center.address, *worker_args, env=env) for h in workers]
    return hc, workers, center, procs


def wait_for_files(directory, n, timeout=30):
    deadline = time.monotonic() + timeout
    while len(os.listdir(directory)) < n:
        assert time.monotonic() < deadline, f"only {os.listdir(directory)} after {timeout}s"
        time.sleep(0.02)
    return os.listdir(directory)


# --------------------------------------------------------------------------- tests


@pytest.mark.timeout(60)
@pytest.mark.parametrize("security", ["auth key", "auth key and TLS"])
def test_computation_across_hosts(net, security, tls_files):
    """Ready lines name addresses other hosts can reach; a client elsewhere computes."""
    tls = client_tls = []
    if security != "auth key":
        tls = ["--tls-cert", tls_files["node.pem"], "--tls-key", tls_files["node.key"],
               "--tls-ca", tls_files["ca.pem"]]
        client_tls = dict(tls_ca=tls_files["ca.pem"], tls_cert=tls_files["node.pem"],
                          tls_key=tls_files["node.key"])
    hc = net.host("c")
    hw = [net.host("w1"), net.host("w2")]
    # A wildcard bind advertises the host's routable address; an explicit one, itself.
    bind = ["--host", hc.ip] if tls else []
    center = net.spawn(hc, "center", "--port", "8787", *bind, *tls, env=ENV)
    assert center.lines == [f"Start center at {hc.ip}:8787"]
    workers = [net.spawn(h, "worker", center.address, "--nthreads", "2", *tls, env=ENV)
               for h in hw]
    for w, h in zip(workers, hw):
        assert w.lines[0].startswith(f"Start worker at:            {h.ip}:"), w.lines
        assert w.lines[1] == f"Registered with center at:  {hc.ip}:8787"

    agent = net.agent(net.host("cl"), env=ENV)
    addresses = agent.call(connect, center.address, expect=2, **dict(client_tls or {}))
    assert hosts_of(addresses) == sorted(h.ip for h in hw)

    def compute(state):
        c = state["c"]
        futures = c.map(inc, range(200))
        total = c.submit(sum, futures)
        with_hosts = c.gather(c.map(whereami, range(12), delay=0.1, pure=False))
        return total.result(30), sorted({h for _, h in with_hosts})

    total, ran_on = agent.call(compute)
    assert total == sum(range(1, 201))
    assert ran_on == sorted(h.ip for h in hw)


@pytest.mark.timeout(60)
def test_advertised_addresses(net):
    """A wildcard bind advertises the host's routable address, even to a worker that dials
    its center over loopback; --contact-address overrides (HOST keeps the bound port)."""
    hc = net.host("c")
    center = net.spawn(hc, "center", "--port", "0", env=ENV)
    port = center.address.rpartition(":")[2]
    assert center.address == f"{hc.ip}:{port}"
    local = net.spawn(hc, "worker", f"127.0.0.1:{port}", env=ENV)
    assert local.address.startswith(hc.ip + ":"), local.lines
    nat = net.spawn(hc, "center", "--port", "0", "--contact-address", "203.0.113.7", env=ENV)
    assert nat.address.startswith("203.0.113.7:") and nat.address != "203.0.113.7:8787"
    named = net.spawn(hc, "center", "--port", "0", "--contact-address", "gw.example:9999",
                      env=ENV)
    assert named.lines == ["Start center at gw.example:9999"]


@pytest.mark.timeout(60)
def test_large_value_moves_worker_to_worker(net):
    hc, (h1, h2), center, _ = start_cluster(net)
    agent = net.agent(net.host("cl"), env=ENV)
    agent.call(connect, center.address, expect=2)

    def transfer(state, src, dst, n):
        c = state["c"]
        x = c.submit(pattern, n, workers=[src])
        y = c.submit(digest, x, workers=[dst])
        return y.result(60), hosts_of(c.who_has([x])[x.key])

    n = 48 << 20
    checksum, holders = agent.call(transfer, h1.ip, h2.ip, n)
    assert checksum == digest(pattern(n))
    assert holders == sorted([h1.ip, h2.ip])  # the copy fetched by w2 is registered


@pytest.mark.timeout(90)
@pytest.mark.parametrize("cut", ["link down", "cut from the center only"])
def test_partitioned_worker_is_replaced_and_rejoins(net, tmp_path, cut):
    """A worker that goes silent is removed within the heartbeat timeout, its running task
    reruns, its only copies are recomputed, and it registers again once it can."""
    hc, (h1, h2), center, _ = start_cluster(net, center_args=FAST, worker_args=BEAT)
    agent = net.agent(net.host("cl"), env=ENV)
    agent.call(connect, center.address, expect=2)
    holders = agent.call(spread, 20)
    only_w1 = [k for k, where in holders.items() if hosts_of(where) == [h1.ip]]
    assert only_w1, holders
    flags = tmp_path / "started"
    flags.mkdir()
    agent.call(submit_naps, 2, 3.0, str(flags))
    started = wait_for_files(flags, 2)
    assert sorted(f.split("-")[1] for f in started) == sorted([h1.ip, h2.ip])

    if cut == "link down":
        net.link_down(h1)
    else:
        net.block(hc, h1)
        w1_address = next(a for a in agent.call(lambda s: list(s["c"].nthreads()))
                          if a.startswith(h1.ip + ":"))
    took = agent.call(wait_workers, [h2.ip], 15)
    assert took < 2 + 4, f"w1 removed only after {took:.1f}s"  # heartbeat timeout + slack
    if cut != "link down":
        assert agent.call(tcp_reaches, w1_address)  # peers and clients still reach it

    # The nap that ran on w1 runs again on w2; w1's only copies are recomputed on w2.
    naps = agent.call(gather_all, "naps")
    assert naps == [(100, h2.ip), (101, h2.ip)]
    assert agent.call(wait_held, only_w1, [h2.ip], 30)
    assert [x for x, _ in agent.call(gather_all, "spread")] == list(range(20))

    if cut == "link down":
        net.link_up(h1)
    else:
        net.unblock(hc, h1)
    agent.call(wait_workers, [h1.ip, h2.ip], 30)

    def run_on(state, host):
        return state["c"].submit(whereami, 7, workers=[host], pure=False).result(30)
    assert agent.call(run_on, h1.ip) == (7, h1.ip)


@pytest.mark.timeout(90)
def test_center_host_partitioned_and_healed(net, tmp_path):
    """Cut the center off longer than the heartbeat timeout: after healing, workers register
    again, the client's pending work completes (or fails clearly), nothing hangs."""
    hc, (h1, h2), center, _ = start_cluster(net, center_args=FAST, worker_args=BEAT)
    agent = net.agent(net.host("cl"), env=ENV)
    agent.call(connect, center.address, expect=2)
    flags = tmp_path / "started"
    flags.mkdir()
    agent.call(submit_naps, 6, 1.0, str(flags))
    wait_for_files(flags, 2)

    net.link_down(hc)
    deadline = time.monotonic() + 20
    while center.log().count("no heartbeat") < 2:  # the center has given up on both
        assert time.monotonic() < deadline, center.log()
        time.sleep(0.05)
    net.link_up(hc)

    def outcome(state):
        try:
            return "done", [x for x, _ in gather_all(state, "naps", 60)]
        except ConnectionError as e:
            return "failed", repr(e)

    status, detail = agent.call(outcome, timeout=75)
    if status == "done":
        assert detail == list(range(100, 106))
    # Either way the cluster is whole again, and a new client computes.
    fresh = net.agent(net.host("cl2"), env=ENV)
    assert hosts_of(fresh.call(connect, center.address, expect=2)) == sorted([h1.ip, h2.ip])
    assert fresh.call(lambda s: s["c"].submit(inc, 41).result(30)) == 42


@pytest.mark.timeout(60)
def test_large_gather_over_a_limited_link(net):
    hc, (h1, h2), center, _ = start_cluster(net)
    hcl = net.host("cl")
    net.limit(hcl, "24mbit")
    agent = net.agent(hcl, env=ENV)
    agent.call(connect, center.address, expect=2)

    def fetch(state, hosts, n):
        c = state["c"]
        futures = [c.submit(pattern, n, seed, workers=[h]) for seed, h in enumerate(hosts)]
        return [digest(v) for v in c.gather(futures)]

    n = 3 << 20
    before = net.sent_bytes(hcl)
    assert agent.call(fetch, [h1.ip, h2.ip], n) == [digest(pattern(n, s)) for s in (0, 1)]
    assert net.sent_bytes(hcl) - before >= 2 * n  # it all came through the limited link


@pytest.mark.timeout(60)
def test_client_on_a_slow_link_does_not_slow_others(net):
    """While one client drains values over a thin link, another computes and gathers at
    full speed from the same center and workers."""
    hc, (h1, h2), center, _ = start_cluster(net)
    slow_host, fast_host = net.host("cls"), net.host("clf")
    net.limit(slow_host, "8mbit")
    slow, fast = net.agent(slow_host, env=ENV), net.agent(fast_host, env=ENV)
    for agent in (slow, fast):
        agent.call(connect, center.address, expect=2)

    def make(state, hosts, n, seed):
        c = state["c"]
        state["big"] = [c.submit(pattern, n, seed + i, workers=[h]) for i, h in enumerate(hosts)]
        c.gather([c.submit(len, f) for f in state["big"]])

    def drain(state):
        return [digest(v) for v in state["c"].gather(state["big"])]

    def busy(state):
        c = state["c"]
        total = c.submit(sum, c.map(inc, range(300))).result(30)
        return total, drain(state)

    n = 3 << 20  # 6 MB at 8 mbit: about 6 s for the slow client
    slow.call(make, [h1.ip, h2.ip], n, 0)
    fast.call(make, [h2.ip, h1.ip], n, 10)
    before = net.sent_bytes(slow_host)
    slow.submit(drain)
    deadline = time.monotonic() + 20
    while net.sent_bytes(slow_host) - before < (1 << 20):  # the slow drain is under way
        assert time.monotonic() < deadline and not slow.done()
        time.sleep(0.02)
    total, digests = fast.call(busy, timeout=30)
    assert not slow.done(), "the fast client finished only after the slow one"
    assert total == sum(range(1, 301))
    assert digests == [digest(pattern(n, s)) for s in (10, 11)]
    assert slow.result(60) == [digest(pattern(n, s)) for s in (0, 1)]
