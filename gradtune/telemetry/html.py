"""The HTML pieces of gradtune's self-contained pages (report.html, compare.html): escaping,
cell formatting, tables, inline PNG charts and the page with its inline CSS (no script, so a page
opens offline and looks the same everywhere)."""

from __future__ import annotations

import base64
import html
from typing import Any, Iterable, Sequence


def esc(v: Any) -> str:
    return html.escape(str(v), quote=True)


def fmt(v: Any) -> str:
    """A value for a table cell: numbers to 6 significant digits, long lists shortened."""
    if isinstance(v, bool) or v is None:
        return "null" if v is None else str(v).lower()
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        shown = ", ".join(fmt(x) for x in v[:8])
        return f"[{shown}{f', … ({len(v)} items)' if len(v) > 8 else ''}]"
    text = str(v)
    return text if len(text) <= 300 else text[:300] + "…"


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested settings as dotted keys (``guard.policy``), in file order."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def img(png: bytes, alt: str) -> str:
    return f'<img alt="{esc(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def table(head: Sequence[str], rows: Iterable[Sequence[Any]], raw: bool = False) -> str:
    """A table; ``raw``: the header and cells are HTML already (escaped by the caller)."""
    cell = (lambda v: str(v)) if raw else (lambda v: esc(fmt(v)))
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    heads = "".join(f"<th>{cell(h) if raw else esc(h)}</th>" for h in head)
    return f"<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table>"


def kv_table(d: dict[str, Any]) -> str:
    return table(("key", "value"), flatten(d))


def charts(*images: str) -> str:
    return f'<div class="charts">{"".join(images)}</div>'


_CSS = """
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;background:#f4f5f7;color:#1d2330}
header{background:#1d2330;color:#fff;padding:18px 28px}header h1{margin:0;font-size:22px}
header p{margin:4px 0 0;color:#b8c0d0;font-size:13px;word-break:break-all}
nav{padding:8px 28px;background:#e6e9ef;font-size:13px}nav a{margin-right:14px;color:#2b5cb8}
main{max-width:1320px;margin:0 auto;padding:8px 28px 40px}
section{background:#fff;border-radius:8px;padding:14px 20px;margin:16px 0;box-shadow:0 1px 3px #0002}
h2{font-size:17px;margin:0 0 10px}h3{font-size:15px;margin:10px 0 4px}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(480px,1fr));gap:10px}
.charts img{width:100%;border:1px solid #e3e6ec;border-radius:4px}
.charts.wide{grid-template-columns:1fr}.charts.wide img{max-width:960px}
.stop{font-size:18px;font-weight:600;margin:0 0 10px}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:8px 0}
.card{background:#f0f3f8;border-radius:6px;padding:8px 14px;min-width:110px}
.card b{display:block;font-size:18px}.card span{font-size:12px;color:#5a6478}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border-bottom:1px solid #e3e6ec;padding:4px 10px;text-align:left;vertical-align:top}
th{background:#f0f3f8}.note{color:#5a6478;font-size:13px}summary{cursor:pointer;font-weight:600;margin:6px 0}
.scroll{overflow-x:auto}.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;margin-right:6px;vertical-align:middle}
"""


def page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """The whole page: ``sections`` are (id, heading, body HTML)."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(h)}</a>' for i, h, _ in sections)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{b}</section>' for i, h, b in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
        f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>'
        f"<body><header><h1>{esc(title)}</h1><p>{esc(subtitle)}</p></header><nav>{nav}</nav>"
        f"<main>{body}</main></body></html>\n"
    )
