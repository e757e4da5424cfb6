"""The report's tables, computed from a runs frame (:mod:`bench.frames`) with pandas.

Each builder returns a :class:`Table`: display strings (``body``), which cells are bold, and the
numbers behind them (``data``, written as CSV); :mod:`bench.render` writes Markdown and LaTeX.

Accuracy tables (:func:`accuracy_table`): rows dataset [x axes] x privacy level, columns series;
each cell is the mean over seeds with the half-width of its 95% t-interval (:mod:`bench.stats`),
in %. A row's best mean is bold only where the paired t-test over seeds of best vs runner-up
gives p < 0.05. The last column lists the baselines DP-FPL beats (``>``) or loses to (``<``)
significantly (paired t-test, p < 0.05); :func:`significance_table` gives every such difference
with its interval and p-value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from .frames import row_keys, sort_rows, with_zeroshot_everywhere
from .labels import PROPOSED, label, level_label, series_order
from .stats import ALPHA, Paired, paired_test, summarize

#: Published numbers for a row: row key dict -> {series: value in %}.
Reference = Callable[[dict[str, Any]], dict[str, float]]


@dataclass
class Table:
    name: str                                  # files: table_<name>.md / .tex / .csv
    title: str
    caption: str
    body: pd.DataFrame                         # display strings, columns = headers
    bold: Optional[pd.DataFrame] = None        # same shape as body
    data: Optional[pd.DataFrame] = None        # the numbers (CSV); default: body
    notes: list[str] = field(default_factory=list)


def fmt_num(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "∞" if x > 0 else "-∞"
    return f"{x:.{digits}g}"


def fmt_ci(mean: float, half: float, n: int, n_expected: int, scale: float = 100.0, digits: int = 1) -> str:
    """``mean ± half`` (scaled), ``(n=k)`` appended when n differs from the expected seed count."""
    if n == 0 or math.isnan(mean):
        return "-"
    s = f"{scale * mean:.{digits}f}" + ("" if math.isnan(half) else f" ± {scale * half:.{digits}f}")
    return s + (f" (n={n})" if n != n_expected else "")


def _key_cells(key: dict[str, Any], axes: list[str]) -> list[str]:
    return [str(key["dataset"]), *[str(key[a]) for a in axes], level_label(key["level"])]


def _key_heads(axes: list[str]) -> list[str]:
    return ["dataset", *axes, "eps"]


def per_seed(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Rows (dataset, axes..., level, seed), columns series: ``metric`` per seed (zero-shot on
    every level)."""
    d = with_zeroshot_everywhere(df)
    d = d.assign(**{metric: pd.to_numeric(d[metric], errors="coerce")})
    return d.pivot_table(index=row_keys(df) + ["seed"], columns="series", values=metric, aggfunc="mean",
                         dropna=False)


def _row_groups(df: pd.DataFrame, metric: str):
    """(row key dict, seeds x series frame) in report order."""
    if df.empty:
        return
    wide = per_seed(df, metric)
    keys = row_keys(df)
    axes = df.attrs.get("axes", [])
    index = wide.index.droplevel("seed").unique().to_frame(index=False)
    index = sort_rows(index, list(dict.fromkeys(df["dataset"])), axes)
    for rec in index.to_dict("records"):
        sel = tuple(rec[k] for k in keys)
        g = wide.xs(sel, level=keys) if len(keys) > 0 else wide
        yield rec, g.dropna(axis=1, how="all")


def best_is_significant(g: pd.DataFrame, alpha: float = ALPHA) -> Optional[tuple[str, Paired]]:
    """The series with the highest mean in ``g`` (seeds x series) and its paired test against the
    runner-up, or None when fewer than two series have values."""
    means = g.mean().dropna().sort_values(ascending=False, kind="stable")
    if len(means) < 2:
        return None
    best, second = means.index[0], means.index[1]
    return best, paired_test(g[best], g[second], alpha)


