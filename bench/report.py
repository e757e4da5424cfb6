"""A benchmark folder's report, rebuilt from its run directories: runs.csv, tables, plots, README.

Files written to ``OUT``:

- ``runs.csv``: one row per finished run (method, epsilon, seed, axes, privacy, level, accuracies,
  eps RDP / PLD / claimed, audit metrics, throughput, peak memory, device...); ``epsilon`` is
  blank for non-private runs and ``inf`` for clipped-no-noise runs (``level`` says which);
- ``table_<name>.md`` / ``.tex`` / ``.csv`` for every table of :mod:`bench.tables`: ``local`` and
  ``neighbor`` (accuracy, laid out like the DP-FPL paper's Tables 2-3 with the paper's numbers where
  the preset carries them), ``local_vs_dpfpl`` / ``neighbor_vs_dpfpl`` (paired differences),
  ``privacy`` (target vs RDP vs PLD vs claimed vs empirical eps), ``cost`` and ``audit``;
- ``acc_vs_eps.png``, ``eps_accounting.png``, ``roc.png`` (:mod:`bench.plots`);
- ``README.md``: the command that produced the folder, the grid, the tables and the plots.

This module reads run directories and writes files; the maths is in :mod:`bench.tables` and
:mod:`bench.stats`, the writers in :mod:`bench.render`. It imports nothing from
:mod:`bench.harness` (the harness calls :func:`write_report`).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from dpfpl.rundir import atomic_write_bytes, rows_to_csv

from . import plots
from .frames import from_rows
from .grid import Cell, GridSpec, eps_label
from .labels import CLIP, label, level_label, level_of, series_order
from .render import to_markdown, write_table
from .tables import (Table, accuracy_table, audit_table, cost_table, privacy_table, significance_table, tuned_mapping,
                     tuning_table)

#: Leading columns of runs.csv (always present, in this order; grid axes go after ``dataset``).
CSV_COLUMNS = ["cell", "method", "epsilon", "seed", "dataset", "privacy", "level", "local_acc", "neighbor_acc",
               "wall_s", "zeroshot_local_acc", "zeroshot_neighbor_acc", "epsilon_target", "epsilon_rdp",
               "epsilon_pld", "epsilon_claimed", "audit_auc", "audit_tpr_at_1pct_fpr", "audit_eps_lower_bound",
               "mechanism_eps_lower_bound", "mechanism_verdict", "replay_ok", "rounds", "client_steps", "train_s", "cell_wall_s", "steps_per_s", "examples_per_s",
               "step_ms_median", "peak_mem_mb", "mem_kind", "device", "torch_threads", "stopped_reason", "run_dir"]
_SKIP_SUMMARY = {"local_acc_per_client", "neighbor_acc_per_client", "val_local_acc_per_client",
                 "val_neighbor_acc_per_client", "epsilon_spent"}
STALE = ("acc_vs_eps.png", "eps_accounting.png", "roc.png")


# ------------------------------------------------------------------------------------ rows

def read_json(p: Path) -> Optional[dict[str, Any]]:
    """A JSON file, or None. Python's json reads ``Infinity`` as float inf (never None)."""
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _first(*xs: Any) -> Any:
    return next((x for x in xs if x is not None), None)


