"""The report's plots, for one result folder or several overlaid (``dpfpl report``).

Every function takes ``frames``: folder label -> runs frame (:mod:`bench.frames`); with several
folders each gets its own marker / line style and its label in the legend.

- :func:`plot_acc_vs_eps`: local and neighbour accuracy vs eps per series; error bars are 95%
  t-intervals over seeds; "clipped, no noise" (eps = ∞) and "none" (raw non-private) are drawn
  right of the largest eps, in that order.
- :func:`plot_eps_accounting`: target (or claimed) eps vs the accounted RDP and PLD eps and the
  audits' empirical lower bounds (membership attacks; the mechanism audit's sound bound), one point
  per series x level (mean over seeds).
- :func:`plot_rocs`: the audits' ROC curves (first seed of each series x level).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from dpfpl.rundir import atomic_write_bytes

from .frames import with_zeroshot_everywhere
from .labels import CLIP, NONE, color, label, level_label, linestyle, series_order
from .stats import summarize

FOLDER_MARKERS = ["o", "s", "^", "D", "v", "P"]
FOLDER_STYLES = ["-", "--", "-.", ":"]


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())
    return path


def _panels(frames: dict[str, pd.DataFrame]) -> list[tuple]:
    keys: list[tuple] = []
    for df in frames.values():
        cols = ["dataset", *df.attrs.get("axes", [])]
        for rec in df[cols].drop_duplicates().itertuples(index=False):
            if tuple(rec) not in keys:
                keys.append(tuple(rec))
    return keys


def plot_acc_vs_eps(frames: dict[str, pd.DataFrame], path: Path, max_panels: int = 12) -> Optional[Path]:
    frames = {k: v for k, v in frames.items() if len(v)}
    if not frames:
        return None
    panels = _panels(frames)[:max_panels]
    eps_vals = sorted({float(lv) for df in frames.values() for lv in df["level"] if lv not in (NONE, CLIP)})
    top = max(eps_vals) if eps_vals else 1.0
    x_of = {CLIP: top * 4, NONE: top * 16}
    has = {lv for df in frames.values() for lv in df["level"]}
    methods = series_order(s for df in frames.values() for s in df["series"])
    many = len(frames) > 1
    fig = _figure(10, 3.4 * len(panels))
    for pi, pkey in enumerate(panels):
        for mi, metric in enumerate(("local_acc", "neighbor_acc")):
            ax = fig.add_subplot(len(panels), 2, 2 * pi + mi + 1)
            for fi, (fname, df) in enumerate(frames.items()):
                cols = ["dataset", *df.attrs.get("axes", [])]
                sub = df[[tuple(r) == pkey for r in df[cols].itertuples(index=False)]] if len(cols) else df
                if sub.empty or metric not in sub:
                    continue
                st = summarize(with_zeroshot_everywhere(sub), ["series", "level"], metric)
                for si, m in enumerate(methods):
                    pts = st[st["series"] == m]
                    if pts.empty:
                        continue
                    name = label(m) + (f" [{fname}]" if many else "")
                    if m == "zeroshot":
                        ax.axhline(100 * pts["mean"].iloc[0], color=color(m, si), ls=FOLDER_STYLES[fi % 4] if many
                                   else ":", lw=1.2, label=name)
                        continue
                    xs = [x_of.get(lv, None) or float(lv) for lv in pts["level"]]
                    order = sorted(range(len(xs)), key=lambda i: xs[i])
                    ax.errorbar([xs[i] for i in order], [100 * pts["mean"].iloc[i] for i in order],
                                yerr=[0 if math.isnan(pts["ci"].iloc[i]) else 100 * pts["ci"].iloc[i] for i in order],
                                marker=FOLDER_MARKERS[fi % 6], ms=4, capsize=2, color=color(m, si), label=name,
                                ls=FOLDER_STYLES[fi % 4] if many else linestyle(m))
            lo, hi = ax.get_ylim()  # 95% intervals of 2-3 seeds can reach past 0-100
            ax.set_ylim(max(lo, 0.0), min(hi, 100.0))
            ax.set_xscale("log")
            ticks = eps_vals + [x_of[lv] for lv in (CLIP, NONE) if lv in has]
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{e:g}" for e in eps_vals] + [("clip" if lv == CLIP else "none")
                                                               for lv in (CLIP, NONE) if lv in has])
            ax.minorticks_off()
            ax.set_xlabel("eps (clip: clipped, no noise; none: raw non-private)")
            ax.set_ylabel(("local" if metric == "local_acc" else "neighbour") + " accuracy (%)")
            name = " ".join([str(pkey[0])] + [str(v) for v in pkey[1:]])
            ax.set_title(f"{name}: {'local' if metric == 'local_acc' else 'neighbour'} (95% CI)", fontsize=10)
            ax.grid(alpha=0.3)
            if pi == 0 and mi == 1:
                ax.legend(fontsize=6 if many else 7, loc="best")
    fig.tight_layout()
    return _save(fig, path)


KINDS = [("epsilon_rdp", "accounted (RDP)", "o", "-"), ("epsilon_pld", "accounted (PLD)", "x", ":"),
         ("audit_eps_lower_bound", "empirical (membership audit, lower bound)", "v", "none"),
         ("mechanism_eps_lower_bound", "empirical (mechanism audit, sound lower bound)", "^", "none")]


def plot_eps_accounting(frames: dict[str, pd.DataFrame], path: Path) -> Optional[Path]:
    """Zero lower bounds are drawn on the bottom edge; infinite eps (clipped, no noise) is left out."""
    from matplotlib.lines import Line2D

    pts = []
    for fi, (fname, df) in enumerate(frames.items()):
        priv = df[~df["level"].isin([NONE, CLIP])]
        for (s, lv), g in priv.groupby(["series", "level"], sort=False):
            claimed = pd.to_numeric(g.get("epsilon_claimed", pd.Series(dtype=float)), errors="coerce").mean()
            x = float(claimed) if pd.notna(claimed) else float(lv)
            for key, *_ in KINDS:
                if key in g.columns:
                    y = pd.to_numeric(g[key], errors="coerce").mean()
                    if pd.notna(y) and math.isfinite(y):
                        pts.append((fi, fname, s, key, x, float(y)))
    if not pts:
        return None
    pos = [p[5] for p in pts if p[5] > 0] + [p[4] for p in pts]
    lo, hi = min(pos) / 3, max(pos) * 3
    fig = _figure(6.5, 5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--")
    methods = series_order(p[2] for p in pts)
    many = len(frames) > 1
    for fi in sorted({p[0] for p in pts}):
        for mi, m in enumerate(methods):
            for key, _, marker, ls in KINDS:
                sel = sorted((p[4], p[5]) for p in pts if p[0] == fi and p[2] == m and p[3] == key)
                if not sel:
                    continue
                ax.plot([x for x, _ in sel], [y if y > 0 else lo for _, y in sel], marker=marker,
                        ls=FOLDER_STYLES[fi % 4] if many and ls != "none" else ls, color=color(m, mi), ms=6,
                        mfc="none" if marker in ("v", "^") else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.5, hi)
    ax.set_xlabel("target eps (reference mode: claimed eps)")
    ax.set_ylabel("eps (lower bound 0 drawn on the bottom edge)")
    ax.set_title("Target vs accounted (RDP, PLD) vs empirical eps")
    ax.grid(alpha=0.3, which="both")
    used = [k for k in KINDS if any(p[3] == k[0] for p in pts)]
    h1 = [Line2D([], [], color=color(m, i), lw=2, label=label(m)) for i, m in enumerate(methods)]
    h2 = [Line2D([], [], color="grey", marker=mk, ls=ls, label=name, mfc="none" if mk in ("v", "^") else None)
          for _, name, mk, ls in used] + [Line2D([], [], color="k", ls="--", lw=0.8, label="y = x")]
    if many:
        h2 += [Line2D([], [], color="grey", ls=FOLDER_STYLES[i % 4], label=f"folder: {f}")
               for i, f in enumerate(frames)]
    leg = ax.legend(handles=h1, fontsize=7, loc="upper left")
    ax.add_artist(leg)
    ax.legend(handles=h2, fontsize=7, loc="lower right")
    fig.tight_layout()
    return _save(fig, path)


def plot_rocs(df: pd.DataFrame, path: Path, max_curves: int = 10) -> Optional[Path]:
    if "_roc" not in df.columns:
        return None
    curves = {}
    order = series_order(df["series"])
    d = df.assign(_s=[order.index(s) for s in df["series"]]).sort_values(["_s", "level_key", "seed"])
    for r in d.to_dict("records"):
        roc = r.get("_roc")
        name = f"{label(r['series'])} eps {level_label(r['level'])}"
        if isinstance(roc, dict) and name not in curves and len(curves) < max_curves:
            curves[name] = (roc["fpr"], roc["tpr"])
    if not curves:
        return None
    try:
        from audits.plots import plot_roc
    except ImportError:
        return None
    return Path(plot_roc(curves, path, title="Membership-inference audit ROC"))