def accuracy_table(df: pd.DataFrame, metric: str, title: str, name: str, n_expected: int,
                   reference: Optional[Reference] = None, reference_source: str = "",
                   alpha: float = ALPHA) -> Table:
    """See the module doc. ``reference``: published numbers shown in "(paper)" columns."""
    axes = df.attrs.get("axes", [])
    methods = series_order(df["series"])
    groups = list(_row_groups(df, metric)) if len(df) else []
    refs = [reference(k) if reference else {} for k, _ in groups]
    ref_methods = [m for m in methods if any(m in r for r in refs)]
    heads = _key_heads(axes)
    for m in methods:
        heads.append(label(m))
        if m in ref_methods:
            heads.append(f"{label(m)} (paper)")
    sig_head = f"{label(PROPOSED)} vs baselines (p<{alpha:g})"
    has_sig = PROPOSED in methods and len(methods) > 1
    if has_sig:
        heads.append(sig_head)
    body, bold, data = [], [], []
    for (key, g), ref in zip(groups, refs):
        stats = summarize(g.reset_index().melt(id_vars="seed", var_name="series", value_name="v"), ["series"], "v")
        stats = stats.set_index("series")
        top = best_is_significant(g, alpha)
        cells, marks = _key_cells(key, axes), [False] * (len(axes) + 2)
        for m in methods:
            mean, half, n = ((stats.at[m, "mean"], stats.at[m, "ci"], int(stats.at[m, "n"])) if m in stats.index
                             else (math.nan, math.nan, 0))
            is_best = top is not None and top[0] == m and top[1].significant(alpha)
            cells.append(fmt_ci(mean, half, n, n_expected))
            marks.append(bool(is_best))
            rec = {**key, "series": m, "n": n, "mean_pct": 100 * mean, "ci95_pct": 100 * half,
                   "best_significant": bool(is_best),
                   "p_best_vs_runner_up": top[1].p if top is not None and top[0] == m else math.nan}
            if m in ref_methods:
                cells.append(f"{ref[m]:.2f}" if m in ref else "")
                marks.append(False)
                rec["paper_pct"] = ref.get(m, math.nan)
            if has_sig and m != PROPOSED and PROPOSED in g and m in g:
                pt = paired_test(g[PROPOSED], g[m], alpha)
                rec.update({"dpfpl_minus_pct": 100 * pt.diff, "dpfpl_minus_ci95_pct": 100 * pt.half,
                            "p_dpfpl_vs": pt.p})
            data.append(rec)
        if has_sig:
            cells.append(_sig_summary(g, methods, alpha))
            marks.append(False)
        body.append(cells)
        bold.append(marks)
    caption = (f"Mean over seeds ± half-width of the 95% t-interval (t_{{0.975,n-1}} s / sqrt(n)), in %; "
               f"{n_expected} seeds per cell unless marked n=. Bold: the row's best mean, only where the paired "
               f"t-test over seeds (same seed = same split for every method) against the runner-up gives "
               f"p < {alpha:g}. eps 'none': raw non-private training; 'clipped, no noise': the private cells' "
               "clipping, sampling and learning rate without noise (eps = ∞).")
    notes = []
    if ref_methods and reference_source:
        notes.append(f"(paper): {reference_source}.")
    if "zeroshot" in methods:
        notes.append("Zero-shot uses no training data, so its (non-private) accuracy is repeated on every eps row.")
    if has_sig:
        notes.append(f"Last column: baselines {label(PROPOSED)} beats (>) or loses to (<) with p < {alpha:g} "
                     "(paired t-test over seeds); the differences are in the matching `_vs_dpfpl` table.")
    return Table(name, title, caption, pd.DataFrame(body, columns=heads), pd.DataFrame(bold, columns=heads),
                 pd.DataFrame(data), notes)


