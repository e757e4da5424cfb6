"""Tables, plots and README of a benchmark folder, rebuilt from its run directories.

Files written to ``OUT``:

- ``runs.csv``: one row per finished run (method, epsilon, seed, local_acc, neighbor_acc, wall_s,
  the other axes, eps RDP / PLD / claimed, audit metrics, throughput, peak memory, device...);
- ``table_local.md`` / ``table_neighbor.md``: laid out like the DP-FPL paper's Tables 2-3 (rows:
  dataset [x other axes] x eps, columns: methods; mean +- std over seeds, in %), with the
  paper's numbers in "(paper)" columns where a preset carries them;
- ``table_privacy.md``: target vs accounted (RDP, PLD) vs claimed vs empirical eps per cell group;
- ``table_cost.md``: step time, throughput, wall time and peak memory per method, private or not;
- ``acc_vs_eps.png``, ``eps_accounting.png`` (private cells), ``roc.png`` (audits with ROC curves);
- ``README.md``: the command that produced the folder, the tables and the plots.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections import OrderedDict, defaultdict
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from dpfpl.rundir import atomic_write_bytes, rows_to_csv

from .grid import Cell, GridSpec, eps_label

METHOD_ORDER = ["zeroshot", "local", "promptfl", "fedprompt", "fedotp", "fedpgp", "dpfpl-nores", "dpfpl"]
METHOD_LABELS = {"zeroshot": "Zero-shot", "local": "Local only", "promptfl": "PromptFL", "fedprompt": "FedPrompt",
                 "fedotp": "FedOTP", "fedpgp": "FedPGP", "dpfpl-nores": "DP-FPL w/o res.", "dpfpl": "DP-FPL"}
METHOD_COLORS = {"zeroshot": "0.45", "local": "C1", "promptfl": "C0", "fedprompt": "C9", "fedotp": "C4",
                 "fedpgp": "C5", "dpfpl-nores": "C6", "dpfpl": "C3"}
#: Leading columns of runs.csv (always present, in this order).
CSV_COLUMNS = ["cell", "method", "epsilon", "seed", "dataset", "privacy", "local_acc", "neighbor_acc", "wall_s",
               "zeroshot_local_acc", "zeroshot_neighbor_acc", "epsilon_target", "epsilon_rdp", "epsilon_pld",
               "epsilon_claimed", "audit_auc", "audit_tpr_at_1pct_fpr", "audit_eps_lower_bound", "rounds",
               "client_steps", "train_s", "cell_wall_s", "steps_per_s", "examples_per_s", "step_ms_median",
               "peak_mem_mb", "mem_kind", "device", "torch_threads", "stopped_reason", "run_dir"]
_SKIP_SUMMARY = {"local_acc_per_client", "neighbor_acc_per_client", "epsilon_spent"}


#: Suffix of a series run in reference mode (the public code's calibration; its eps is a claim).
REF_SUFFIX = "+ref"


def series(r: dict[str, Any]) -> str:
    """What a table column / plot line shows: the method, or ``method+ref`` for reference-mode runs
    (same method, different privacy mechanism: never averaged with the honest runs)."""
    return r["method"] + (REF_SUFFIX if r.get("privacy") == "reference" else "")


def _base(m: str) -> str:
    return m[:-len(REF_SUFFIX)] if m.endswith(REF_SUFFIX) else m


def label(method: str) -> str:
    base = METHOD_LABELS.get(_base(method), _base(method))
    return base + (" (ref. mode)" if method.endswith(REF_SUFFIX) else "")


def color(method: str, i: int = 0) -> str:
    """Plot colour: the method's, black for a reference-mode series."""
    if method.endswith(REF_SUFFIX):
        return "k"
    return METHOD_COLORS.get(method, f"C{i % 10}")


def linestyle(method: str) -> str:
    return "--" if method == "dpfpl-nores" else (":" if method.endswith(REF_SUFFIX) else "-")


