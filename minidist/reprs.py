"""Rich displays for notebooks: a small HTML table for ``_repr_html_``.

Jupyter shows ``obj._repr_html_()`` where it exists; ``repr`` stays one
line.  Every value is escaped, so a key or an address cannot inject markup.
"""

from __future__ import annotations

import html
from typing import Any
from collections.abc import Iterable


def html_table(title: str, rows: Iterable[tuple[str, Any]]) -> str:
    """``<div>`` with a bold title and a two-column table of escaped (name, value) rows."""
    cells = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(name))}</th>"
        f"<td style='text-align:left'>{_cell(value)}</td></tr>" for name, value in rows)
    return (f"<div><strong>{html.escape(title)}</strong>"
            f"<table style='border-collapse:collapse'>{cells}</table></div>")


def _cell(value: Any) -> str:
    text = html.escape(str(value))
    if isinstance(value, str) and value.startswith(("http://", "https://")):
        return f"<a href='{html.escape(value, quote=True)}' target='_blank'>{text}</a>"
    return text


def human_bytes(n: float | None) -> str:
    """``1.5 GiB``, ``12 MiB``, ``800 B``; ``-`` for None."""
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"
