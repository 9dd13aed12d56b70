"""A small, dependency-free HTML page builder for the reports (one self-contained file each)."""

from __future__ import annotations

import html
import time

import pandas as pd

from .. import __version__

_STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       color: #222; line-height: 1.45; padding: 0 1em; }
h1 { border-bottom: 2px solid #2c6e9b; padding-bottom: .2em; }
h2 { margin-top: 2em; color: #2c6e9b; }
table { border-collapse: collapse; font-size: 0.88em; margin: .5em 0 1em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f1f5f8; }
td:first-child, th:first-child { text-align: left; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; align-items: flex-start; }
.figures img { max-width: 100%; }
.note { color: #555; font-size: .92em; }
.warn { background: #fff6e0; border-left: 4px solid #e0a800; padding: .4em .8em; margin: .3em 0; }
.error { background: #fde8e8; border-left: 4px solid #c62828; padding: .6em .9em; }
nav a { margin-right: 1em; }
"""


def esc(text) -> str:
    return html.escape(str(text))


def table(frame: pd.DataFrame, floatfmt: str = "{:.3f}") -> str:
    """A DataFrame as an HTML table, numbers formatted, missing values as n/a."""
    def fmt(value):
        if isinstance(value, float):
            return "n/a" if value != value else floatfmt.format(value)
        return value
    shown = frame.copy()
    for column in shown.columns:
        shown[column] = shown[column].map(fmt)
    return shown.to_html(index=False, escape=True, border=0, na_rep="n/a")


def figures(*imgs: str | None) -> str:
    shown = [i for i in imgs if i]
    return f'<div class="figures">{"".join(shown)}</div>' if shown else ""


def para(text: str, cls: str = "") -> str:
    return f'<p class="{cls}">{esc(text)}</p>' if cls else f"<p>{esc(text)}</p>"


def page(title: str, sections: list[tuple[str, str, str]]) -> str:
    """A whole page: ``sections`` are (anchor, title, html) and get a navigation bar."""
    nav = " ".join(f'<a href="#{esc(a)}">{esc(t)}</a>' for a, t, _ in sections)
    body = "\n".join(f'<h2 id="{esc(a)}">{esc(t)}</h2>\n{content}' for a, t, content in sections)
    stamp = time.strftime("%Y-%m-%d %H:%M")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>{_STYLE}</style></head>
<body><h1>{esc(title)}</h1>
<p class="note">bidsenc {esc(__version__)}, {esc(stamp)}</p>
<nav>{nav}</nav>
{body}
</body></html>
"""


__all__ = ["esc", "figures", "page", "para", "table"]