def collect_rows(cells: Sequence[Cell], runs_dir: Path) -> list[dict[str, Any]]:
    """One row per finished cell of the grid (cells without summary.json are left out)."""
    rows = []
    for c in cells:
        d = runs_dir / c.id
        summary = read_json(d / "summary.json")
        if summary is None:
            continue
        bench = read_json(d / "bench.json") or {}
        audit = read_json(d / "audit.json") or {}
        key = c.key()
        level = level_of(c.epsilon)
        # no noise: eps is infinite by definition (summary.json may hold Infinity, or null)
        no_noise = math.inf if level == CLIP else None
        row: dict[str, Any] = {
            "cell": c.id, "method": c.method, "epsilon": math.inf if level == CLIP else c.epsilon, "seed": c.seed,
            "dataset": key["dataset"], **{k: v for k, v in c.axes if k != "dataset"},
            "privacy": summary.get("privacy"), "level": level, "local_acc": summary.get("local_acc"),
            "neighbor_acc": summary.get("neighbor_acc"), "wall_s": summary.get("wall_s"),
            "zeroshot_local_acc": summary.get("zeroshot_local_acc"),
            "zeroshot_neighbor_acc": summary.get("zeroshot_neighbor_acc"),
            "epsilon_target": summary.get("epsilon_target", None if level == CLIP else c.epsilon),
            "epsilon_rdp": _first(summary.get("epsilon_rdp"), summary.get("epsilon_spent"), no_noise),
            "epsilon_pld": _first(summary.get("epsilon_pld"), no_noise), "epsilon_claimed": summary.get("epsilon_claimed"),
            "audit_auc": audit.get("auc"), "audit_tpr_at_1pct_fpr": audit.get("tpr_at_1pct_fpr"),
            "audit_eps_lower_bound": audit.get("eps_lower_bound"), "audit_attack": audit.get("attack"),
            "mechanism_eps_lower_bound": (audit.get("mechanism") or {}).get("eps_lower_bound"),
            "mechanism_verdict": (audit.get("mechanism") or {}).get("verdict"), "replay_ok": audit.get("replay_ok"),
            "rounds": summary.get("rounds"), "client_steps": summary.get("client_steps"),
            "train_s": summary.get("train_s"),
            **{k: bench.get(k) for k in ("cell_wall_s", "steps_per_s", "examples_per_s", "step_ms_median",
                                         "peak_mem_mb", "mem_kind", "device", "torch_threads")},
            "stopped_reason": summary.get("stopped_reason"), "run_dir": f"runs/{c.id}",
            "lr": c.config().train.lr,
        }
        for k, v in summary.items():
            if k not in row and k not in _SKIP_SUMMARY and isinstance(v, (int, float, str, bool, type(None))):
                row[k] = v
        row["_roc"] = audit.get("roc")
        row["_roc_png"] = f"runs/{c.id}/audit/roc.png" if (d / "audit" / "roc.png").is_file() else None
        row["_audit_attacks"] = audit.get("attacks") or {}
        rows.append(row)
    return rows


def runs_csv(rows: list[dict[str, Any]], axes: Sequence[str]) -> str:
    """runs.csv: CSV_COLUMNS with the grid axes after ``dataset``, then every other scalar field."""
    cols = CSV_COLUMNS[:5] + [a for a in axes if a != "dataset"] + CSV_COLUMNS[5:]
    if not rows:
        return ",".join(cols) + "\n"
    extra = [k for r in rows for k in r if not k.startswith("_") and k not in cols]
    cols += list(dict.fromkeys(extra))
    # rows_to_csv keeps columns in first-seen order: make every column appear in the first row
    return rows_to_csv([{k: r.get(k) for k in cols} for r in rows])


def grid_axes(grid: GridSpec) -> list[str]:
    return [a for a in grid.axis_names() if a != "dataset"]


def reference_lookup(grid: GridSpec, table: str):
    """Published numbers (in %) of a table row ``{dataset, axes..., level}``, by method."""
    def lookup(key: dict[str, Any]) -> dict[str, float]:
        eps = None if key["level"] == "none" else (None if key["level"] == CLIP else float(key["level"]))
        if key["level"] == CLIP:
            return {}
        row = {**key, "epsilon": eps}
        out: dict[str, float] = {}
        for ref in grid.reference:
            if ref.get("table") != table:
                continue
            ok = True
            for k, v in ref.get("match", {}).items():
                if k not in row:
                    continue
                rv = row[k]
                if k == "epsilon":
                    ok = (rv is None and v is None) or (rv is not None and v is not None and math.isclose(rv, float(v)))
                else:
                    ok = rv == v
                if not ok:
                    break
            if ok:
                out.update(ref.get("values", {}))
        return out
    return lookup


# ------------------------------------------------------------------------------------ tables

ACCURACY = {"local": ("local_acc", "Local accuracy (test images of each client's classes)"),
            "neighbor": ("neighbor_acc", "Neighbour accuracy (test images of the other clients' classes)"),
            "val_local": ("val_local_acc", "Validation accuracy (held-out training images of each client's classes)")}


def build_tables(df: pd.DataFrame, grid: Optional[GridSpec], n_expected: int) -> dict[str, Table]:
    """Every table of a runs frame, by name (accuracy and significance tables only for metrics
    some run has)."""
    tables: dict[str, Table] = {}
    for name, (metric, title) in ACCURACY.items():
        if metric not in df.columns or not pd.to_numeric(df[metric], errors="coerce").notna().any():
            continue
        ref = reference_lookup(grid, name) if grid is not None and grid.reference else None
        tables[name] = accuracy_table(df, metric, title, name, n_expected, ref,
                                      grid.reference_source if grid is not None else "")
        sig = significance_table(df, metric, f"{title.split(' (')[0]}: DP-FPL minus each baseline",
                                 f"{name}_vs_dpfpl")
        if sig is not None:
            tables[sig.name] = sig
    sweep = tuning_table(df)
    if sweep is not None:
        tables[sweep.name] = sweep
    tables["privacy"] = privacy_table(df)
    tables["cost"] = cost_table(df)
    audits = audit_table(df)
    if audits is not None:
        tables["audit"] = audits
    return tables