def method_order(methods: Iterable[str]) -> list[str]:
    """Paper order, each reference-mode series right after its method."""
    ms = list(dict.fromkeys(methods))
    known = [m for b in METHOD_ORDER for m in (b, b + REF_SUFFIX) if m in ms]
    return known + sorted(m for m in ms if m not in known)


# ------------------------------------------------------------------------------------ rows

def _read_json(p: Path) -> Optional[dict[str, Any]]:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def collect_rows(cells: Sequence[Cell], runs_dir: Path) -> list[dict[str, Any]]:
    """One row per finished cell of the grid (cells without summary.json are left out)."""
    rows = []
    for c in cells:
        d = runs_dir / c.id
        summary = _read_json(d / "summary.json")
        if summary is None:
            continue
        bench = _read_json(d / "bench.json") or {}
        audit = _read_json(d / "audit.json") or {}
        key = c.key()
        row: dict[str, Any] = {
            "cell": c.id, "method": c.method, "epsilon": c.epsilon, "seed": c.seed, "dataset": key["dataset"],
            **{k: v for k, v in c.axes if k != "dataset"},
            "privacy": summary.get("privacy"), "local_acc": summary.get("local_acc"),
            "neighbor_acc": summary.get("neighbor_acc"), "wall_s": summary.get("wall_s"),
            "zeroshot_local_acc": summary.get("zeroshot_local_acc"),
            "zeroshot_neighbor_acc": summary.get("zeroshot_neighbor_acc"),
            "epsilon_target": summary.get("epsilon_target", c.epsilon),
            "epsilon_rdp": summary.get("epsilon_spent"), "epsilon_pld": summary.get("epsilon_pld"),
            "epsilon_claimed": summary.get("epsilon_claimed"),
            "audit_auc": audit.get("auc"), "audit_tpr_at_1pct_fpr": audit.get("tpr_at_1pct_fpr"),
            "audit_eps_lower_bound": audit.get("eps_lower_bound"), "audit_attack": audit.get("attack"),
            "rounds": summary.get("rounds"), "client_steps": summary.get("client_steps"),
            "train_s": summary.get("train_s"),
            **{k: bench.get(k) for k in ("cell_wall_s", "steps_per_s", "examples_per_s", "step_ms_median",
                                         "peak_mem_mb", "mem_kind", "device", "torch_threads")},
            "stopped_reason": summary.get("stopped_reason"), "run_dir": f"runs/{c.id}",
        }
        for k, v in summary.items():
            if k not in row and k not in _SKIP_SUMMARY and isinstance(v, (int, float, str, bool, type(None))):
                row[k] = v
        row["_roc"] = audit.get("roc")
        row["_roc_png"] = f"runs/{c.id}/audit/roc.png" if (d / "audit" / "roc.png").is_file() else None
        row["_audit_attacks"] = audit.get("attacks") or {}
        row["_axes"] = [k for k, _ in c.axes if k != "dataset"]
        rows.append(row)
    return rows


