"""Audit outputs: ``audit.json`` (stable keys), ``roc.png`` (linear + log-log ROC) and ``audit.md``.

Stable per-attack keys of ``audit.json["attacks"][NAME]`` (scripts rely on them): ``auc``,
``tpr_at_1pct_fpr``, ``tpr_at_0_1pct_fpr``, ``balanced_accuracy``, ``eps_lower_bound``,
``confidence``, ``delta``, ``epsilon_spent`` (the run's accountant eps; null when non-private),
``epsilon_claimed`` (reference mode; else null), ``bound_method``, ``bound_sound``,
``n_members``, ``n_nonmembers``, ``flags``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

from dpfpl.rundir import atomic_write_bytes, atomic_write_json

from .plots import plot_roc

__all__ = ["flag_attack", "write_outputs", "render_markdown", "STABLE_KEYS"]

STABLE_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "balanced_accuracy", "eps_lower_bound",
               "confidence", "delta", "epsilon_spent", "epsilon_claimed", "bound_method", "bound_sound",
               "n_members", "n_nonmembers", "flags")
TOL = 1e-9


def flag_attack(res: dict[str, Any]) -> list[dict[str, str]]:
    """Findings for one attack result: bound above the claimed eps (a finding about the claim) or
    above the accountant's eps (a bug in the mechanism or the accountant, if the bound is sound)."""
    flags = []
    lb = res.get("eps_lower_bound") or 0.0
    spent, claimed = res.get("epsilon_spent"), res.get("epsilon_claimed")
    if spent is not None and lb > spent + TOL:
        if res.get("bound_sound"):
            flags.append({"kind": "bug", "message":
                          f"empirical lower bound {lb:.3f} exceeds the accountant's epsilon {spent:.3f}: "
                          "the mechanism or the accountant is wrong (the bound holds with probability "
                          f">= {res.get('confidence')})"})
        else:
            flags.append({"kind": "warning", "message":
                          f"indicative bound {lb:.3f} exceeds the accountant's epsilon {spent:.3f}; this "
                          "design is not randomised, rerun with `dpfpl audit --train` for a sound bound"})
    if claimed is not None and lb > claimed + TOL:
        flags.append({"kind": "finding", "message":
                      f"empirical lower bound {lb:.3f} exceeds the CLAIMED epsilon {claimed:.3f}: the "
                      "claim does not hold" + ("" if res.get("bound_sound") else " (indicative: design not randomised)")})
    return flags


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if not math.isfinite(x):
            return "-"
        return f"{x:.{digits}f}"
    return str(x)


def render_markdown(report: dict[str, Any]) -> str:
    t = report["target"]
    p = report["privacy"]
    lines = ["# Membership-inference audit", ""]
    ctrl = report.get("control")
    if ctrl:
        lines += [f"**Control: {ctrl}.** " + report["control_note"], ""]
    lines += [f"- Source: {report['source']}",
              f"- Target model: {t['description']}",
              f"- Members: {report['members']['definition']} (n = {report['members']['n']})",
              f"- Non-members: {report['nonmembers']['definition']} (n = {report['nonmembers']['n']})",
              f"- Privacy: mode `{p.get('mode')}`, accountant eps = {_fmt(p.get('epsilon_spent'))}"
              + (f", claimed eps = {_fmt(p.get('epsilon_claimed'))}" if p.get("epsilon_claimed") is not None else "")
              + (f", target eps = {_fmt(p.get('epsilon_target'))}" if p.get("epsilon_target") is not None else "")
              + f", delta = {p.get('delta')}",
              f"- Lower bounds at {report['settings']['confidence']:.0%} confidence, delta = "
              f"{report['settings']['delta']:g}; shadows K = {report['settings']['shadows']}; seed = "
              f"{report['settings']['seed']}", ""]
    if report.get("design_note"):
        lines += [f"> {report['design_note']}", ""]
    lines += ["| attack | members / non-members | AUC | balanced acc. | TPR@1%FPR | TPR@0.1%FPR | eps lower bound "
              "| sound | accountant eps |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["attacks"].items():
        lines.append(f"| {name} | {r['n_members']} / {r['n_nonmembers']} | {_fmt(r['auc'])} | "
                     f"{_fmt(r['balanced_accuracy'])} | {_fmt(r['tpr_at_1pct_fpr'])} "
                     f"| {_fmt(r['tpr_at_0_1pct_fpr'])} | {_fmt(r['eps_lower_bound'])} | "
                     f"{'yes' if r['bound_sound'] else 'indicative'} | {_fmt(r.get('epsilon_spent'))} |")
    lines.append("")
    flags = [(n, f) for n, r in report["attacks"].items() for f in r.get("flags", [])]
    if flags:
        lines += ["## Flags", ""]
        for n, f in flags:
            tag = {"bug": "BUG", "finding": "FINDING", "warning": "WARNING"}.get(f["kind"], f["kind"].upper())
            lines.append(f"- **{tag}** ({n}): {f['message']}")
        lines.append("")
    else:
        lines += ["No lower bound exceeds the accountant's or the claimed epsilon.", ""]
    lines += ["## Bounds", ""]
    methods: dict[str, list[str]] = {}
    for name, r in report["attacks"].items():
        methods.setdefault(r["bound_method"], []).append(name)
    for method, names in methods.items():
        lines.append(f"- {', '.join(names)}: {method}")
    lines += ["", "## Attack signals", ""]
    for name, r in report["attacks"].items():
        if r.get("signal"):
            lines.append(f"- {name}: {r['signal']}")
    notes = report.get("notes") or []
    if notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    lines += ["", f"ROC curves: `{report['plots']['roc']}`", ""]
    return "\n".join(lines)


def write_outputs(report: dict[str, Any], curves: dict[str, tuple], out: Path, title: Optional[str] = None) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    roc = plot_roc(curves, out / "roc.png", title=title or "Membership inference ROC")
    report["plots"] = {"roc": roc.name}
    atomic_write_json(out / "audit.json", report)
    atomic_write_bytes(out / "audit.md", render_markdown(report).encode())
    return {"json": out / "audit.json", "md": out / "audit.md", "roc": roc}
