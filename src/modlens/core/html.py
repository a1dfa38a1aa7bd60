"""Escaped HTML pieces: tables of cells, figures as data URIs, key-value tables, and their CSS.

The standard library only, so that every layer can use them: the HTML report
(:mod:`modlens.report.html` wraps them into a page), the notebook displays of results and
studies (``_repr_html_``), and :class:`~modlens.core.partition.Partition`'s own display. Every
piece of text is escaped; nothing links to anything outside the document.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

#: The style of every piece, for a page (``body`` rules added by the page) or, scoped under
#: ``.modlens``, for a notebook cell (:func:`fragment`).
RULES = """
h1{font-size:1.6em;border-bottom:2px solid #4c72b0;padding-bottom:.2em}
h2{font-size:1.3em;margin-top:2em;border-bottom:1px solid #ccc}
h3{font-size:1.1em}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#eef2f8}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.agree{background:#e3f4e1}
td.disagree{background:#fbe3e3}
td.flag{background:#fff8e1}
p.caption,figcaption{font-size:.85em;color:#444;max-width:60em}
figure{margin:1em 0 2em}
figure img{max-width:100%;height:auto;border:1px solid #eee}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.8em}
.note{background:#fff8e1;border-left:4px solid #f0b400;padding:.4em .8em}
.cite{font-size:.85em;color:#333}
"""

_IMAGE_TYPES = {".png": "image/png", ".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def data_uri(source: Path | bytes, kind: str = "image/png") -> str:
    """A file (its type from its suffix) or PNG bytes as a ``data:`` URI."""
    if isinstance(source, (bytes, bytearray)):
        payload = bytes(source)
    else:
        kind, payload = _IMAGE_TYPES[Path(source).suffix.lower()], Path(source).read_bytes()
    return f"data:{kind};base64," + base64.b64encode(payload).decode("ascii")


@dataclass
class Cell:
    text: str
    bold: bool = False
    html: str | None = None  # richer markup (superscripts); escaped text otherwise
    flag: bool = False  # shaded as a warning (a degenerate metric)


@dataclass
class Table:
    name: str  # "table4"
    title: str
    caption: str
    columns: list[str]
    rows: list[list[Cell]] = field(default_factory=list)

    def to_markdown(self) -> str:
        def md(c: Cell) -> str:
            t = c.text.replace("|", "\\|")
            return f"**{t}**" if c.bold and t else t
        lines = [f"### {self.title}", "", self.caption, "",
                 "| " + " | ".join(self.columns) + " |", "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(md(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.columns)
        for row in self.rows:
            w.writerow([c.text for c in row])
        return buf.getvalue()


def table_html(table: Table, *, agreement_column: str | None = None, heading: bool = True) -> str:
    """A :class:`Table` as HTML; numeric-looking cells right-aligned; with ``agreement_column``
    the row's cells of that column are coloured by their mark."""
    out = ([f'<h3 id="{esc(table.name)}">{esc(table.title)}</h3>'] if heading and table.title else [])
    if table.caption:
        out.append(f'<p class="caption">{esc(table.caption)}</p>')
    out += ["<table>", "<thead><tr>" + "".join(f"<th>{esc(c)}</th>" for c in table.columns) + "</tr></thead>", "<tbody>"]
    for row in table.rows:
        cells = []
        for col, c in zip(table.columns, row):
            body = c.html if c.html is not None else esc(c.text)
            if c.bold and c.text:
                body = f"<strong>{body}</strong>"
            classes = []
            if c.text[:1].isdigit() or c.text.startswith(("< ", "n/a")) or (c.text[:1] == "-" and c.text[1:2].isdigit()):
                classes.append("num")
            if agreement_column is not None and col in ("Same significance", "Same side of 1", agreement_column):
                classes.append("agree" if c.text in ("yes", "✓") else "disagree")
            if c.flag:
                classes.append("flag")
            cls = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{cls}>{body}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def figure_html(image: Path | bytes, caption: str, alt: str) -> str:
    """An image file or PNG bytes, embedded, with its caption."""
    return f'<figure><img src="{data_uri(image)}" alt="{esc(alt)}"><figcaption>{esc(caption)}</figcaption></figure>'


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


def notes_html(notes) -> str:
    return "".join(f'<p class="note">{esc(n)}</p>' for n in notes)


def fragment(title: str, inner: str) -> str:
    """A self-contained block for a notebook cell: the style scoped under ``.modlens``, a heading,
    and ``inner``."""
    scoped = []
    for rule in RULES.strip().splitlines():
        selectors, _, body = rule.partition("{")
        scoped.append(",".join(f".modlens {s.strip()}" for s in selectors.split(",")) + "{" + body)
    scoped = "\n".join(scoped)
    return (f'<div class="modlens"><style>{scoped}</style><h3>{esc(title)}</h3>\n{inner}\n</div>')


__all__ = ["RULES", "esc", "data_uri", "Cell", "Table", "table_html", "figure_html", "json_html", "kv_html",
           "timings_html", "notes_html", "fragment"]
