"""The report as blocks (headings, paragraphs, tables, figures, missing stages) and its two renderings:
Markdown (report.md) and self-contained HTML (report.html, PNGs inlined), made from the same blocks so
they cannot say different things.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kb.io import write_text
from kb.layout import figure_path, report_paths
from kb.report.figures import save_figure


@dataclass
class Report:
    """The report as a list of blocks, rendered to both Markdown and HTML from the same content."""

    out_dir: Path
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(headers), [[_cell(c) for c in r] for r in rows])))

    def miss(self, text: str) -> None:
        self.missing.append(text)
        self.blocks.append(("missing", text))

    def fig(self, fig: Any, name: str, caption: str) -> None:
        path = figure_path(self.out_dir, name)
        save_figure(fig, path)
        self.figures.append(path)
        self.blocks.append(("fig", (path, caption)))


def _cell(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.2f}"
    return str(v)


def render_md(rep: Report) -> str:
    out = []
    for kind, val in rep.blocks:
        if kind == "h":
            out.append("#" * val[0] + " " + val[1])
        elif kind == "p":
            out.append(val)
        elif kind == "missing":
            out.append(f"> **missing:** {val}")
        elif kind == "table":
            headers, rows = val
            out.append("| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
            out[-1] += "".join("\n| " + " | ".join(r) + " |" for r in rows)
        elif kind == "fig":
            path, caption = val
            out.append(f"![{path.stem}]({path.relative_to(rep.out_dir).as_posix()})\n\n*{caption}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", text)


CSS = """body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}th,td{border:1px solid #bbb;padding:3px 8px;text-align:left}
th{background:#eee}td.num{text-align:right}figure{margin:1.5em 0}img{max-width:100%}
figcaption{font-size:14px;color:#444;max-width:900px}.missing{background:#fff4e5;border-left:4px solid #f0a020;
padding:6px 10px;margin:0.6em 0}code{background:#f3f3f3;padding:0 3px}"""


def _align(cell: str) -> str:
    """Numbers right-aligned (so decimals line up), words left."""
    return " class='num'" if re.fullmatch(r"-?[\d.]+( \(n=\d+\))?|n/a", cell) else ""


def render_html(rep: Report, title: str) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{CSS}</style></head><body>"]
    for kind, val in rep.blocks:
        if kind == "h":
            out.append(f"<h{val[0]}>{_inline(val[1])}</h{val[0]}>")
        elif kind == "p":
            out.append(f"<p>{_inline(val)}</p>")
        elif kind == "missing":
            out.append(f"<div class='missing'><b>missing:</b> {_inline(val)}</div>")
        elif kind == "table":
            headers, rows = val
            out.append("<table><tr>" + "".join(f"<th>{_inline(h)}</th>" for h in headers) + "</tr>")
            out.extend("<tr>" + "".join(f"<td{_align(c)}>{_inline(c)}</td>" for c in r) + "</tr>" for r in rows)
            out.append("</table>")
        elif kind == "fig":
            path, caption = val
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(caption, quote=True)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{_inline(caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def write_report(rep: Report, title: str = "kb knowledge-boundary report") -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html next to each other in the results dir."""
    md_path, html_path = report_paths(rep.out_dir)
    md = write_text(md_path, render_md(rep))
    ht = write_text(html_path, render_html(rep, title))
    return md, ht