def _sig_summary(g: pd.DataFrame, methods: list[str], alpha: float) -> str:
    if PROPOSED not in g:
        return "-"
    better, worse = [], []
    for m in methods:
        if m == PROPOSED or m not in g:
            continue
        pt = paired_test(g[PROPOSED], g[m], alpha)
        if pt.significant(alpha):
            (better if pt.diff > 0 else worse).append(label(m))
    parts = ([f"> {', '.join(better)}"] if better else []) + ([f"< {', '.join(worse)}"] if worse else [])
    return "; ".join(parts) or "none significant"


def significance_table(df: pd.DataFrame, metric: str, title: str, name: str, alpha: float = ALPHA) -> Optional[Table]:
    """DP-FPL minus each baseline per row: mean paired difference ± its 95% t-interval, in points,
    and the paired t-test's p-value; bold where p < alpha. None without DP-FPL runs."""
    if PROPOSED not in set(df["series"]):
        return None
    axes = df.attrs.get("axes", [])
    others = [m for m in series_order(df["series"]) if m != PROPOSED]
    heads = _key_heads(axes) + [f"vs {label(m)}" for m in others]
    body, bold, data = [], [], []
    for key, g in _row_groups(df, metric):
        cells, marks = _key_cells(key, axes), [False] * (len(axes) + 2)
        for m in others:
            if PROPOSED not in g or m not in g:
                cells.append("-")
                marks.append(False)
                continue
            pt = paired_test(g[PROPOSED], g[m], alpha)
            half = "" if math.isnan(pt.half) else f" ± {100 * pt.half:.1f}"
            cells.append(f"{100 * pt.diff:+.1f}{half} (p={fmt_num(pt.p, 2)})" if pt.n else "-")
            marks.append(pt.significant(alpha))
            data.append({**key, "series": m, "n_pairs": pt.n, "diff_pct": 100 * pt.diff, "ci95_pct": 100 * pt.half,
                         "p": pt.p, "significant": pt.significant(alpha)})
        body.append(cells)
        bold.append(marks)
    caption = (f"{label(PROPOSED)} minus each baseline, in accuracy points: mean of the per-seed differences ± "
               f"half-width of its 95% t-interval, and the two-sided paired t-test's p-value over the seeds both ran; "
               f"bold where p < {alpha:g}.")
    return Table(name, title, caption, pd.DataFrame(body, columns=heads), pd.DataFrame(bold, columns=heads),
                 pd.DataFrame(data))


def _mean_col(g: pd.DataFrame, col: str) -> float:
    if col not in g.columns:
        return math.nan
    v = pd.to_numeric(g[col], errors="coerce")
    v = v[v.notna()]
    return float(v.mean()) if len(v) else math.nan