# ------------------------------------------------------------------------------------ README

def grid_lines(grid: GridSpec, cells: Sequence[Cell]) -> list[str]:
    base = ", ".join(f"{k}={v}" for k, v in grid.base.items())
    head = f"- **Grid** `{grid.name}`" + (f" (preset: {grid.description})" if grid.description else "")
    lines = [head, f"- {len(cells)} cells: methods {', '.join(grid.methods)}; eps "
             f"{', '.join(level_label(level_of(e)) for e in grid.epsilons)} (private cells: {grid.private_mode} "
             f"mode); seeds {', '.join(map(str, grid.seeds))}"
             + "".join(f"; {k} {', '.join(map(str, v))}" for k, v in grid.axes.items())]
    for b in grid.blocks:
        lines.append(f"- block {b.get('name', '')}: " + "; ".join(f"{k} {v}" for k, v in b.items() if k != "name"))
    lines.append(f"- settings: {base}")
    if grid.private_base:
        lines.append("- private and clipped-no-noise cells: " + ", ".join(f"{k}={v}" for k, v in grid.private_base.items()))
    if grid.nonprivate_base:
        lines.append("- non-private cells only: " + ", ".join(f"{k}={v}" for k, v in grid.nonprivate_base.items()))
    if grid.dataset_options:
        lines.append("- dataset options: " + ", ".join(f"{k}={v}" for k, v in grid.dataset_options.items()))
    return lines


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def invocation_line(out: Path, result: Any) -> Optional[str]:
    """The producing run's wall time / CPU / load line (kept in invocation.json for --report-only)."""
    inv = out / "invocation.json"
    if result is None:
        prev = read_json(inv)
        return prev.get("line") if prev else None
    cpu = f", {result.cpu_s:.0f} s CPU (user + system, workers included)" if result.cpu_s is not None else ""
    load = ""
    if result.loadavg and None not in result.loadavg:
        load = (f"; 1-min load average {result.loadavg[0]:.1f} at start, {result.loadavg[1]:.1f} at end on "
                f"{_cpus()} core(s) (above the core count = shared with other work, so wall times are inflated)")
    line = (f"- last invocation: {result.wall_s:.1f} s wall{cpu} with {result.jobs} worker process(es), "
            f"{len(result.ran)} cell(s) run, {len(result.skipped)} skipped as finished{load}"
            + (f", {len(result.failed)} failed" if result.failed else ""))
    atomic_write_bytes(inv, json.dumps({"line": line, "wall_s": result.wall_s, "cpu_s": result.cpu_s,
                                        "jobs": result.jobs, "ran": len(result.ran)}, indent=1).encode())
    return line


def roc_links(df: pd.DataFrame) -> list[str]:
    """Links to the per-run audit ROC plots (series x level, first audited seed)."""
    if "_roc_png" not in df.columns:
        return []
    have = df[df["_roc_png"].notna()]
    if have.empty:
        return []
    levels = sorted(have["level"].unique(), key=lambda lv: have[have["level"] == lv]["level_key"].iloc[0])
    lines = ["Membership-inference audit ROC curves (one plot per run; first audited seed):", "",
             "| method | " + " | ".join(f"eps {level_label(lv)}" for lv in levels) + " |",
             "|" + "---|" * (len(levels) + 1)]
    first = have.sort_values("seed").groupby(["series", "level"], sort=False).first()
    for s in series_order(have["series"]):
        cells = []
        for lv in levels:
            if (s, lv) not in first.index:
                cells.append("")
                continue
            r = first.loc[(s, lv)]
            auc = r.get("audit_auc")
            cells.append(f"[AUC {auc:.2f}]({r['_roc_png']})" if pd.notna(auc) else f"[ROC]({r['_roc_png']})")
        lines.append(f"| {label(s)} | " + " | ".join(cells) + " |")
    return lines + [""]


