"""A small HTML builder: sections of headings, tables, figures and notes, in one file."""

from __future__ import annotations

import base64
import html
import os
from collections.abc import Sequence
from pathlib import Path

from binsight.utils.io import atomic_write_text

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2rem auto;max-width:1100px;color:#222}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5rem 0}
td,th{border:1px solid #ddd;padding:.25rem .6rem;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.warn{background:#fff4e0;border-left:4px solid #e8a33d;padding:.4rem .8rem;margin:.4rem 0}
.ok{background:#e9f6ec;border-left:4px solid #3d9e5a;padding:.4rem .8rem;margin:.4rem 0}
img{max-width:100%}figure{display:inline-block;margin:.5rem}.thumbs img{width:160px;margin:3px}
"""


def image_data_uri(path: str | os.PathLike[str] | bytes, mime: str = "image/png") -> str:
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


class HtmlReport:
    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def heading(self, text: str) -> None:
        self.parts.append(f"<h2>{html.escape(text)}</h2>")

    def paragraph(self, text: str, kind: str | None = None) -> None:
        css = f' class="{kind}"' if kind else ""
        self.parts.append(f"<p{css}>{html.escape(text)}</p>")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
        )
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>")

    def figure(self, path: str | os.PathLike[str], caption: str) -> None:
        if Path(path).exists():
            self.parts.append(
                f'<figure><img src="{image_data_uri(path)}" alt="{html.escape(caption)}">'
                f"<figcaption>{html.escape(caption)}</figcaption></figure>"
            )

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def write(self, path: str | os.PathLike[str]) -> None:
        document = (
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
            + "\n".join(self.parts)
            + "</body></html>"
        )
        atomic_write_text(path, document)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.0f}"
    return "–" if value is None else str(value)