def privacy_table(df: pd.DataFrame) -> Table:
    """Per dataset [x axes] x series x level (private levels, and audited non-private ones):
    target eps, accounted eps by RDP and by PLD side by side, the accountant that calibrated the
    noise (when summary.json says), the claimed eps (reference mode), noise multipliers and the
    audits. Means over seeds; a field absent from every run shows as '-'."""
    axes = df.attrs.get("axes", [])
    has_audit = "audit_auc" in df.columns and df["audit_auc"].notna().any()
    sel = df[(df["level"] != "none") | (has_audit & df.get("audit_auc", pd.Series(index=df.index)).notna())]
    has_acc = "accountant" in df.columns and df["accountant"].notna().any()
    heads = ["dataset", *axes, "method", "eps target", "eps RDP", "eps PLD"] + (["calibrated by"] if has_acc else []) \
        + ["eps claimed", "noise mult. (local / global)"]
    has_mech = "mechanism_eps_lower_bound" in df.columns and df["mechanism_eps_lower_bound"].notna().any()
    if has_audit:
        heads += ["audit AUC", "TPR@1%FPR", "empirical eps (lower bound)"]
    if has_mech:
        heads += ["mechanism audit eps (sound lower bound)"]
    body, data = [], []
    order = series_order(df["series"])
    if len(sel):
        keys = ["dataset", *axes, "series", "level"]
        groups = sel.groupby(keys, sort=False, dropna=False)
        idx = pd.DataFrame(list(groups.groups), columns=keys)
        idx["_s"] = [order.index(s) for s in idx["series"]]
        idx = sort_rows(idx.sort_values("_s", kind="stable"), list(dict.fromkeys(df["dataset"])), axes + ["_s"])
        for rec in idx.drop(columns="_s").to_dict("records"):
            g = groups.get_group(tuple(rec[k] for k in keys))
            vals = {c: _mean_col(g, c) for c in ("epsilon_rdp", "epsilon_pld", "epsilon_claimed",
                                                 "noise_multiplier_local", "noise_multiplier_global", "audit_auc",
                                                 "audit_tpr_at_1pct_fpr", "audit_eps_lower_bound",
                                                 "mechanism_eps_lower_bound")}
            acc = ", ".join(sorted({str(a) for a in g["accountant"].dropna()})) if has_acc else None
            cells = [str(rec["dataset"]), *[str(rec[a]) for a in axes], label(rec["series"]), level_label(rec["level"]),
                     fmt_num(vals["epsilon_rdp"]), fmt_num(vals["epsilon_pld"])] + ([acc or "-"] if has_acc else []) + \
                [fmt_num(vals["epsilon_claimed"]),
                 f"{fmt_num(vals['noise_multiplier_local'])} / {fmt_num(vals['noise_multiplier_global'])}"]
            if has_audit:
                cells += [fmt_num(vals["audit_auc"]), fmt_num(vals["audit_tpr_at_1pct_fpr"]),
                          fmt_num(vals["audit_eps_lower_bound"])]
            if has_mech:
                cells += [fmt_num(vals["mechanism_eps_lower_bound"])]
            body.append(cells)
            data.append({**rec, "n": len(g), **vals, **({"accountant": acc} if has_acc else {})})
    caption = ("Accounted eps for the whole run at the run's delta, by the RDP and the PLD accountant (dp-accounting) "
               "side by side" + ("; 'calibrated by': the accountant the noise was calibrated with" if has_acc else "")
               + "; 'claimed': the public code's closed-form eps (reference mode only); 'clipped, no noise' runs "
               "have eps = ∞" + ("; 'mechanism audit': the sound lower bound of the run's own release code on its "
                                  "worst case (`dpfpl audit RUN --attack mechanism`), to compare with the accounted "
                                  "eps (DP mode) or the claim (reference mode)" if has_mech else "")
               + ". Means over seeds.")
    return Table("privacy", "Privacy: target vs accounted" + (" vs empirical" if has_audit else "") + " eps", caption,
                 pd.DataFrame(body, columns=heads), data=pd.DataFrame(data))


