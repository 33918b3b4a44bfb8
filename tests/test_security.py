"""Auth keys, HMAC both ways, pickle bombs, default binding, and TLS with real certificates."""

from __future__ import annotations

import os
import pickle
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from minidist import AuthenticationError, Client, Executor, LocalCluster, Pool, get, wire

from conftest import wait_for
from slow_talkers import SlowTalkers

KEY = "security-test-key-" + secrets.token_hex(8)


def inc(x):
    return x + 1


def add(x, y):
    return x + y


@pytest.fixture(autouse=True)
def no_key_in_env(monkeypatch):
    monkeypatch.delenv("MINIDIST_AUTH_KEY", raising=False)


@pytest.fixture(scope="module")
def keyed_cluster():
    with LocalCluster(n_workers=2, auth_key=KEY) as cluster:
        yield cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening_ip(pid: int, port: int) -> str:
    """The address a process's listening TCP socket on ``port`` is bound to (from /proc)."""
    with open(f"/proc/{pid}/net/tcp") as f:
        for line in f.readlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            ip_hex, port_hex = local.split(":")
            if int(port_hex, 16) == port and state == "0A":
                return socket.inet_ntoa(struct.pack("<I", int(ip_hex, 16)))
    raise AssertionError(f"nothing listens on port {port}")


# --------------------------------------------------------------------------- auth keys


@pytest.mark.timeout(60)
def test_auth_key_from_file_and_environment(spawn, tmp_path, monkeypatch):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    center = spawn("center", "--port", "0", "--host", "127.0.0.1", "--auth-key-file",
                   str(key_file))
    address = f"127.0.0.1:{center.address.rpartition(':')[2]}"
    spawn("worker", address, "--host", "127.0.0.1", env={"MINIDIST_AUTH_KEY": KEY})
    spawn("worker", address, "--host", "127.0.0.1", "--auth-key-file", str(key_file))
    with Executor(address, auth_key=KEY) as e:
        assert len(e.nthreads()) == 2
        assert list(e.map(inc, range(10))) == list(range(1, 11))
    monkeypatch.setenv("MINIDIST_AUTH_KEY", KEY)  # clients read it too
    c = Client(address)
    try:
        assert c.submit(add, 1, c.submit(inc, 1)).result(timeout=20) == 3
    finally:
        c.close()
    monkeypatch.delenv("MINIDIST_AUTH_KEY")
    t0 = time.monotonic()
    with pytest.raises(AuthenticationError, match="requires an auth key"):
        Executor(address)
    with pytest.raises(AuthenticationError, match="rejected the auth key"):
        Client(address, auth_key="not-the-key")
    assert time.monotonic() - t0 < 5
    wait_for(lambda: "wrong auth key" in center.log() and "client has no auth key"
             in center.log(), 5, message="the center to log both rejections")

    env = {**os.environ, "MINIDIST_AUTH_KEY": "not-the-key"}
    t0 = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "minidist.worker", address, "--host",
                          "127.0.0.1"], env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode != 0
    assert "rejected the auth key" in run.stderr, run.stderr
    assert time.monotonic() - t0 < 15
    wrong_file = tmp_path / "wrong"
    wrong_file.write_text("also-wrong")
    run = subprocess.run([sys.executable, "-m", "minidist.worker", address, "--host",
                          "127.0.0.1", "--auth-key-file", str(wrong_file)],
                         capture_output=True, text=True, timeout=30)
    assert run.returncode != 0 and "rejected the auth key" in run.stderr
    with Executor(address, auth_key=KEY) as e:  # still serving, still two workers
        assert len(e.nthreads()) == 2
        assert e.submit(inc, 1).result(timeout=20) == 2


def test_keyed_client_refuses_keyless_server(spawn):
    center = spawn("center", "--port", "0")
    with pytest.raises(AuthenticationError, match="has no auth key"):
        Executor(center.address, auth_key=KEY)
    with Executor(center.address) as e:
        assert e.nthreads() == {}


@pytest.mark.timeout(60)
def test_executor_client_and_local_cluster_take_auth_key(keyed_cluster):
    assert keyed_cluster.auth_key == KEY.encode()
    address = keyed_cluster.address
    for cls in (Executor, Client):
        session = cls(address, auth_key=KEY)
        try:
            assert session.submit(inc, 1).result(timeout=20) == 2
        finally:
            session.shutdown()
        with pytest.raises(AuthenticationError):
            cls(address, auth_key=KEY + "x")
    with pytest.raises(AuthenticationError, match="requires an auth key"):
        wire.connect(address, security=wire.Security(None))
    with Executor(keyed_cluster) as e:  # the cluster object carries its key
        assert e.submit(inc, 2).result(timeout=20) == 3


