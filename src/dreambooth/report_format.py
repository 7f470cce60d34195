"""Rendering a report's blocks as a self-contained HTML page and as GitHub Markdown (no torch, no network).

A report is built once as a list of blocks; these two renderers give the same content in both files.
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass
from urllib.parse import quote


@dataclass(frozen=True)
class Img:
    src: str  # relative to DIR, '/'-separated, so the page works from a copied folder
    alt: str
    width: int


Part = str | Img  # a table cell is a list of parts; "\n" in text is a line break
Block = tuple  # ("h1"|"h2"|"p"|"lead"|"pre", text) | ("img", Img) | ("table", header, rows)


CSS = """\
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;background:#fafafa;color:#222}
main{max-width:1200px;margin:0 auto;padding:24px 32px;background:#fff}
h1{font-size:26px;margin:8px 0 12px}\
h2{font-size:19px;margin:32px 0 10px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:5px 8px;vertical-align:top;text-align:left}
th{background:#f2f4f7}tr:nth-child(even) td{background:#fbfbfc}img{display:block;border-radius:3px}
.lead{background:#eef6ee;border-left:4px solid #3a8a3a;padding:8px 12px}
td{white-space:nowrap}td.wrap{white-space:normal;min-width:200px}.cell{display:flex;flex-wrap:wrap;gap:4px}
pre{background:#f4f4f4;padding:10px 12px;overflow:auto;font-size:13px}"""


def img_tag(image: Img) -> str:
    """The same tag in both files (GitHub Markdown keeps inline <img>); a click opens the full-size image."""
    src = html.escape(quote(image.src))
    return f'<a href="{src}"><img src="{src}" alt="{html.escape(image.alt)}" width="{image.width}"></a>'


def html_parts(parts: str | list[Part]) -> str:
    parts = [parts] if isinstance(parts, str) else parts
    out = [html.escape(p).replace("\n", "<br>") if isinstance(p, str) else img_tag(p) for p in parts]
    images = [p for p in parts if isinstance(p, Img)]
    if not images:
        return "".join(out)
    # Thumbnails wrap two to a row (a seed table of many trials stays on screen); larger images four to a row.
    per_row = 2 if images[0].width <= 100 else 4
    return f'<div class="cell" style="max-width:{(images[0].width + 4) * per_row}px">{"".join(out)}</div>'


def wrap(cell: str | list[Part]) -> str:
    """Short cells (names, numbers) never break across lines; long text (prompts, errors) may."""
    return ' class="wrap"' if isinstance(cell, str) and len(cell) > 40 else ""


def render_html(blocks: list[Block]) -> str:
    body = []
    for kind, *args in blocks:
        if kind in ("h1", "h2", "p"):
            body.append(f"<{kind}>{html_parts(args[0])}</{kind}>")
        elif kind == "lead":
            body.append(f'<p class="lead">{html_parts(args[0])}</p>')
        elif kind == "pre":
            body.append(f"<pre><code>{html.escape(args[0])}</code></pre>")
        elif kind == "img":
            body.append(html_parts([args[0]]))
        else:
            header, rows = args
            head = "".join(f"<th>{html_parts(h)}</th>" for h in header)
            cells = "".join("<tr>" + "".join(f"<td{wrap(c)}>{html_parts(c)}</td>" for c in row) + "</tr>\n"
                            for row in rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>\n{cells}</tbody></table>")
    title = html.escape(blocks[0][1])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{title}</title>\n'
            f"<style>{CSS}</style></head>\n<body><main>\n" + "\n".join(body) + "\n</main></body></html>\n")


def md_parts(parts: str | list[Part]) -> str:
    parts = [parts] if isinstance(parts, str) else parts
    out = []
    for part in parts:
        if isinstance(part, str):
            text = html.escape(part, quote=False).replace("\\", "\\\\")  # GitHub renders inline HTML: text stays text
            for char in "`*[]|":
                text = text.replace(char, "\\" + char)
            # An underscore inside a word never starts emphasis on GitHub: escape only the others, so names
            # stay greppable.
            text = re.sub(r"(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])", r"\\_", text)
            out.append(text.replace("\n", "<br>"))
        else:
            out.append(img_tag(part))
    return " ".join(out) if any(isinstance(p, Img) for p in parts) else "".join(out)


def render_md(blocks: list[Block]) -> str:
    out = []
    for kind, *args in blocks:
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + md_parts(args[0]))
        elif kind in ("p", "lead"):
            out.append(md_parts(args[0]) if kind == "p" else f"**{md_parts(args[0])}**")
        elif kind == "img":
            out.append(md_parts([args[0]]))
        elif kind == "pre":
            fence = "```"
            while fence in args[0]:
                fence += "`"
            out.append(f"{fence}\n{args[0]}\n{fence}")
        else:
            header, rows = args
            lines = ["| " + " | ".join(md_parts(h) for h in header) + " |", "|" + "---|" * len(header)]
            lines += ["| " + " | ".join(md_parts(c) for c in row) + " |" for row in rows]
            out.append("\n".join(lines))
    return "\n\n".join(out) + "\n"
