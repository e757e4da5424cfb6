"""``dpfpl report DIR [DIR ...] --out OUT``: result folders side by side.

Each ``DIR`` is a result folder holding ``runs.csv`` (two commits, two grids...), or
``preset:NAME`` for the published numbers an embedded preset carries (``preset:paper``: the DP-FPL
paper's Tables 2-3; one number per cell, no seeds). The first source is the baseline.

Written to ``OUT``:

- ``table_compare_<metric>.md / .tex / .csv`` (local, neighbour accuracy): rows dataset [x axes]
  x privacy level x series present in any source; per source the mean ± 95% t-interval over
  its seeds (:mod:`bench.stats`), then per later source ``Δ`` = its mean minus the baseline's,
  ± the Welch interval of a difference of independent means (folders are different code or
  settings, so runs are not paired across folders); bold where that interval excludes 0;
- ``table_compare_privacy.*``: the accounted eps (RDP, PLD) per source, side by side;
- ``acc_vs_eps.png`` and ``eps_accounting.png`` with every source overlaid;
- ``README.md``: the sources, the tables and the plots.

Bad input (a folder without runs.csv, an unknown preset, an unreadable CSV) raises
:class:`~dpfpl.errors.ConfigError` naming the path; the CLI prints it on one line and exits 2.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from dpfpl.errors import ConfigError
from dpfpl.rundir import atomic_write_bytes

from . import plots
from .frames import finish_frame, read_runs_csv, sort_rows, with_zeroshot_everywhere
from .labels import label, level_label, level_of, series_order
from .render import to_markdown, write_table
from .stats import summarize, welch_delta
from .tables import Table, fmt_ci, fmt_num

METRICS = {"local": ("local_acc", "Local accuracy"), "neighbor": ("neighbor_acc", "Neighbour accuracy")}


def load_source(src: str) -> tuple[str, pd.DataFrame]:
    """(label, runs frame) of a folder or of ``preset:NAME``'s published numbers."""
    if src.startswith("preset:"):
        return src, reference_frame(src.split(":", 1)[1])
    p = Path(src)
    csv = p / "runs.csv" if p.is_dir() else p
    if not csv.is_file():
        raise ConfigError(f"{src}: no runs.csv (not a result folder of `dpfpl bench`)")
    try:
        df = read_runs_csv(csv)
    except (ValueError, pd.errors.ParserError, pd.errors.EmptyDataError, KeyError) as exc:
        raise ConfigError(f"{csv}: cannot read runs.csv ({exc})") from None
    return (p.name if p.is_dir() else p.parent.name) or str(p), df


def reference_frame(preset: str) -> pd.DataFrame:
    """The published numbers of a preset as a runs frame (fractions; one pseudo-run, seed 0, per
    number; reference table 'local' -> local_acc, 'neighbor' -> neighbor_acc)."""
    from .presets import get_preset

    grid = get_preset(preset)
    if not grid.reference:
        raise ConfigError(f"preset:{preset}: the preset carries no published numbers")
    axes = [a for a in grid.axis_names() if a != "dataset"]
    recs: dict[tuple, dict] = {}
    for ref in grid.reference:
        metric = {"local": "local_acc", "neighbor": "neighbor_acc"}.get(ref.get("table"))
        if metric is None:
            continue
        m = ref.get("match", {})
        for method, v in ref.get("values", {}).items():
            key = (m.get("dataset"), *[m.get(a) for a in axes], m.get("epsilon"), method)
            r = recs.setdefault(key, {"cell": "paper", "method": method, "seed": 0, "dataset": m.get("dataset"),
                                      **{a: m.get(a) for a in axes}, "privacy": "dp" if m.get("epsilon") else "none",
                                      "level": level_of(m.get("epsilon"))})
            r[metric] = v / 100.0
    return finish_frame(pd.DataFrame(list(recs.values())), axes)


def _label_unique(labels: list[str]) -> list[str]:
    out = []
    for i, lab in enumerate(labels):
        out.append(lab if labels.count(lab) == 1 else f"{lab} ({i + 1})")
    return out


