"""ROC plots for membership-inference audits (matplotlib, Agg canvas; no pyplot state).

Two panels, as in LiRA (Carlini et al. 2022): linear ROC, and log-log ROC over FPR in
[1e-4, 1] where the low-FPR regime that matters is visible. The chance diagonal is drawn in
both; legends give each curve's AUC.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence, Union

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dpfpl.errors import ConfigError

from .metrics import auc_from_curve

__all__ = ["plot_roc"]

_LOG_MIN = 1e-4


def plot_roc(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
             path: Union[str, Path], title: str = "ROC") -> Path:
    """Write a PNG with a linear and a log-log ROC panel; returns the path written.

    ``curves`` maps a legend name to ``(fpr, tpr)`` arrays (e.g. from
    :func:`audits.metrics.roc_curve`). On the log-log panel, zero rates are drawn at the bottom
    edge (clipped below 1e-4) so the curve stays visible. Parent folders are created.
    """
    if not curves:
        raise ConfigError("curves: no curve to plot")
    out = Path(path)
    if out.suffix.lower() != ".png":
        raise ConfigError(f"path: expected a .png file, got {str(path)!r}")
    checked = {}
    for name, pair in curves.items():
        try:
            fpr, tpr = pair
        except (TypeError, ValueError):
            raise ConfigError(f"curves[{name!r}]: expected a (fpr, tpr) pair") from None
        x = np.asarray(fpr, dtype=np.float64)
        y = np.asarray(tpr, dtype=np.float64)
        if x.ndim != 1 or x.size == 0 or y.shape != x.shape:
            raise ConfigError(
                f"curves[{name!r}]: fpr and tpr must be non-empty 1-D arrays of equal length, "
                f"got shapes {x.shape} and {y.shape}")
        checked[name] = (x, y)

    fig = Figure(figsize=(11, 5), dpi=110)
    FigureCanvasAgg(fig)
    ax_lin, ax_log = fig.subplots(1, 2)
    diag = np.geomspace(_LOG_MIN, 1.0, 100)
    ax_lin.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="chance")
    ax_log.plot(diag, diag, ls="--", color="grey", lw=1, label="chance")
    for name, (x, y) in checked.items():
        label = f"{name} (AUC={auc_from_curve(x, y):.3f})"
        line, = ax_lin.plot(x, y, lw=1.5, label=label)
        floor = _LOG_MIN / 10.0
        ax_log.plot(np.maximum(x, floor), np.maximum(y, floor), lw=1.5, color=line.get_color(),
                    label=label)
    ax_lin.set(xlim=(0, 1), ylim=(0, 1), xlabel="False positive rate",
               ylabel="True positive rate", title="ROC (linear)")
    ax_log.set(xscale="log", yscale="log", xlim=(_LOG_MIN, 1), ylim=(_LOG_MIN, 1),
               xlabel="False positive rate", ylabel="True positive rate", title="ROC (log-log)")
    for ax in (ax_lin, ax_log):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
