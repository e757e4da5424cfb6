"""Writers of a :class:`bench.tables.Table`: Markdown (README), LaTeX (booktabs, for a paper), CSV.

- :func:`to_markdown`: ``### title``, the caption, a pipe table (bold cells as ``**x**``), notes.
- :func:`to_latex`: a ``table`` float with ``\\caption``, ``\\label{tab:<name>}`` and a
  ``tabular`` in booktabs style (``\\toprule`` / ``\\midrule`` / ``\\bottomrule``, no vertical
  rules); text is escaped, ``±`` / ``∞`` / ``Δ`` become math, bold cells ``\\textbf{}``. Needs
  ``\\usepackage{booktabs}`` only.
- :func:`to_csv`: the table's numbers (``Table.data``), or its display strings without numbers.
- :func:`write_table`: all three as ``table_<name>.md / .tex / .csv`` under a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from dpfpl.rundir import atomic_write_bytes

from .tables import Table


def _cell(body: pd.DataFrame, bold: pd.DataFrame | None, i: int, j: int) -> tuple[str, bool]:
    return str(body.iat[i, j]), bool(bold is not None and bold.shape == body.shape and bold.iat[i, j])


def to_markdown(t: Table) -> str:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    lines = [f"### {t.title}", "", t.caption, "", "| " + " | ".join(esc(str(h)) for h in t.body.columns) + " |",
             "|" + "---|" * len(t.body.columns)]
    for i in range(len(t.body)):
        cells = []
        for j in range(len(t.body.columns)):
            s, b = _cell(t.body, t.bold, i, j)
            cells.append(f"**{esc(s)}**" if b and s not in ("", "-") else esc(s))
        lines.append("| " + " | ".join(cells) + " |")
    if t.body.empty:
        lines.append("| (no rows) |" + " |" * (len(t.body.columns) - 1))
    for n in t.notes:
        lines += ["", n]
    return "\n".join(lines) + "\n"


_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
_TEX_UNICODE = {"±": r"$\pm$", "∞": r"$\infty$", "Δ": r"$\Delta$", "<": r"$<$", ">": r"$>$", "≥": r"$\geq$",
                "≤": r"$\leq$", "−": "-", "`": ""}


def tex_escape(s: str) -> str:
    """Escape LaTeX specials; map the few Unicode symbols the tables use to math."""
    out = "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))
    for k, v in _TEX_UNICODE.items():
        out = out.replace(k, v)
    return out


def _numeric_like(col: pd.Series) -> bool:
    return all(re.match(r"^[-+]?[\d.]", str(v)) or str(v) in ("-", "") for v in col)


def to_latex(t: Table) -> str:
    cols = list(t.body.columns)
    align = "".join("r" if len(t.body) and _numeric_like(t.body[c]) else "l" for c in cols)
    lines = [r"\begin{table}[t]", r"\centering", r"\small",
             rf"\caption{{{tex_escape(t.title)}. {tex_escape(t.caption)}}}", rf"\label{{tab:{t.name}}}",
             rf"\begin{{tabular}}{{{align}}}", r"\toprule", " & ".join(tex_escape(c) for c in cols) + r" \\",
             r"\midrule"]
    prev_key = None
    for i in range(len(t.body)):
        key = str(t.body.iat[i, 0])
        if prev_key is not None and key != prev_key:
            lines.append(r"\midrule")
        prev_key = key
        cells = []
        for j in range(len(cols)):
            s, b = _cell(t.body, t.bold, i, j)
            e = tex_escape(s)
            cells.append(rf"\textbf{{{e}}}" if b and s not in ("", "-") else e)
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    for n in t.notes:
        lines.append(r"\par\smallskip\footnotesize " + tex_escape(n))
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_csv(t: Table) -> str:
    df = t.data if t.data is not None and not t.data.empty else t.body
    return df.to_csv(index=False)


def write_table(t: Table, out: Path) -> list[Path]:
    """``out/table_<name>.md``, ``.tex`` and ``.csv``; returns the paths."""
    paths = []
    for ext, text in (("md", to_markdown(t)), ("tex", to_latex(t)), ("csv", to_csv(t))):
        p = Path(out) / f"table_{t.name}.{ext}"
        atomic_write_bytes(p, text.encode())
        paths.append(p)
    return paths