def cost_table(df: pd.DataFrame) -> Table:
    """Per series x private-or-not: cells, median step time / steps/s / examples/s, mean wall time,
    max peak memory, devices."""
    heads = ["method", "private", "cells", "step (ms, median)", "steps/s", "examples/s", "wall s (mean)",
             "peak memory (MB)", "device"]
    body, data = [], []
    if len(df):
        d = df.assign(private=df["level"] != "none")
        order = series_order(df["series"])
        for (s, priv), g in sorted(d.groupby(["series", "private"]), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
            med = {c: float(pd.to_numeric(g[c], errors="coerce").median()) if c in g else math.nan
                   for c in ("step_ms_median", "steps_per_s", "examples_per_s")}
            mem = pd.to_numeric(g.get("peak_mem_mb", pd.Series(dtype=float)), errors="coerce").max()
            wall = _mean_col(g, "wall_s")
            devices = "; ".join(sorted({str(x) for x in g.get("device", pd.Series(dtype=object)).dropna()})) or "-"
            body.append([label(s), "yes" if priv else "no", str(len(g)), fmt_num(med["step_ms_median"]),
                         fmt_num(med["steps_per_s"]), fmt_num(med["examples_per_s"]), fmt_num(wall),
                         fmt_num(float(mem) if pd.notna(mem) else math.nan, 4), devices])
            data.append({"series": s, "private": bool(priv), "cells": len(g), **med, "wall_s_mean": wall,
                         "peak_mem_mb_max": mem, "device": devices})
    caption = ("Per-client-step time: median over rounds (first round dropped as warm-up) and then over cells; "
               "steps/s and examples/s (expected batch size x steps / training time) are medians over cells; peak "
               "memory is the process RSS on CPU, allocated tensors on CUDA (max over cells). 'private' includes "
               "the clipped-no-noise cells (same per-example gradients).")
    return Table("cost", "Cost per method, private or not", caption, pd.DataFrame(body, columns=heads),
                 data=pd.DataFrame(data))


def audit_verdict(a: dict[str, Any], privacy: Any) -> str:
    """The audits' own flags (:func:`audits.report.flag_attack`), else whether there was an eps to test."""
    flags = a.get("flags") or []
    if flags:
        return "; ".join(str(f.get("kind")) for f in flags)
    return "consistent" if privacy in ("dp", "reference") else "no eps to test (non-private)"


def audit_table(df: pd.DataFrame) -> Optional[Table]:
    """Every audited run x attack: AUC, TPR at 1% / 0.1% FPR, empirical eps lower bound, beside the
    accountant's eps (and the claim). None when no run carries per-attack results."""
    if "_audit_attacks" not in df.columns:
        return None
    audited = df[[bool(a) for a in df["_audit_attacks"]]]
    if audited.empty:
        return None
    axes = df.attrs.get("axes", [])
    order = series_order(df["series"])
    audited = audited.assign(_s=[order.index(s) for s in audited["series"]])
    audited = audited.sort_values(["dataset", *axes, "_s", "level_key", "seed"], kind="stable")
    heads = ["dataset", *axes, "method", "seed", "eps target", "eps claimed", "eps RDP", "eps PLD", "attack", "AUC",
             "TPR@1%FPR", "TPR@0.1%FPR", "eps lower bound", "bound", "verdict"]
    body, bold, data = [], [], []
    for r in audited.to_dict("records"):
        for att, a in r["_audit_attacks"].items():
            conf, lb = a.get("confidence"), a.get("eps_lower_bound")
            verdict = audit_verdict(a, r.get("privacy"))
            body.append([str(r["dataset"]), *[str(r[x]) for x in axes], label(r["series"]), str(r["seed"]),
                         level_label(r["level"]), fmt_num(r.get("epsilon_claimed")), fmt_num(r.get("epsilon_rdp")),
                         fmt_num(r.get("epsilon_pld")), att, fmt_num(a.get("auc")), fmt_num(a.get("tpr_at_1pct_fpr")),
                         fmt_num(a.get("tpr_at_0_1pct_fpr")), fmt_num(lb) + (f" ({100 * conf:g}%)" if conf else ""),
                         {True: "sound", False: "indicative"}.get(a.get("bound_sound"), "-"), verdict])
            bold.append([False] * (len(heads) - 1) + [bool(a.get("flags"))])
            data.append({"cell": r["cell"], "attack": att, **{k: a.get(k) for k in
                         ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "eps_lower_bound", "confidence",
                          "bound_sound")}, "verdict": verdict})
    caption = ("Empirical eps lower bounds at the stated confidence (see each run's audit/audit.md), beside the "
               "accountant's eps of the same run (and the claim in reference mode). 'sound': randomised membership "
               "(canaries included by fair coins), the bound holds; 'indicative': members are the examples the run "
               "trained on, non-members test images (not randomised). Bold verdict: flagged by the audits.")
    return Table("audit", "Audits: every attack on every audited run", caption, pd.DataFrame(body, columns=heads),
                 pd.DataFrame(bold, columns=heads), pd.DataFrame(data))


def value_or_nan(x: Any) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return np.nan