def readme(out: Path, grid: GridSpec, cells: Sequence[Cell], df: pd.DataFrame, tables: dict[str, Table],
           plot_files: dict[str, Optional[Path]], command: Optional[str], result: Any = None) -> str:
    devices = sorted({str(x) for x in df.get("device", pd.Series(dtype=object)).dropna()})
    wall = pd.to_numeric(df.get("cell_wall_s", pd.Series(dtype=float)), errors="coerce")
    wall = wall.fillna(pd.to_numeric(df.get("wall_s", pd.Series(dtype=float)), errors="coerce"))
    lines = [f"# dpfpl bench: `{grid.name}`", "",
             f"Produced by `{command or 'dpfpl bench --preset ' + grid.name}` "
             f"(run from the repository root; a rerun skips finished cells).", ""]
    lines += grid_lines(grid, cells)
    lines += [f"- finished cells: {len(df)} of {len(cells)}; device: {'; '.join(devices) or '-'}",
              f"- sum of cell wall times: {float(wall.sum()):.1f} s"]
    inv = invocation_line(out, result)
    if inv:
        lines.append(inv)
    lines.append(f"- written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if grid.notes:
        lines += ["", "Notes on the preset:", ""] + [f"- {n}" for n in grid.notes]
    if "lr_choice" in tables:
        lines += ["", "## Learning rate chosen on validation data", "", to_markdown(tables["lr_choice"]),
                  "`tuned_lr.json` holds these choices as a grid's `tuned` mapping (bench.grid.GridSpec.tuned)."]
    lines += ["", "## Accuracy", ""]
    for name in ("local", "neighbor", "val_local", "local_vs_dpfpl", "neighbor_vs_dpfpl", "val_local_vs_dpfpl"):
        if name in tables:
            lines.append(to_markdown(tables[name]))
    lines += ["## Privacy", "", to_markdown(tables["privacy"])]
    if "audit" in tables:
        lines.append(to_markdown(tables["audit"]))
    lines += ["## Cost", "", to_markdown(tables["cost"]), "## Plots", ""]
    for name, p in plot_files.items():
        if p is not None:
            lines += [f"![{name}]({p.name})", ""]
    if plot_files.get("audit ROC") is None:
        lines += roc_links(df)
    lines += ["## Files", "", "- `runs.csv`: one row per run (accuracies as fractions; eps blank = non-private, "
              "inf = clipped, no noise)",
              "- every table as Markdown, LaTeX (booktabs) and CSV: "
              + ", ".join(f"`table_{n}.{{md,tex,csv}}`" for n in tables),
              "- `runs/<cell>/`: each run directory (config, metrics, ledger, prompts, summary) with `cell.json`, "
              "`bench.json` (device, timings, memory) and `audit.json` when audited", ""]
    return "\n".join(lines)


def write_report(out: str | Path, grid: GridSpec, cells: Sequence[Cell], command: Optional[str] = None,
                 result: Any = None) -> dict[str, Path]:
    """Rebuild every report file of ``out`` from its run directories; returns the paths written."""
    out = Path(out)
    axes = grid_axes(grid)
    rows = collect_rows(cells, out / "runs")
    files: dict[str, Path] = {}
    atomic_write_bytes(out / "runs.csv", runs_csv(rows, axes).encode())
    files["runs.csv"] = out / "runs.csv"
    df = from_rows(rows, axes)
    tables = build_tables(df, grid, len(grid.seeds))
    for old in out.glob("table_*.*"):
        if old.stem[len("table_"):] not in tables:
            old.unlink()
    for t in tables.values():
        for p in write_table(t, out):
            files[p.name] = p
    if "lr_choice" in tables:
        p = out / "tuned_lr.json"
        atomic_write_bytes(p, json.dumps(tuned_mapping(tables["lr_choice"]), indent=1, sort_keys=True).encode())
        files[p.name] = p
    plot_files = {"accuracy vs eps": plots.plot_acc_vs_eps({grid.name: df}, out / "acc_vs_eps.png"),
                  "eps: target / claimed vs accounted (RDP, PLD) vs empirical":
                      plots.plot_eps_accounting({grid.name: df}, out / "eps_accounting.png"),
                  "audit ROC": plots.plot_rocs(df, out / "roc.png")}
    for p in plot_files.values():
        if p is not None:
            files[p.name] = p
    for stale in STALE:
        if stale not in files and (out / stale).exists():
            (out / stale).unlink()
    atomic_write_bytes(out / "README.md", readme(out, grid, cells, df, tables, plot_files, command, result).encode())
    files["README.md"] = out / "README.md"
    return files


__all__ = ["write_report", "collect_rows", "runs_csv", "build_tables", "read_json", "eps_label"]