@pytest.mark.timeout(60)
def test_local_cluster_makes_a_random_key_by_default():
    with LocalCluster(n_workers=1) as a, LocalCluster(n_workers=1) as b:
        assert a.auth_key and b.auth_key and a.auth_key != b.auth_key
        assert len(a.auth_key) >= 32
        for cluster in (a, b):
            with Executor(cluster.address) as e:  # found: this process started it
                assert e.submit(inc, 1).result(timeout=20) == 2
            with pytest.raises(AuthenticationError):
                wire.connect(cluster.address, security=wire.Security(None))
        with pytest.raises(AuthenticationError):
            Executor(a.address, auth_key=b.auth_key)
        # Another process, which does not know the key, is refused.
        code = ("import sys\nfrom minidist import Executor\ntry:\n    Executor(sys.argv[1])\n"
                "except Exception as e:\n    print(type(e).__name__, e)\n    sys.exit(7)\n")
        run = subprocess.run([sys.executable, "-c", code, a.address], capture_output=True,
                             text=True, timeout=30,
                             env={k: v for k, v in os.environ.items()
                                  if k != "MINIDIST_AUTH_KEY"})
        assert run.returncode == 7 and "AuthenticationError" in run.stdout, run.stdout


def test_local_cluster_without_key():
    with LocalCluster(n_workers=1, auth_key=False) as cluster:
        assert cluster.auth_key is None
        assert listening_ip(cluster.center.pid, int(cluster.address.rpartition(":")[2])) \
            == "127.0.0.1"
        with Executor(cluster.address) as e:
            assert e.submit(inc, 1).result(timeout=20) == 2


def forget_cluster_key(monkeypatch, cluster):
    """Make this process forget the key of a cluster it started (as another process would)."""
    from minidist.executor import local_cluster_security
    monkeypatch.delitem(local_cluster_security, cluster.address)


def test_pool_takes_auth_key(keyed_cluster, monkeypatch):
    with Pool(keyed_cluster.address, auth_key=KEY) as pool:
        assert pool.apply(inc, (1,)).get() == 2
        assert pool.gather(pool.map(inc, range(5))) == [1, 2, 3, 4, 5]
    with pytest.raises(AuthenticationError, match="rejected the auth key"):
        Pool(keyed_cluster.address, auth_key="wrong")
    forget_cluster_key(monkeypatch, keyed_cluster)
    with pytest.raises(AuthenticationError, match="requires an auth key"):
        Pool(keyed_cluster.address)


def test_dask_get_takes_auth_key(keyed_cluster, monkeypatch):
    host, port = wire.parse_address(keyed_cluster.address)
    dsk = {"x": 1, "y": (inc, "x")}
    assert get(host, port, dsk, "y", auth_key=KEY) == 2
    with pytest.raises(AuthenticationError, match="rejected the auth key"):
        get(host, port, dsk, "y", auth_key="wrong")
    forget_cluster_key(monkeypatch, keyed_cluster)
    with pytest.raises(AuthenticationError, match="requires an auth key"):
        get(host, port, dsk, "y")


# --------------------------------------------------------------------------- HMAC both ways


