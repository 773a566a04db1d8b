"""HTML building blocks of the self-contained report page: escaping, tables, images,
number and interval formatting, ``key = value`` blocks, and the page itself (its inline
CSS and the script that checks the images). Nothing here reads a file."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["escape", "table", "img", "fmt", "interval", "kv", "page"]


def escape(x: Any) -> str:
    """``str(x)`` escaped for HTML text and attribute values (quotes too)."""
    return html.escape(str(x), quote=True)


def table(
    header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "", raw: bool = False
) -> str:
    """An HTML table; cells are escaped unless ``raw``."""
    cell = (lambda c: str(c)) if raw else escape
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def img(uri: str, alt: str, cls: str = "") -> str:
    """An ``<img>`` of a data URI."""
    return f'<img class="{cls}" src="{uri}" alt="{escape(alt)}">'


def fmt(v: Any, nd: int = 3) -> str:
    """A table cell: "—" for None, a float to ``nd`` decimals, anything else as ``str``."""
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def interval(c: Sequence[float] | None, sign: bool = False) -> str:
    """``[lo, hi]`` to 3 decimals (with signs if ``sign``); "—" without an interval."""
    if not c:
        return "—"
    f = "+.3f" if sign else ".3f"
    return f"[{c[0]:{f}}, {c[1]:{f}}]"


def kv(d: dict[str, Any] | None) -> str:
    """A config section as ``key = value`` lines (nested sections flattened)."""
    if not d:
        return "—"
    out = []

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, w in v.items():
                walk(f"{prefix}{k}.", w)
        else:
            shown = "[" + ", ".join(map(str, v)) + "]" if isinstance(v, list) else v
            out.append(f"{prefix[:-1]} = {shown}")

    walk("", d)
    return "<br>".join(escape(x) for x in out)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;
max-width:1180px;padding:0 18px 40px;color:#222;line-height:1.4;font-size:14px}
h1{font-size:22px;margin:18px 0 4px}h2{font-size:18px;border-bottom:2px solid #ddd;
padding-bottom:3px;margin-top:28px}h3{font-size:15px;margin-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top;text-align:left}
th{background:#f2f2f2}table.kv td:first-child{font-weight:600;white-space:nowrap}
table.tableone td:nth-child(n+3){white-space:nowrap}
.figs{display:flex;flex-wrap:wrap;gap:14px;align-items:flex-start}
.figs figure{margin:0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{font-size:12px;color:#555;max-width:560px}
.note{color:#555;font-size:12px}.warn{color:#a40}
nav a{margin-right:12px}code{background:#f4f4f4;padding:0 3px}
details{margin:6px 0}
div.findings table{font-size:12px}div.findings td{white-space:nowrap}
"""

_SCRIPT = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.every(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.dataset.imagesOk = ok ? "1" : "0";
  document.body.dataset.imagesCount = String(imgs.length);
});
</script>
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: ``title``, a ``subtitle`` line, a navigation bar and the
    ``(anchor, title, HTML body)`` sections in order; CSS and script inline."""
    nav = " ".join(f'<a href="#{a}">{escape(t)}</a>' for a, t, _ in sections)
    body = "\n".join(
        f'<section id="{a}"><h2>{escape(t)}</h2>\n{b}\n</section>' for a, t, b in sections
    )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        f'<h1>{escape(title)}</h1><p class="note">{escape(subtitle)}</p><nav>{nav}</nav>\n'
        f"{body}\n{_SCRIPT}</body></html>\n"
    )