def runs_csv(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ",".join(CSV_COLUMNS) + "\n"
    extra = [k for r in rows for k in r if not k.startswith("_") and k not in CSV_COLUMNS]
    cols = CSV_COLUMNS[:5] + [k for k in dict.fromkeys(extra) if k in rows[0].get("_axes", [])] + CSV_COLUMNS[5:]
    cols += [k for k in dict.fromkeys(extra) if k not in cols]
    ordered = [{k: r.get(k) for k in cols} for r in rows]
    # rows_to_csv keeps columns in first-seen order; make every column appear in the first row
    return rows_to_csv(ordered)


# ------------------------------------------------------------------------------------ grouping

def _mean_std(xs: list[float]) -> tuple[float, float, int]:
    xs = [float(x) for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan"), 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0), len(xs)


def _row_key(r: dict[str, Any]) -> tuple:
    return (r["dataset"], *[(k, r.get(k)) for k in r.get("_axes", [])], r["epsilon"])


def _eps_sort(e: Optional[float]) -> float:
    return -math.inf if e is None else -e


def group(rows: list[dict[str, Any]], metric: str) -> "OrderedDict[tuple, dict[str, tuple[float, float, int]]]":
    """row key (dataset, axes..., eps) -> method -> (mean, std, n) of ``metric`` over seeds."""
    acc: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        acc[_row_key(r)][series(r)].append(r.get(metric))
    # zero-shot uses no data: its value holds at every eps of the same dataset/axes
    zs = {k[:-1]: v["zeroshot"] for k, v in acc.items() if "zeroshot" in v and k[-1] is None}
    for k, v in acc.items():
        if "zeroshot" not in v and k[:-1] in zs:
            v["zeroshot"] = zs[k[:-1]]
    datasets = list(dict.fromkeys(r["dataset"] for r in rows))
    keys = sorted(acc, key=lambda k: (datasets.index(k[0]), [_sortable(a[1]) for a in k[1:-1]], _eps_sort(k[-1])))
    return OrderedDict((k, {m: _mean_std(v) for m, v in acc[k].items()}) for k in keys)


def _sortable(v: Any) -> tuple:
    return (0, float(v), "") if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, 0.0, str(v))


def _fmt(mean: float, std: float, n: int, n_expected: int, scale: float = 100.0, digits: int = 1) -> str:
    if n == 0 or math.isnan(mean):
        return "-"
    s = f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"
    if n != n_expected:
        s += f" (n={n})"
    return s


def _ref_lookup(grid: GridSpec, table: str, key: tuple) -> dict[str, float]:
    """Published numbers for this row, by method."""
    row = {"dataset": key[0], **{a: v for a, v in key[1:-1]}, "epsilon": key[-1]}
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


# ------------------------------------------------------------------------------------ tables

def accuracy_table(rows: list[dict[str, Any]], metric: str, grid: GridSpec, title: str) -> str:
    table = "local" if metric == "local_acc" else "neighbor"
    grouped = group(rows, metric)
    methods = method_order(series(r) for r in rows)
    n_seeds = len(grid.seeds)
    ref_methods = [m for m in methods if any(ref.get("table") == table and m in ref.get("values", {})
                                             for ref in grid.reference)]
    axes = rows[0].get("_axes", []) if rows else []
    head = ["dataset", *axes, "eps"]
    for m in methods:
        head.append(label(m))
        if m in ref_methods:
            head.append(f"{label(m)} (paper)")
    lines = [f"### {title}", "",
             f"Mean ± std over seeds ({n_seeds} per cell unless marked n=), in %. "
             "Best mean of each row in bold. eps = none: non-private.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, vals in grouped.items():
        best = max((v[0] for v in vals.values() if v[2] and not math.isnan(v[0])), default=None)
        refs = _ref_lookup(grid, table, key)
        cells = [key[0], *[str(v) for _, v in key[1:-1]], eps_label(key[-1])]
        for m in methods:
            mean, std, n = vals.get(m, (float("nan"), float("nan"), 0))
            s = _fmt(mean, std, n, n_seeds)
            if best is not None and n and mean == best:
                s = f"**{s}**"
            cells.append(s)
            if m in ref_methods:
                cells.append(f"{refs[m]:.2f}" if m in refs else "")
        lines.append("| " + " | ".join(cells) + " |")
    if ref_methods and grid.reference_source:
        lines += ["", f"(paper): {grid.reference_source}."]
    if "zeroshot" in methods:
        lines += ["", "Zero-shot uses no training data, so its (non-private) accuracy is repeated on every eps row."]
    return "\n".join(lines) + "\n"


def _fmt_num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"


def _mean(xs: Iterable[Any]) -> Optional[float]:
    v = [float(x) for x in xs if x is not None and x != "" and not (isinstance(x, float) and math.isnan(x))]
    return statistics.fmean(v) if v else None


def privacy_table(rows: list[dict[str, Any]]) -> str:
    has_audit = any(r.get("audit_auc") is not None for r in rows)
    sel = [r for r in rows if r["epsilon"] is not None or (has_audit and r.get("audit_auc") is not None)]
    axes = rows[0].get("_axes", []) if rows else []
    head = ["dataset", *axes, "method", "eps target", "eps RDP", "eps PLD", "eps claimed", "noise mult. (local / global)"]
    if has_audit:
        head += ["audit AUC", "TPR@1%FPR", "empirical eps (lower bound)"]
    lines = ["### Privacy: target vs accounted vs claimed" + (" vs empirical" if has_audit else "") + " eps", "",
             "Accounted eps from dp-accounting (RDP and PLD) for the whole run, at the run's delta; "
             "'claimed' is the public code's closed-form eps (reference mode only). Mean over seeds.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in sel:
        groups[(r["dataset"], *[r.get(a) for a in axes], series(r), r["epsilon"])].append(r)
    order = method_order(series(r) for r in sel)
    for key in sorted(groups, key=lambda k: (str(k[0]), [_sortable(x) for x in k[1:-2]], order.index(k[-2]),
                                             _eps_sort(k[-1]))):
        g = groups[key]
        nl = _mean(r.get("noise_multiplier_local") for r in g)
        ng = _mean(r.get("noise_multiplier_global") for r in g)
        cells = [str(key[0]), *[str(x) for x in key[1:-2]], label(key[-2]), eps_label(key[-1]),
                 _fmt_num(_mean(r.get("epsilon_rdp") for r in g)), _fmt_num(_mean(r.get("epsilon_pld") for r in g)),
                 _fmt_num(_mean(r.get("epsilon_claimed") for r in g)), f"{_fmt_num(nl)} / {_fmt_num(ng)}"]
        if has_audit:
            cells += [_fmt_num(_mean(r.get("audit_auc") for r in g)),
                      _fmt_num(_mean(r.get("audit_tpr_at_1pct_fpr") for r in g)),
                      _fmt_num(_mean(r.get("audit_eps_lower_bound") for r in g))]
        lines.append("| " + " | ".join(cells) + " |")
    if not groups:
        lines.append("| (no private cells) |" + " |" * (len(head) - 1))
    return "\n".join(lines) + "\n"


def audit_verdict(a: dict[str, Any], r: dict[str, Any]) -> str:
    """The audits' own flags (:func:`audits.report.flag_attack`: a sound bound above the accountant's
    eps is a bug, above the claimed eps a refuted claim), else whether there was an eps to test."""
    flags = a.get("flags") or []
    if flags:
        return "; ".join(f"**{f.get('kind')}**" for f in flags)
    return "consistent" if r.get("privacy") in ("dp", "reference") else "no eps to test (non-private)"


def audit_table(rows: list[dict[str, Any]]) -> Optional[str]:
    """Every audited run x attack: AUC, TPR at 1% / 0.1% FPR, empirical eps lower bound, beside the
    accountant's eps (and the claim in reference mode). None when no run carries per-attack results."""
    audited = [r for r in rows if r.get("_audit_attacks")]
    if not audited:
        return None
    axes = rows[0].get("_axes", []) if rows else []
    head = ["dataset", *axes, "method", "seed", "eps target", "eps claimed", "eps accounted (RDP)", "attack", "AUC",
            "TPR@1%FPR", "TPR@0.1%FPR", "eps lower bound", "bound", "verdict"]
    lines = ["### Audits: every attack on every audited run", "",
             "Empirical eps lower bounds at the stated confidence (see each run's `audit/audit.md`), compared "
             "with the accountant's eps of the same run (and with the claim in reference mode). 'sound': "
             "randomised membership (canaries included by fair coins), the bound holds; 'indicative': members "
             "are the examples the run trained on, non-members test images (not randomised).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = method_order(series(r) for r in audited)
    audited.sort(key=lambda r: (str(r["dataset"]), [_sortable(r.get(a)) for a in axes], order.index(series(r)),
                                _eps_sort(r["epsilon"]), r["seed"]))
    for r in audited:
        for name, a in r["_audit_attacks"].items():
            conf = a.get("confidence")
            lb = a.get("eps_lower_bound")
            lines.append("| " + " | ".join([
                str(r["dataset"]), *[str(r.get(x)) for x in axes], label(series(r)), str(r["seed"]),
                eps_label(r["epsilon"]), _fmt_num(r.get("epsilon_claimed")), _fmt_num(r.get("epsilon_rdp")), name,
                _fmt_num(a.get("auc")), _fmt_num(a.get("tpr_at_1pct_fpr")), _fmt_num(a.get("tpr_at_0_1pct_fpr")),
                _fmt_num(lb) + (f" ({100 * conf:g}%)" if conf else ""),
                {True: "sound", False: "indicative"}.get(a.get("bound_sound"), "-"), audit_verdict(a, r)]) + " |")
    return "\n".join(lines) + "\n"


def _median(xs: Iterable[Any]) -> Optional[float]:
    v = [float(x) for x in xs if x is not None and x != ""]
    return statistics.median(v) if v else None


def cost_table(rows: list[dict[str, Any]]) -> str:
    head = ["method", "private", "cells", "step (ms, median)", "steps/s", "examples/s", "wall s (mean)",
            "peak memory (MB)", "device"]
    lines = ["### Cost per method, private or not", "",
             "Per-client-step time: median over rounds (first round dropped as warm-up) and then over cells; "
             "steps/s and examples/s (expected batch size x steps / training time) are medians over cells; peak "
             "memory is the process RSS on CPU, allocated tensors on CUDA (max over cells).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(series(r), r["epsilon"] is not None)].append(r)
    order = method_order(series(r) for r in rows)
    for key in sorted(groups, key=lambda k: (order.index(k[0]), k[1])):
        g = groups[key]
        mem = [r.get("peak_mem_mb") for r in g if r.get("peak_mem_mb") is not None]
        devices = sorted({str(r.get("device")) for r in g if r.get("device")})
        lines.append("| " + " | ".join([
            label(key[0]), "yes" if key[1] else "no", str(len(g)), _fmt_num(_median(r.get("step_ms_median") for r in g)),
            _fmt_num(_median(r.get("steps_per_s") for r in g)), _fmt_num(_median(r.get("examples_per_s") for r in g)),
            _fmt_num(_mean(r.get("wall_s") for r in g)), _fmt_num(max(mem) if mem else None, 4),
            "; ".join(devices) or "-"]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ plots

def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_acc_vs_eps(rows: list[dict[str, Any]], path: Path, max_panels: int = 12) -> Optional[Path]:
    """Local and neighbour accuracy vs eps per method (error bars: std over seeds)."""
    if not rows:
        return None
    panels = list(dict.fromkeys(_row_key(r)[:-1] for r in rows))[:max_panels]
    eps_vals = sorted({r["epsilon"] for r in rows if r["epsilon"] is not None})
    x_np = (max(eps_vals) * 4 if eps_vals else 1.0)  # where "non-private" is drawn
    methods = method_order(series(r) for r in rows)
    colors = {m: color(m, i) for i, m in enumerate(methods)}
    fig = _figure(10, 3.4 * len(panels))
    for pi, pkey in enumerate(panels):
        prow = [r for r in rows if _row_key(r)[:-1] == pkey]
        for mi, metric in enumerate(("local_acc", "neighbor_acc")):
            ax = fig.add_subplot(len(panels), 2, 2 * pi + mi + 1)
            g = group(prow, metric)
            for m in methods:
                pts = [(k[-1], v[m]) for k, v in g.items() if m in v and v[m][2]]
                if not pts:
                    continue
                if m == "zeroshot":
                    mean = pts[0][1][0]
                    ax.axhline(100 * mean, color=colors[m], ls=":", lw=1.2, label=label(m))
                    continue
                pts.sort(key=lambda p: x_np if p[0] is None else p[0])
                xs = [x_np if e is None else e for e, _ in pts]
                ys = [100 * s[0] for _, s in pts]
                es = [100 * s[1] for _, s in pts]
                ax.errorbar(xs, ys, yerr=es, marker="o", ms=4, capsize=2, color=colors[m], label=label(m),
                            ls=linestyle(m))
            ax.set_xscale("log")
            ticks = eps_vals + [x_np]
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{e:g}" for e in eps_vals] + ["none"])
            ax.minorticks_off()
            ax.set_xlabel("eps (delta 1e-5 unless set); 'none' = non-private")
            ax.set_ylabel(("local" if metric == "local_acc" else "neighbour") + " accuracy (%)")
            name = " ".join([str(pkey[0])] + [f"{a}={v}" for a, v in pkey[1:]])
            ax.set_title(f"{name}: {'local' if metric == 'local_acc' else 'neighbour'}", fontsize=10)
            ax.grid(alpha=0.3)
            if pi == 0 and mi == 1:
                ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


def plot_eps_accounting(rows: list[dict[str, Any]], path: Path) -> Optional[Path]:
    """Target (or claimed) eps vs accounted RDP / PLD eps (and the audits' empirical lower bound):
    colour = method, marker = which eps. Zero lower bounds are drawn on the bottom edge."""
    priv = [r for r in rows if r["epsilon"] is not None and (r.get("epsilon_rdp") is not None or
                                                             r.get("epsilon_pld") is not None)]
    if not priv:
        return None
    from matplotlib.lines import Line2D

    methods = method_order(series(r) for r in priv)
    kinds = [("epsilon_rdp", "accounted (RDP)", "o", "-"), ("epsilon_pld", "accounted (PLD)", "x", ":"),
              ("audit_eps_lower_bound", "empirical (audit lower bound)", "v", "none")]
    pts: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in priv:
        x = r.get("epsilon_claimed") or r["epsilon"]
        for key, *_ in kinds:
            if r.get(key) is not None:
                pts[(series(r), key)][float(x)].append(float(r[key]))
    pos = [y for d in pts.values() for ys in d.values() for y in ys if y > 0] + \
          [x for d in pts.values() for x in d]
    lo, hi = min(pos) / 3, max(pos) * 3
    fig = _figure(6.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    any_zero = False
    for mi, m in enumerate(methods):
        for key, _, marker, ls in kinds:
            d = pts.get((m, key))
            if not d:
                continue
            xs = sorted(d)
            ys = [statistics.fmean(d[x]) for x in xs]
            any_zero |= any(y <= 0 for y in ys)
            ax.plot(xs, [y if y > 0 else lo for y in ys], marker=marker, ls=ls, color=color(m, mi), ms=6,
                    mfc="none" if marker == "v" else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.5, hi)
    ref = any(r.get("epsilon_claimed") is not None for r in priv)
    ax.set_xlabel("target eps" + (" (reference mode: claimed eps)" if ref else ""))
    ax.set_ylabel("eps" + (" (lower bound 0 drawn on the bottom edge)" if any_zero else ""))
    has_emp = any(r.get("audit_eps_lower_bound") is not None for r in priv)
    ax.set_title(("Target / claimed" if ref else "Target") + " vs accounted" + (" vs empirical" if has_emp else "") + " eps")
    ax.grid(alpha=0.3, which="both")
    used = [s for s in kinds if any(k == s[0] for (_, k) in pts)]
    h1 = [Line2D([], [], color=color(m, i), lw=2, label=label(m)) for i, m in enumerate(methods)]
    h2 = [Line2D([], [], color="grey", marker=mk, ls=ls, label=name, mfc="none" if mk == "v" else None)
          for _, name, mk, ls in used] + [Line2D([], [], color="k", ls="--", lw=0.8, label="y = x")]
    leg = ax.legend(handles=h1, fontsize=7, loc="upper left")
    ax.add_artist(leg)
    ax.legend(handles=h2, fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_rocs(rows: list[dict[str, Any]], path: Path, max_curves: int = 10) -> Optional[Path]:
    """ROC curves of the audits (first seed of each method x eps), when they carry curves."""
    curves = {}
    order = method_order(series(x) for x in rows)
    for r in sorted(rows, key=lambda r: (order.index(series(r)), _eps_sort(r["epsilon"]), r["seed"])):
        roc = r.get("_roc")
        name = f"{label(series(r))} eps {eps_label(r['epsilon'])}"
        if roc and name not in curves and len(curves) < max_curves:
            curves[name] = (roc["fpr"], roc["tpr"])
    if not curves:
        return None
    try:
        from audits.plots import plot_roc
    except ImportError:
        return None
    return Path(plot_roc(curves, path, title="Membership-inference audit ROC"))


# ------------------------------------------------------------------------------------ README

def _grid_lines(grid: GridSpec, cells: Sequence[Cell]) -> list[str]:
    base = ", ".join(f"{k}={v}" for k, v in grid.base.items())
    lines = [f"- **Grid** `{grid.name}` (preset: {grid.description})" if grid.description else f"- **Grid** `{grid.name}`",
             f"- {len(cells)} cells: methods {', '.join(grid.methods)}; eps "
             f"{', '.join(eps_label(e) for e in grid.epsilons)} (private cells: {grid.private_mode} mode); "
             f"seeds {', '.join(map(str, grid.seeds))}"
             + "".join(f"; {k} {', '.join(map(str, v))}" for k, v in grid.axes.items())]
    for b in grid.blocks:
        lines.append(f"- block {b.get('name', '')}: " + "; ".join(f"{k} {v}" for k, v in b.items() if k != "name"))
    lines.append(f"- settings: {base}")
    if grid.private_base:
        lines.append("- private cells only: " + ", ".join(f"{k}={v}" for k, v in grid.private_base.items()))
    if grid.nonprivate_base:
        lines.append("- non-private cells only: " + ", ".join(f"{k}={v}" for k, v in grid.nonprivate_base.items()))
    if grid.dataset_options:
        lines.append("- dataset options: " + ", ".join(f"{k}={v}" for k, v in grid.dataset_options.items()))
    return lines


def _cpus() -> int:
    from .harness import available_cpus

    return available_cpus()


def readme(out: Path, grid: GridSpec, cells: Sequence[Cell], rows: list[dict[str, Any]], tables: dict[str, str],
           plots: dict[str, Optional[Path]], command: Optional[str], result: Any = None) -> str:
    devices = sorted({str(r.get("device")) for r in rows if r.get("device")})
    finished = len(rows)
    total_cell_s = sum(float(r.get("cell_wall_s") or r.get("wall_s") or 0) for r in rows)
    lines = [f"# dpfpl bench: `{grid.name}`", "",
             f"Produced by `{command or 'dpfpl bench --preset ' + grid.name}` "
             f"(run from the repository root; a rerun skips finished cells).", ""]
    lines += _grid_lines(grid, cells)
    lines += [f"- finished cells: {finished} of {len(cells)}; device: {'; '.join(devices) or '-'}",
              f"- sum of cell wall times: {total_cell_s:.1f} s"]
    inv = out / "invocation.json"
    if result is not None:
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
        lines.append(line)
    elif (prev := _read_json(inv)) is not None:  # --report-only: keep the producing run's figures
        lines.append(prev["line"])
    lines.append(f"- written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    if grid.notes:
        lines += ["", "Notes on the preset:", ""] + [f"- {n}" for n in grid.notes]
    lines += ["", "## Accuracy", "", tables["local"], tables["neighbor"], "## Privacy", "", tables["privacy"]]
    if "audit" in tables:
        lines += [tables["audit"]]
    lines += ["## Cost", "", tables["cost"], "## Plots", ""]
    for name, p in plots.items():
        if p is not None:
            lines += [f"![{name}]({p.name})", ""]
    if plots.get("audit ROC") is None:
        lines += roc_links(rows)
    lines += ["## Files", "", "- `runs.csv`: one row per run (accuracies as fractions; eps blank = non-private)",
              "- `table_local.md`, `table_neighbor.md`, `table_privacy.md`, `table_cost.md`"
              + (", `table_audit.md`" if "audit" in tables else ""),
              "- `runs/<cell>/`: each run directory (config, metrics, ledger, prompts, summary) with `cell.json`, "
              "`bench.json` (device, timings, memory) and `audit.json` when audited", ""]
    return "\n".join(lines)


def roc_links(rows: list[dict[str, Any]]) -> list[str]:
    """Links to the per-run audit ROC plots (method x eps, first audited seed)."""
    have = [r for r in rows if r.get("_roc_png")]
    if not have:
        return []
    eps = sorted({r["epsilon"] for r in have}, key=_eps_sort)
    methods = method_order(series(r) for r in have)
    first: dict[tuple, dict[str, Any]] = {}
    for r in sorted(have, key=lambda r: r["seed"]):
        first.setdefault((_row_key(r)[:-1], series(r), r["epsilon"]), r)
    lines = ["Membership-inference audit ROC curves (one plot per run; first audited seed):", "",
             "| method | " + " | ".join(f"eps {eps_label(e)}" for e in eps) + " |", "|" + "---|" * (len(eps) + 1)]
    for pkey in dict.fromkeys(_row_key(r)[:-1] for r in have):
        for m in methods:
            cells = []
            for e in eps:
                r = first.get((pkey, m, e))
                cells.append(f"[AUC {r['audit_auc']:.2f}]({r['_roc_png']})" if r and r.get("audit_auc") is not None
                             else (f"[ROC]({r['_roc_png']})" if r else ""))
            name = label(m) if len(pkey) == 1 else f"{label(m)} ({' '.join(str(x) for x in pkey)})"
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_report(out: str | Path, grid: GridSpec, cells: Sequence[Cell], command: Optional[str] = None,
                 result: Any = None) -> dict[str, Path]:
    """Rebuild every report file of ``out`` from its run directories; returns the paths written."""
    out = Path(out)
    rows = collect_rows(cells, out / "runs")
    files: dict[str, Path] = {}
    atomic_write_bytes(out / "runs.csv", runs_csv(rows).encode())
    files["runs.csv"] = out / "runs.csv"
    tables = {"local": accuracy_table(rows, "local_acc", grid, "Local accuracy (test images of each client's classes)"),
              "neighbor": accuracy_table(rows, "neighbor_acc", grid,
                                         "Neighbour accuracy (test images of the other clients' classes)"),
              "privacy": privacy_table(rows), "cost": cost_table(rows)}
    audits = audit_table(rows)
    if audits is not None:
        tables["audit"] = audits
    elif (out / "table_audit.md").exists():
        (out / "table_audit.md").unlink()
    for name, text in tables.items():
        p = out / f"table_{name}.md"
        atomic_write_bytes(p, text.encode())
        files[p.name] = p
    plots = {"accuracy vs eps": plot_acc_vs_eps(rows, out / "acc_vs_eps.png"),
             "eps: claimed / target vs accounted vs empirical": plot_eps_accounting(rows, out / "eps_accounting.png"),
             "audit ROC": plot_rocs(rows, out / "roc.png")}
    for p in plots.values():
        if p is not None:
            files[p.name] = p
    for stale in ("acc_vs_eps.png", "eps_accounting.png", "roc.png"):
        if stale not in files and (out / stale).exists():
            (out / stale).unlink()
    text = readme(out, grid, cells, rows, tables, plots, command, result)
    atomic_write_bytes(out / "README.md", text.encode())
    files["README.md"] = out / "README.md"
    return files