class Bomb:
    """Unpickling this runs ``touch path``: proof that someone unpickled it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


def frame(payload: bytes) -> bytes:
    return struct.pack("!I", 1) + struct.pack("!Q", len(payload)) + payload


def bomb_frames(path: str) -> list[bytes]:
    """The same bomb in every form a peer could send it."""
    bombs = [pickle.dumps(Bomb(path), protocol=p) for p in (0, 2, 5)]
    bombs.append(pickle.dumps([{"op": "register_client", "client_id": Bomb(path)}]))
    return bombs


class FakeServer:
    """A 'center' that answers the handshake without knowing the key, then sends a bomb."""

    def __init__(self, mode: str, bomb: bytes) -> None:
        self.mode = mode
        self.bomb = bomb
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError:
            return
        with sock:
            sock.settimeout(10)
            try:
                sock.recv(10)  # the hello
                if self.mode == "claims-no-key":
                    sock.sendall(b"\x00")  # "_OK": pretend no proof is needed
                else:  # asks for the client's proof, then answers with a made-up one
                    sock.sendall(b"\x01" + secrets.token_bytes(32))
                    sock.recv(64)
                    sock.sendall(b"\x00" + secrets.token_bytes(32))
                sock.sendall(frame(self.bomb) * 3)
                sock.recv(1 << 16)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("mode", ["claims-no-key", "fake-proof"])
def test_client_checks_the_servers_proof(tmp_path, mode):
    path = tmp_path / "client-pwned"
    for bomb in bomb_frames(str(path)):
        server = FakeServer(mode, bomb)
        try:
            t0 = time.monotonic()
            with pytest.raises(AuthenticationError, match="prove"):
                Executor(server.address, auth_key=KEY, timeout=5)
            assert time.monotonic() - t0 < 5
        finally:
            server.close()
    time.sleep(0.2)  # ok: an effect that must NOT happen can only be checked after a margin
    assert not path.exists(), "the client unpickled data from an unauthenticated server"


@pytest.mark.timeout(60)
def test_pickle_bombs_from_unauthenticated_peers_never_run(keyed_cluster, tmp_path):
    path = tmp_path / "server-pwned"
    hello_no_key = struct.pack("!8sBB", wire.MAGIC, wire.VERSION, 0)
    hello_key = struct.pack("!8sBB", wire.MAGIC, wire.VERSION, 1)
    targets = [keyed_cluster.address] + [w.address for w in keyed_cluster.workers]
    sent = 0
    for address in targets:
        for bomb in bomb_frames(str(path)):
            attempts = [
                bomb,                                  # as the first bytes
                frame(bomb),                           # as a frame
                wire.MAGIC + bomb,                     # after a correct magic
                hello_no_key + bomb,                   # after a whole hello
                hello_no_key + frame(bomb),            # as a frame after a hello
                hello_key + bomb[:64].ljust(64, b".") + frame(bomb),  # as the proof
                hello_key + bytes(64) + frame(bomb),   # as a frame after a wrong proof
                hello_key + frame(bomb) * 4,           # frames where the proof goes
            ]
            for payload in attempts:
                host, port = wire.parse_address(address)
                with socket.create_connection((host, port), timeout=10) as sock:
                    try:
                        sock.sendall(payload)
                        sock.shutdown(socket.SHUT_WR)
                        while sock.recv(4096):  # until the server hangs up
                            pass
                    except OSError:
                        pass
                sent += 1
    assert sent == len(targets) * 4 * 8
    time.sleep(0.5)  # ok: connections are closed already; a margin before checking for absence
    assert not path.exists(), "an unauthenticated peer got a pickle unpickled"
    with Executor(keyed_cluster) as e:
        assert e.submit(inc, 1).result(timeout=20) == 2
        assert len(e.nthreads()) == 2

    # Control: the very same bytes from an authenticated peer do run (pickle is
    # code execution), which is why every door above must stay shut.
    control = tmp_path / "control"
    sock = socket.create_connection(wire.parse_address(targets[1]), timeout=10)
    with sock:
        wire.answer_challenge(sock, KEY.encode(), targets[1])
        sock.sendall(frame(pickle.dumps(Bomb(str(control)))))
        wait_for(control.exists, 10, message="control bomb")


# --------------------------------------------------------------------------- binding


@pytest.mark.timeout(60)
def test_without_key_bind_loopback_and_say_so(spawn):
    center = spawn("center", "--port", "0")
    worker = spawn("worker", center.address)
    center_port = int(center.address.rpartition(":")[2])
    worker_port = int(worker.address.rpartition(":")[2])
    assert center.address.startswith("127.0.0.1:") and worker.address.startswith("127.0.0.1:")
    assert listening_ip(center.pid, center_port) == "127.0.0.1"
    assert listening_ip(worker.pid, worker_port) == "127.0.0.1"
    assert "no auth key: listening on 127.0.0.1 only" in center.log()
    assert "no auth key: listening on 127.0.0.1 only" in worker.log()
    assert "WITHOUT an auth key" not in center.log() + worker.log()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("role", ["center", "worker"])
def test_binding_all_interfaces_without_key_warns_loudly(tmp_path, role):
    # Bound to 0.0.0.0 only until the warning is read; no traffic goes anywhere
    # but 127.0.0.1 (the worker dials a closed loopback port).
    args = ["--port", "0"] if role == "center" else [f"127.0.0.1:{free_port()}"]
    log = tmp_path / "log"
    env = {k: v for k, v in os.environ.items() if k != "MINIDIST_AUTH_KEY"}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", f"minidist.{role}", *args,
                                 "--host", "0.0.0.0"], stdout=subprocess.DEVNULL, stderr=f,
                                env=env)
    try:
        wait_for(lambda: "WITHOUT an auth key" in log.read_text(), 20, message="warning")
    finally:
        proc.kill()
        proc.wait()
    text = log.read_text()
    assert "!" * 40 in text and "0.0.0.0" in text and "arbitrary code" in text


# --------------------------------------------------------------------------- TLS


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """A CA, and a certificate for 127.0.0.1 signed by it; plus an unrelated CA."""
    d = tmp_path_factory.mktemp("tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=minidist test CA", cwd=d)
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=127.0.0.1",
            cwd=d)
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2", "-extfile", "san.ext", cwd=d)
    openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.pem", "-days", "2",
            "-subj", "/CN=some other CA", cwd=d)
    return {name: str(d / name) for name in ("ca.pem", "node.pem", "node.key", "other.pem",
                                              "other.key")}


@pytest.mark.timeout(90)
def test_tls_cluster(spawn, certs):
    tls = ["--tls-cert", certs["node.pem"], "--tls-key", certs["node.key"],
           "--tls-ca", certs["ca.pem"]]
    client_tls = dict(tls_ca=certs["ca.pem"], tls_cert=certs["node.pem"],
                      tls_key=certs["node.key"])
    center = spawn("center", "--port", "0", *tls)
    address = center.address
    workers = [spawn("worker", address, *tls) for _ in range(2)]
    with Client(address, **client_tls) as c:
        assert len(c.nthreads()) == 2
        xs = c.scatter(list(range(20)))
        ys = c.map(inc, xs)
        big = c.submit(bytes, 5 << 20, workers=[workers[0].address])
        size = c.submit(len, big, workers=[workers[1].address])  # peer to peer over TLS
        assert c.gather(ys) == list(range(1, 21))
        assert size.result(timeout=30) == 5 << 20
        assert len(big.result(timeout=30)) == 5 << 20  # straight from a worker, over TLS

    # A plain-TCP client is refused clearly and fast (well under its 10 s timeout).
    for target in (address, workers[0].address):
        t0 = time.monotonic()
        with pytest.raises(ConnectionError, match="TLS") as info:
            Executor(target, timeout=10) if target == address else \
                wire.connect(target, timeout=10)
        assert time.monotonic() - t0 < 3, info.value
    # TLS clients that cannot prove who they are, or do not trust the server, fail too.
    with pytest.raises(ConnectionError):
        Executor(address, tls_ca=certs["ca.pem"], timeout=5)  # no client certificate
    with pytest.raises(ConnectionError, match="TLS"):
        Executor(address, tls_ca=certs["other.pem"], tls_cert=certs["node.pem"],
                 tls_key=certs["node.key"], timeout=5)
    assert center.popen.poll() is None and all(w.popen.poll() is None for w in workers)
    with Executor(address, **client_tls) as e:
        assert e.submit(inc, 1).result(timeout=20) == 2


def test_tls_client_against_plain_center_fails_clearly(spawn, certs):
    center = spawn("center", "--port", "0")
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="TLS"):
        Executor(center.address, tls_ca=certs["ca.pem"], tls_cert=certs["node.pem"],
                 tls_key=certs["node.key"], timeout=10)
    assert time.monotonic() - t0 < 3


# --------------------------------------------------------------------------- slow talkers


def closed_at_once(address: str, timeout: float = 2.0) -> bool:
    """Dial ``address``, say nothing: does the server close the connection within ``timeout``?"""
    with socket.create_connection(wire.parse_address(address), timeout=timeout) as sock:
        try:
            return sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


@pytest.mark.timeout(90)
@pytest.mark.parametrize("target, tls", [("center", False), ("center", True), ("worker", False)])
def test_slow_handshakes_are_cut_at_the_deadline_and_shed_over_the_cap(spawn, certs, target,
                                                                         tls):
    cap = 6
    env = {"MINIDIST_AUTH_KEY": KEY, "MINIDIST_MAX_HANDSHAKES": str(cap)}
    tls_args = ["--tls-cert", certs["node.pem"], "--tls-key", certs["node.key"]] if tls else []
    client_tls = dict(tls_ca=certs["ca.pem"]) if tls else {}
    center = spawn("center", "--port", "0", "--host", "127.0.0.1", *tls_args, env=env)
    address = f"127.0.0.1:{center.address.rpartition(':')[2]}"
    worker = spawn("worker", address, "--host", "127.0.0.1", *tls_args, env=env)
    proc, attacked = (center, address) if target == "center" else (worker, worker.address)
    hello = struct.pack("!8sBB", wire.MAGIC, wire.VERSION, 1)
    # Over TLS: a record header that announces a 16 KiB handshake record, then its body.
    payload = (b"\x16\x03\x01\x40\x00" + bytes(1 << 14)) if tls else hello + bytes(64)
    security = wire.Security(KEY, **client_tls)
    with Executor(address, auth_key=KEY, **client_tls) as e:
        assert e.submit(inc, 1).result(timeout=20) == 2
        # Past the cap, the connection longest in the handshake makes room: a flood sheds
        # the slow talkers long before their deadline, and a peer with the key gets in.
        early = SlowTalkers(attacked, cap, payload, pace=0.5)
        try:
            flood = SlowTalkers(attacked, 3 * cap, payload, pace=0.5)
            try:
                wait_for(lambda: len(early.closed_at) == cap, 3,
                         message="the oldest slow connections shed")
                for _ in range(3):
                    wire.connect(attacked, timeout=5, security=security).close()
                if target == "center":  # a client already connected is served throughout
                    assert list(e.map(inc, range(20))) == list(range(1, 21))
                # Never more than the cap in the handshake: of the flood, at most cap live.
                wait_for(lambda: len(flood.closed_at) >= 2 * cap, 3,
                         message="the flood shed down to the cap")
            finally:
                flood.close()
        finally:
            early.close()
        # However slowly they talk, connections are cut at the deadline.
        slow = SlowTalkers(attacked, cap, payload, pace=0.5)
        try:
            wait_for(lambda: len(slow.closed_at) == cap, wire.HANDSHAKE_TIMEOUT + 5,
                     message="the slow connections to be closed")
            lasted = [slow.closed_at[i] - slow.opened for i in range(cap)]
            assert max(lasted) < wire.HANDSHAKE_TIMEOUT + 1.5, lasted
            assert min(lasted) > wire.HANDSHAKE_TIMEOUT - 1, lasted
            assert min(slow.sent) >= 8, slow.sent  # they kept talking all along
        finally:
            slow.close()
        log = wait_for(lambda: all(f"127.0.0.1:{port}" in proc.log() for port in slow.ports)
                       and proc.log(), 5, message="a log line per slow connection")
        for port in slow.ports:
            assert any(f"127.0.0.1:{port}" in ln and "timed out" in ln
                       for ln in log.splitlines()), port
        shed = [ln for ln in log.splitlines() if "to make room" in ln]
        assert 1 <= len(shed) <= 3, shed  # at most one line a second
        for port in early.ports:  # the shed ones are in those lines, not one line each
            assert not any(f"127.0.0.1:{port}" in ln for ln in log.splitlines()), port
        with Executor(address, auth_key=KEY, **client_tls) as e2:
            assert list(e2.map(inc, range(20))) == list(range(1, 21))


# --------------------------------------------------------------------------- dssh


def test_dssh_passes_a_host_named_like_an_option_as_a_host(tmp_path):
    """The ssh command dssh runs has ``--`` before the host, so ``-oProxyCommand=...`` is a name.

    The ``ssh`` first on PATH here writes down its arguments and fails, as
    an unreachable host would; dssh then stops on its own.
    """
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    argv_file = tmp_path / "argv"
    (bin_dir / "ssh").write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" > {argv_file}\nexit 255\n')
    (bin_dir / "ssh").chmod(0o755)
    proof = tmp_path / "proxy-ran"
    host = f"-oProxyCommand=touch {proof}"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "MINIDIST_AUTH_KEY": KEY}
    run = subprocess.run([sys.executable, "-m", "minidist.ssh", "--timeout", "10",
                          "--ssh-option", "ConnectTimeout=5", "--", host],
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1, run.stderr
    argv = argv_file.read_bytes().split(b"\0")[:-1]
    assert b"--" in argv and argv[argv.index(b"--") + 1] == host.encode(), argv
    assert argv.index(host.encode()) == argv.index(b"--") + 1  # not among the options before
    assert not proof.exists()
