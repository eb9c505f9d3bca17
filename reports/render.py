"""The report as blocks (headings, paragraphs, tables, images, samples) rendered to Markdown and to one HTML file."""
from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


def fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e3 else f"{value:,.0f}"
    return str(value)


@dataclass
class Report:
    title: str
    blocks: list[tuple] = field(default_factory=list)

    def heading(self, text: str) -> None:
        self.blocks.append(("h2", text))

    def paragraph(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, df: pd.DataFrame) -> None:
        self.blocks.append(("table", df))

    def image(self, path: Path, alt: str) -> None:
        self.blocks.append(("img", path, alt))

    def samples(self, items: list[tuple[str, str]]) -> None:
        """(caption, text) pairs shown side by side."""
        self.blocks.append(("samples", items))

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for kind, *rest in self.blocks:
            if kind == "h2":
                out += [f"## {rest[0]}", ""]
            elif kind == "p":
                out += [rest[0], ""]
            elif kind == "table":
                out += [markdown_table(rest[0]), ""]
            elif kind == "img":
                out += [f"![{rest[1]}]({rest[0].name})", ""]
            elif kind == "samples":
                for caption, text in rest[0]:
                    out += [f"**{caption}**", "", "```text", text, "```", ""]
        return "\n".join(out)

    def html(self) -> str:
        """One self-contained page: images are embedded as base64 data URIs."""
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, *rest in self.blocks:
            if kind == "h2":
                body.append(f"<h2>{html.escape(rest[0])}</h2>")
            elif kind == "p":
                body.append(f"<p>{html.escape(rest[0])}</p>")
            elif kind == "table":
                body.append(rest[0].to_html(na_rep="", formatters=None, float_format=fmt, border=0))
            elif kind == "img":
                data = base64.b64encode(rest[0].read_bytes()).decode()
                body.append(f'<img alt="{html.escape(rest[1])}" src="data:image/png;base64,{data}">')
            elif kind == "samples":
                cells = "".join(f"<div><h3>{html.escape(c)}</h3><pre>{html.escape(t)}</pre></div>" for c, t in rest[0])
                body.append(f'<div class="samples">{cells}</div>')
        return PAGE.format(title=html.escape(self.title), body="\n".join(body))


def markdown_table(df: pd.DataFrame) -> str:
    index_name = df.index.name or ""
    header = [index_name, *map(str, df.columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for idx, row in df.iterrows():
        lines.append("| " + " | ".join([fmt(idx), *(fmt(v) for v in row)]) + " |")
    return "\n".join(lines)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; font-size: 0.9em; }}
th, td {{ padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; text-align: right; }}
img {{ max-width: 100%; margin: 1em 0; }}
.samples {{ display: grid; grid-template-columns: 1fr 1fr; gap: 1em; }}
pre {{ white-space: pre-wrap; background: #f6f6f6; padding: 0.8em; font-size: 0.85em; }}
</style></head>
<body>
{body}
</body></html>
"""