def _axis_str(v: object) -> str:
    """An axis value for display; '-' where a source has no such axis."""
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def compare_table(frames: dict[str, pd.DataFrame], metric: str, title: str, name: str) -> Table:
    """See the module doc. Rows: the union over sources; '-' where a source lacks the cell."""
    names = list(frames)
    axes = list(dict.fromkeys(a for df in frames.values() for a in df.attrs.get("axes", [])))
    keys = ["dataset", *axes, "level", "series"]
    stats = {}
    for s, df in frames.items():
        d = with_zeroshot_everywhere(df)
        for a in axes:
            if a not in d.columns:
                d[a] = None
        if metric not in d.columns:
            d[metric] = np.nan
        st = summarize(d, keys, metric)
        stats[s] = st.set_index(keys)
    union = pd.concat([st.index.to_frame(index=False) for st in stats.values()]).drop_duplicates()
    order = series_order(union["series"])
    union["_s"] = [order.index(x) for x in union["series"]]
    datasets = list(dict.fromkeys(d for df in frames.values() for d in df["dataset"]))
    union = sort_rows(union.sort_values("_s", kind="stable"), datasets, axes)
    n_exp = {s: int(st["n"].max()) if len(st) else 0 for s, st in stats.items()}
    heads = ["dataset", *axes, "eps", "method"] + [f"{s}" for s in names] + [f"Δ {s} − {names[0]}" for s in names[1:]]
    body, bold, data = [], [], []
    for rec in union.drop(columns="_s").to_dict("records"):
        k = tuple(rec[c] for c in keys)
        cells = [str(rec["dataset"]), *[_axis_str(rec[a]) for a in axes], level_label(rec["level"]),
                 label(rec["series"])]
        marks = [False] * len(cells)
        vals = {}
        for s in names:
            st = stats[s]
            if k in st.index:
                row = st.loc[k]
                vals[s] = (float(row["mean"]), float(row["std"]), int(row["n"]), float(row["ci"]))
                cells.append(fmt_ci(vals[s][0], vals[s][3], vals[s][2], n_exp[s]))
            else:
                cells.append("-")
            marks.append(False)
        out = {**rec}
        for s in names:
            if s in vals:
                out.update({f"{s}_mean_pct": 100 * vals[s][0], f"{s}_ci95_pct": 100 * vals[s][3], f"{s}_n": vals[s][2]})
        for s in names[1:]:
            if s in vals and names[0] in vals:
                m1, s1, n1, _ = vals[s]
                m0, s0, n0, _ = vals[names[0]]
                delta, half = welch_delta(m1, s1, n1, m0, s0, n0)
                cells.append(f"{100 * delta:+.1f}" + ("" if math.isnan(half) else f" ± {100 * half:.1f}"))
                marks.append(not math.isnan(half) and abs(delta) > half)
                out.update({f"delta_{s}_pct": 100 * delta, f"delta_{s}_ci95_pct": 100 * half})
            else:
                cells.append("-")
                marks.append(False)
        body.append(cells)
        bold.append(marks)
        data.append(out)
    caption = (f"Per source: mean over its seeds ± half-width of the 95% t-interval, in %. Δ: source minus "
               f"{names[0]}, ± the 95% Welch interval of a difference of independent means (a published number "
               "adds no spread); bold where the interval excludes 0.")
    return Table(name, title, caption, pd.DataFrame(body, columns=heads), pd.DataFrame(bold, columns=heads),
                 pd.DataFrame(data))


def compare_privacy(frames: dict[str, pd.DataFrame]) -> Table:
    """Accounted eps (RDP, PLD; mean over seeds) per dataset x series x private level, per source."""
    names = list(frames)
    keys = ["dataset", "series", "level"]
    per = {}
    for s, df in frames.items():
        priv = df[~df["level"].isin(["none"])]
        cols = [c for c in ("epsilon_rdp", "epsilon_pld") if c in priv.columns]
        per[s] = priv.groupby(keys, sort=False)[cols].mean() if cols and len(priv) else pd.DataFrame()
    union = pd.concat([p.index.to_frame(index=False) for p in per.values() if len(p)] or
                      [pd.DataFrame(columns=keys)]).drop_duplicates()
    heads = ["dataset", "method", "eps target"] + [f"{s} {a}" for s in names for a in ("RDP", "PLD")]
    body = []
    if len(union):
        order = series_order(union["series"])
        union["_s"] = [order.index(x) for x in union["series"]]
        union = sort_rows(union.sort_values("_s", kind="stable"), list(dict.fromkeys(union["dataset"])), [])
        for rec in union.drop(columns="_s").to_dict("records"):
            k = (rec["dataset"], rec["series"], rec["level"])
            cells = [str(rec["dataset"]), label(rec["series"]), level_label(rec["level"])]
            for s in names:
                p = per[s]
                for c in ("epsilon_rdp", "epsilon_pld"):
                    cells.append(fmt_num(float(p.loc[k, c])) if len(p) and k in p.index and c in p.columns else "-")
            body.append(cells)
    return Table("compare_privacy", "Accounted eps per source", "Mean over seeds of the whole run's eps by the RDP "
                 "and the PLD accountant, per source ('-': the source has no such cell or field).",
                 pd.DataFrame(body, columns=heads))


def write_comparison(sources: Sequence[str], out: str | Path, command: Optional[str] = None) -> dict[str, Path]:
    """Load every source, write the comparison tables, plots and README under ``out``."""
    if not sources:
        raise ConfigError("dpfpl report: give at least one result folder")
    loaded = [load_source(s) for s in sources]
    labels = _label_unique([lab for lab, _ in loaded])
    frames = {lab: df for lab, (_, df) in zip(labels, loaded)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tables = [compare_table(frames, metric, f"{title}: {' vs '.join(labels)}", f"compare_{name}")
              for name, (metric, title) in METRICS.items()
              if any(metric in df.columns and df[metric].notna().any() for df in frames.values())]
    tables.append(compare_privacy(frames))
    files: dict[str, Path] = {}
    for t in tables:
        for p in write_table(t, out):
            files[p.name] = p
    figs = {"accuracy vs eps, all sources": plots.plot_acc_vs_eps(frames, out / "acc_vs_eps.png"),
            "accounted eps, all sources": plots.plot_eps_accounting(frames, out / "eps_accounting.png")}
    lines = [f"# dpfpl report: {' vs '.join(labels)}", "",
             f"Produced by `{command or 'dpfpl report ' + ' '.join(sources)}`.", "", "Sources (the first is the "
             "baseline of every Δ):", ""]
    for lab, src, (_, df) in zip(labels, sources, loaded):
        lines.append(f"- `{lab}`: {src} ({len(df)} runs, seeds {', '.join(map(str, sorted(df['seed'].unique())))})")
    lines += ["", f"- written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", ""]
    for t in tables:
        lines.append(to_markdown(t))
    lines += ["## Plots", ""]
    for name, p in figs.items():
        if p is not None:
            files[p.name] = p
            lines += [f"![{name}]({p.name})", ""]
    lines += ["Every table is also in LaTeX (booktabs) and CSV: "
              + ", ".join(f"`table_{t.name}.{{tex,csv}}`" for t in tables), ""]
    atomic_write_bytes(out / "README.md", "\n".join(lines).encode())
    files["README.md"] = out / "README.md"
    return files
