"""Fixtures for the multi-host tests: ``net`` (a fresh network of namespaces) and TLS files.

See ``nethosts.py`` for how hosts are built and what is removed afterwards.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from nethosts import RUN_PREFIX, Network, leftovers, require_namespaces

_networks = iter("abcdefghijklmnopqrstuvwxyz")


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.multihost)


@pytest.fixture
def net(tmp_path):
    """A fresh network of namespaces for one test; removed afterwards, pass or fail."""
    require_namespaces()
    prefix = RUN_PREFIX + next(_networks)
    network = Network(prefix, tmp_path)
    try:
        yield network
    finally:
        network.close()
        left = leftovers(prefix)
        assert not left, f"left behind: {left}"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory) -> dict[str, str]:
    """A CA and one certificate signed by it, for any 10.200.x.y address."""
    d = tmp_path_factory.mktemp("mh-tls")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=minidist multi-host test CA", cwd=d)
    openssl("req", *ec, "-keyout", "node.key", "-out", "node.csr", "-subj", "/CN=node", cwd=d)
    openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "node.pem", "-days", "2", cwd=d)
    return {name: str(d / name) for name in ("ca.pem", "node.pem", "node.key")}
