"""One self-contained HTML file: inline CSS, images as data URIs, no scripts, no links that
need a network. Every piece of text from tables or specs is escaped. The pieces (tables, figures,
key-value tables) are :mod:`modlens.core.html`'s, the ones the notebook displays use too."""

from __future__ import annotations

from modlens.core.html import (RULES, Cell, Table, data_uri, esc, figure_html, json_html, kv_html, notes_html,
                               table_html, timings_html)

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2em auto;max-width:1200px;
padding:0 1em;color:#222;background:#fff;line-height:1.4}""" + RULES


def page(title: str, sections: list[tuple[str, str]], *, intro: str = "") -> str:
    """The whole document; ``sections`` are (heading, inner HTML) pairs."""
    nav = "".join(f'<li><a href="#s{i}">{esc(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "\n".join(f'<section id="s{i}"><h2>{esc(h)}</h2>\n{inner}\n</section>' for i, (h, inner) in enumerate(sections))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
            f"{intro}\n<nav><ul>{nav}</ul></nav>\n{body}\n</body>\n</html>\n")


__all__ = ["esc", "data_uri", "Cell", "Table", "table_html", "figure_html", "json_html", "kv_html", "timings_html",
           "notes_html", "page"]
