"""Notebook displays (``_repr_html_``) of sessions, clusters and futures; ``repr`` stays one line."""

from __future__ import annotations

from html.parser import HTMLParser

from minidist import Client, Executor, LocalCluster


def cells(markup: str) -> dict[str, str]:
    """The (th, td) rows of a ``_repr_html_`` table, parsed as a browser would."""
    rows: dict[str, str] = {}

    class Parser(HTMLParser):
        tag = ""
        name = ""

        def handle_starttag(self, tag, attrs):
            self.tag = tag

        def handle_data(self, data):
            if self.tag == "th":
                self.name = data
            elif self.tag in ("td", "a") and self.name:
                rows[self.name] = rows.get(self.name, "") + data

    Parser().feed(markup)
    return rows


def test_session_and_future_displays(cluster):
    for kind in (Executor, Client):
        s = kind(cluster)
        try:
            shown = cells(s._repr_html_())
            assert shown["center"] == cluster.address
            assert shown["workers"] == str(len(cluster.workers))
            assert shown["threads"] == str(sum(s.nthreads().values()))
            assert "\n" not in repr(s)
            f = s.submit(bytes, 10, pure=False)
            f.result(timeout=20)
            shown = cells(f._repr_html_())
            assert shown["key"] == f.key and shown["status"] == "finished"
            assert shown["type"] == "bytes"
            bad = s.submit(divmod, 1, 0, pure=False)
            bad.exception(timeout=20)
            assert "ZeroDivisionError" in cells(bad._repr_html_())["exception"]
        finally:
            s.shutdown()
        assert cells(s._repr_html_())["state"] == "closed"


def test_keys_are_escaped(cluster):
    with Executor(cluster) as e:
        f = e.submit(int, 1, key="<script>alert(1)</script>")
        f.result(timeout=20)
        markup = f._repr_html_()
        assert "<script>" not in markup and "&lt;script&gt;" in markup


def test_local_cluster_display_links_its_dashboard():
    with LocalCluster(n_workers=1, dashboard_port=0) as c:
        shown = cells(c._repr_html_())
        assert shown["center"] == c.address and shown["workers"] == "1"
        assert shown["dashboard"] == c.dashboard_link
        assert "href='http" in c._repr_html_()
