"""One self-contained HTML file: inline CSS, images as data URIs, no scripts, no links that
need a network. Every piece of text from tables or specs is escaped."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from modlens.report.tables import Table

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;background:#fff;line-height:1.4}
h1{font-size:1.6em;border-bottom:2px solid #4c72b0;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef2f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.agree{background:#e3f4e1}
td.disagree{background:#fbe3e3}
p.caption,figcaption{font-size:.85em;color:#444;max-width:60em}
figure{margin:1em 0 2em}
figure img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
.cite{font-size:.85em;color:#333}
"""


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(path: Path) -> str:
    kind = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def table_html(table: Table, *, agreement_column: str | None = None) -> str:
    """A :class:`Table` as HTML; numeric-looking cells right-aligned; with
    ``agreement_column`` the row's cells of that column are coloured by their mark."""
    out = [f'<h3 id="{esc(table.name)}">{esc(table.title)}</h3>', f'<p class="caption">{esc(table.caption)}</p>',
           "<table>", "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>", "<tbody>"]
    for row in table.rows:
        cells = []
        for col, c in zip(table.columns, row):
            body = c.html if c.html is not None else esc(c.text)
            if c.bold and c.text:
                body = f"<strong>{body}</strong>"
            classes = []
            if c.text[:1].isdigit() or c.text.startswith(("< ", "n/a")):
                classes.append("num")
            if agreement_column is not None and col in ("Same significance", "Same side of 1", agreement_column):
                classes.append("agree" if c.text in ("yes", "✓") else "disagree")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{body}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def figure_html(png: Path, caption: str, alt: str) -> str:
    return (f'<figure><img src="{data_uri(png)}" alt="{esc(alt)}">'
            f"<figcaption>{esc(caption)}</figcaption></figure>")


def json_html(obj) -> str:
    return "<pre>" + esc(json.dumps(obj, indent=2, sort_keys=True, default=str)) + "</pre>"


def kv_html(mapping: dict, headers: tuple[str, str] = ("", "")) -> str:
    head = f"<thead><tr><th>{esc(headers[0])}</th><th>{esc(headers[1])}</th></tr></thead>" if any(headers) else ""
    body = "".join(f"<tr><td>{esc(k)}</td><td>{esc(_short(v))}</td></tr>" for k, v in mapping.items())
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def timings_html(timings) -> str:
    """Timings as a table when they are a mapping or a list of records, else as JSON."""
    if isinstance(timings, dict) and all(not isinstance(v, (dict, list)) for v in timings.values()):
        return kv_html(timings, ("task", "seconds"))
    if isinstance(timings, list) and timings and all(isinstance(r, dict) for r in timings):
        cols = list(dict.fromkeys(k for r in timings for k in r))
        head = "".join(f"<th>{esc(c)}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{esc(_short(r.get(c, '')))}</td>" for c in cols) + "</tr>" for r in timings)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return json_html(timings)


def page(title: str, sections: list[tuple[str, str]], *, intro: str = "") -> str:
    """The whole document; ``sections`` are (heading, inner HTML) pairs."""
    nav = "".join(f'<li><a href="#s{i}">{esc(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "\n".join(f'<section id="s{i}"><h2>{esc(h)}</h2>\n{inner}\n</section>' for i, (h, inner) in enumerate(sections))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"{intro}\n<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n")


__all__ = ["esc", "data_uri", "table_html", "figure_html", "json_html", "kv_html", "timings_html", "page"]
