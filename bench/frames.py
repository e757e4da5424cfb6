"""The runs frame: one row per finished run, as a pandas DataFrame every table is computed from.

Columns always present: ``cell, method, seed, dataset, privacy, level, series, epsilon`` and the
metrics (``local_acc``, ``neighbor_acc``, eps fields...), plus one column per extra grid axis,
named in ``df.attrs["axes"]``. ``level`` is the privacy level (see :mod:`bench.labels`:
``none``, ``clip`` or the target eps as text); ``series`` is the method, or ``method+ref`` for
reference-mode runs. ``epsilon`` is the target eps as a float: NaN for non-private runs, inf for
clipped-no-noise runs. Infinite eps values from summary.json (``Infinity``) stay float inf.

A frame is built from the rows the report collects from run directories (:func:`from_rows`) or
read back from a folder's ``runs.csv`` (:func:`read_runs_csv`, used by ``dpfpl report``), which
also accepts runs.csv files written before the ``level`` column existed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from .labels import CLIP, NONE, level_of, level_sort_key, series_of

#: Metrics read as numbers (missing -> NaN; "inf"/"Infinity" -> inf).
NUMERIC = ["local_acc", "neighbor_acc", "val_local_acc", "val_neighbor_acc", "wall_s", "epsilon_target",
           "epsilon_rdp", "epsilon_pld", "epsilon_claimed", "audit_auc", "audit_tpr_at_1pct_fpr",
           "audit_eps_lower_bound", "mechanism_eps_lower_bound", "noise_multiplier_local", "noise_multiplier_global", "cell_wall_s",
           "steps_per_s", "examples_per_s", "step_ms_median", "peak_mem_mb", "lr", "zeroshot_local_acc",
           "zeroshot_neighbor_acc"]
#: Columns of runs.csv that are never grid axes.
FIXED = ["cell", "method", "epsilon", "seed", "dataset", "privacy", "level"]


def finish_frame(df: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    for c in NUMERIC:
        if c in df.columns:
            df[c] = pd.to_numeric(df[c].replace({"Infinity": np.inf, "-Infinity": -np.inf}), errors="coerce")
    if "privacy" not in df.columns:
        df["privacy"] = None
    df["series"] = [series_of(m, p) for m, p in zip(df["method"], df["privacy"])]
    df["level_key"] = [level_sort_key(lv) for lv in df["level"]]
    df["seed"] = df["seed"].astype(int)
    df.attrs["axes"] = list(axes)
    return df


def from_rows(rows: list[dict[str, Any]], axes: Sequence[str]) -> pd.DataFrame:
    """The frame of the report's collected rows (``epsilon``: the cell's eps axis value)."""
    cols = ["cell", "method", "epsilon", "seed", "dataset", "privacy", *axes]
    df = pd.DataFrame(rows) if rows else pd.DataFrame(columns=cols)
    df["level"] = [level_of(e) for e in df["epsilon"]] if len(df) else []
    df["epsilon"] = [np.nan if lv == NONE else (np.inf if lv == CLIP else float(lv)) for lv in df["level"]]
    return finish_frame(df, axes)


def read_runs_csv(path: str | Path) -> pd.DataFrame:
    """A folder's runs.csv as a runs frame. Axis columns: those between ``dataset`` and
    ``privacy`` (the layout :func:`bench.report.runs_csv` writes)."""
    df = pd.read_csv(path, keep_default_na=True)
    for c in ("method", "seed", "dataset"):
        if c not in df.columns:
            raise ValueError(f"{path}: no {c!r} column")
    cols = list(df.columns)
    axes = cols[cols.index("dataset") + 1:cols.index("privacy")] if "privacy" in cols else []
    axes = [a for a in axes if a not in FIXED]
    eps = pd.to_numeric(df["epsilon"].replace({"clip": np.inf, "Infinity": np.inf}), errors="coerce") \
        if "epsilon" in df.columns else pd.Series(np.nan, index=df.index)
    if "level" in df.columns:
        df["level"] = [str(lv) if isinstance(lv, str) else level_of(e) for lv, e in zip(df["level"], eps)]
    else:
        df["level"] = [level_of(None if np.isnan(e) else e) for e in eps]
    df["epsilon"] = eps
    for a in axes:
        df[a] = df[a].astype(object).where(df[a].notna(), None)
    return finish_frame(df, axes)


def row_keys(df: pd.DataFrame) -> list[str]:
    """What identifies a table row: dataset, the extra axes, the privacy level."""
    return ["dataset", *df.attrs.get("axes", []), "level"]


def with_zeroshot_everywhere(df: pd.DataFrame) -> pd.DataFrame:
    """Zero-shot trains on nothing, so its (non-private) runs hold at every privacy level of the
    same dataset and axes: copy them onto each level present there."""
    zs = df[df["method"] == "zeroshot"]
    if zs.empty:
        return df
    group = ["dataset", *df.attrs.get("axes", [])]
    copies = []
    for lv in df["level"].unique():
        if lv == NONE:
            continue
        have = df[df["level"] == lv][group].drop_duplicates()
        z = zs.merge(have, on=group, how="inner")
        if len(z):
            z = z.assign(level=lv, level_key=[level_sort_key(lv)] * len(z))
            copies.append(z)
    out = pd.concat([df, *copies], ignore_index=True) if copies else df.copy()
    out.attrs = dict(df.attrs)
    return out


def sort_rows(keys: pd.DataFrame, datasets: Sequence[str], axes: Sequence[str]) -> pd.DataFrame:
    """``keys`` (dataset, axes..., level columns) in report order: dataset as first seen, axes
    by value, level none / clip / eps descending."""
    order = keys.copy()
    order["_d"] = [list(datasets).index(d) if d in datasets else len(datasets) for d in order["dataset"]]
    order["_a"] = [tuple(_sortable(v) for v in vals) for vals in zip(*[order[a] for a in axes])] \
        if axes else [()] * len(order)
    order["_l"] = [level_sort_key(lv) for lv in order["level"]]
    return order.sort_values(["_d", "_a", "_l"], kind="stable").drop(columns=["_d", "_a", "_l"])


def _sortable(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))