def tuning_table(df: pd.DataFrame, param: str = "lr", metric: str = "val_local_acc",
                 test_metric: str = "local_acc") -> Optional[Table]:
    """The hyperparameter sweep's choice: per dataset [x other axes] x series x level, the value of
    ``param`` with the highest mean ``metric`` (validation accuracy) over seeds, its mean ± 95%
    t-interval, the runner-up value, and, for information only (never used to choose), the test
    accuracy at the chosen value. None unless ``param`` is a grid axis and ``metric`` was measured."""
    axes = df.attrs.get("axes", [])
    if param not in axes or metric not in df.columns or not pd.to_numeric(df[metric], errors="coerce").notna().any():
        return None
    other = [a for a in axes if a != param]
    keys = ["dataset", *other, "series", "level"]
    st = summarize(df, keys + [param], metric)
    test = summarize(df, keys + [param], test_metric).set_index(keys + [param])
    order = series_order(df["series"])
    heads = ["dataset", *other, "method", "eps", f"chosen {param}", f"validation acc. at chosen {param}",
             f"runner-up {param} (val. acc.)", f"{param} values tried", f"test acc. at chosen {param} (not used)"]
    body, data = [], []
    groups = st.groupby(keys, sort=False, dropna=False)
    idx = pd.DataFrame(list(groups.groups), columns=keys)
    idx["_s"] = [order.index(s) for s in idx["series"]]
    idx = sort_rows(idx.sort_values("_s", kind="stable"), list(dict.fromkeys(df["dataset"])), other + ["_s"])
    n_max = int(st["n"].max()) if len(st) else 0
    for rec in idx.drop(columns="_s").to_dict("records"):
        g = groups.get_group(tuple(rec[k] for k in keys)).sort_values("mean", ascending=False, kind="stable")
        best = g.iloc[0]
        runner = g.iloc[1] if len(g) > 1 else None
        tk = tuple(rec[k] for k in keys) + (best[param],)
        t_mean, t_ci, t_n = ((test.loc[tk, "mean"], test.loc[tk, "ci"], int(test.loc[tk, "n"])) if tk in test.index
                             else (math.nan, math.nan, 0))
        body.append([str(rec["dataset"]), *[str(rec[a]) for a in other], label(rec["series"]), level_label(rec["level"]),
                     f"{best[param]:g}", fmt_ci(best["mean"], best["ci"], int(best["n"]), n_max),
                     f"{runner[param]:g} ({100 * runner['mean']:.1f})" if runner is not None else "-",
                     ", ".join(f"{v:g}" for v in sorted(g[param])), fmt_ci(t_mean, t_ci, t_n, n_max)])
        data.append({**rec, f"chosen_{param}": best[param], "val_mean_pct": 100 * best["mean"],
                     "val_ci95_pct": 100 * best["ci"], "n": int(best["n"]),
                     f"runner_up_{param}": runner[param] if runner is not None else math.nan,
                     "test_mean_pct_at_chosen": 100 * t_mean})
    caption = (f"{param} chosen per method x privacy level by the highest mean validation accuracy (each client's "
               "held-out training images, data.val_fraction) over the sweep's seeds; mean ± 95% t-interval, in %. "
               "The test accuracy is shown for information and never used to choose.")
    return Table(f"{param}_choice", f"Sweep: {param} chosen on validation accuracy", caption,
                 pd.DataFrame(body, columns=heads), data=pd.DataFrame(data))


def tuned_mapping(t: Table, param: str = "lr") -> dict[str, dict[str, float]]:
    """A :func:`tuning_table` as :attr:`bench.grid.GridSpec.tuned` (``method:<level>`` -> {param: value})."""
    out: dict[str, dict[str, float]] = {}
    if t.data is None:
        return out
    for r in t.data.to_dict("records"):
        out[f"{r['series']}:{r['level']}"] = {param: float(r[f"chosen_{param}"])}
    return out
