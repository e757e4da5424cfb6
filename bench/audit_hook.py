"""The bench's audit hook: audit a finished cell and write its headline ``audit.json``.

Two kinds of attack, asked for in one list (``GridSpec.audit_attacks``):

- membership attacks (``loss``, ``lira``, ``canary``, ...; :data:`audits.attacks.ATTACKS`) run by
  :func:`audits.audit.audit_run_dir` on the trained model (its report goes to ``RUN_DIR/audit/``);
- mechanism-level attacks (``mechanism``, ``replay``; :data:`audits.mechanism_run.MECHANISM_ATTACKS`)
  run by :func:`audits.mechanism_run.audit_run_mechanisms` on the run's own release code rebuilt from
  config.json + ledger.json (report in ``RUN_DIR/audit_mechanism/``). A non-private cell has no
  release to audit: its entry says so (``skipped``) instead of failing the cell.

The headline keeps the strongest membership attack under fixed names (``auc``, ``eps_lower_bound``,
...; :func:`normalize_audit`), every attack under ``attacks``, and the mechanism audit under
``mechanism`` (``eps_lower_bound`` sound, ``claimed_eps`` = the accounted eps in DP mode or the
public code's claim in reference mode, ``verdict``, ``tightness``, ``trials``) and ``replay_ok``.
Options for the mechanism audit travel in ``audit_options`` as ``mechanism_trials`` (default
100 000 per world) and ``mechanism_seed``; the rest are :class:`audits.audit.AuditSettings` fields.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dpfpl.rundir import atomic_write_json

__all__ = ["AUDIT_KEYS", "MECHANISM_KEYS", "find_audit_hook", "normalize_audit", "run_audit", "split_attacks"]

AUDIT_KEYS = ("auc", "tpr_at_1pct_fpr", "tpr_at_0_1pct_fpr", "eps_lower_bound", "confidence", "bound_sound",
              "epsilon_spent", "epsilon_claimed", "flags")
MECHANISM_KEYS = ("eps_lower_bound", "bound_sound", "claimed_eps", "epsilon_accounted", "epsilon_claimed", "verdict",
                  "tightness", "trials", "trials_other", "steps", "statistic", "confidence", "eps_estimate", "seconds")
MECHANISM_ATTACKS = ("mechanism", "replay")  # == audits.mechanism_run.MECHANISM_ATTACKS (test)
_MECHANISM_OPTIONS = ("mechanism_trials", "mechanism_seed")


def find_audit_hook() -> Optional[Callable[..., dict]]:
    """:func:`audits.audit.audit_run_dir` (``hook(run_dir, settings=, clip=, dataset=) -> report``),
    or None where the audits package cannot be imported (the grid then runs without audits)."""
    try:
        from audits.audit import audit_run_dir
    except ImportError:
        return None
    return audit_run_dir


def _pick(d: dict[str, Any], keys: Sequence[str] = AUDIT_KEYS) -> dict[str, Any]:
    return {k: (float(d[k]) if isinstance(d[k], (int, float)) and not isinstance(d[k], bool) else d[k])
            for k in keys if k in d}


def normalize_audit(result: dict[str, Any]) -> dict[str, Any]:
    """The headline of a membership-audit report (``attacks`` maps each attack to its metrics): the
    strongest attack (highest eps lower bound, then AUC) under fixed names, every attack's metrics
    under ``attacks``, and the strongest attack's ROC curve."""
    attacks = {n: r for n, r in (result.get("attacks") or {}).items() if isinstance(r, dict) and "auc" in r}
    if not attacks:
        return {"error": "the audit report has no attack results"}
    best = max(attacks, key=lambda n: (attacks[n].get("eps_lower_bound") or 0.0, attacks[n].get("auc") or 0.0))
    out: dict[str, Any] = {**_pick(attacks[best]), "attack": best,
                           "attacks": {n: _pick(r) for n, r in attacks.items()}}
    roc = attacks[best].get("roc")
    if isinstance(roc, dict) and "fpr" in roc and "tpr" in roc:
        out["roc"] = {"fpr": [float(x) for x in roc["fpr"]], "tpr": [float(x) for x in roc["tpr"]]}
    return out


def split_attacks(attacks: Sequence[str]) -> tuple[list[str], list[str]]:
    """(membership attacks, mechanism-level attacks) of one attack list, order kept."""
    mech = [a for a in attacks if a in MECHANISM_ATTACKS]
    return [a for a in attacks if a not in MECHANISM_ATTACKS], mech


def _mechanism_headline(run_dir: Path, attacks: list[str], trials: int, seed: int) -> dict[str, Any]:
    """``mechanism`` / ``replay_ok`` / ``attacks["mechanism"]`` entries of the headline."""
    import json

    from audits.mechanism_run import audit_run_mechanisms

    cfg = json.loads((run_dir / "config.json").read_text())
    mode = (cfg.get("privacy") or {}).get("privacy", "none")
    if mode not in ("dp", "reference"):
        return {"mechanism": {"skipped": f"privacy={mode}: no release to audit"}}
    rep = audit_run_mechanisms(run_dir, run_dir / "audit_mechanism", attacks, trials=trials, seed=seed)
    out: dict[str, Any] = {}
    m = rep["attacks"].get("mechanism")
    if m is not None:
        head = _pick(m, MECHANISM_KEYS)
        flags = [f for f in rep["findings"] if f["attack"] == "mechanism"]
        out["mechanism"] = head
        # the audit table lists it beside the membership attacks (a sound bound, no AUC)
        out["attacks"] = {"mechanism": {"eps_lower_bound": head["eps_lower_bound"], "bound_sound": True,
                                        "confidence": head.get("confidence"), "flags": flags,
                                        "epsilon_claimed": head.get("epsilon_claimed")}}
    r = rep["attacks"].get("replay")
    if r is not None:
        out["replay_ok"] = bool(r["ok"])
        out["replay_violations"] = list(r["violations"])
    return out


def run_audit(hook: Optional[Callable[..., Any]], run_dir: Path, clip: Any, dataset: Any,
              attacks: Sequence[str] = ("loss",), options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Audit a finished cell with ``attacks`` (see the module docstring); writes
    ``run_dir/audit.json`` (the headline) and returns it. ``hook`` runs the membership attacks
    (None: only mechanism-level attacks may be asked for)."""
    opts = dict(options or {})
    trials = int(opts.pop("mechanism_trials", 100_000))
    mseed = int(opts.pop("mechanism_seed", 0))
    member, mech = split_attacks(attacks)
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    if member:
        if hook is None:
            raise RuntimeError("membership attacks asked for, but the audits package is not importable")
        from audits.audit import AuditSettings

        res = normalize_audit(hook(run_dir, settings=AuditSettings(attacks=member, **opts), clip=clip, dataset=dataset))
    if mech:
        extra = _mechanism_headline(Path(run_dir), mech, trials, mseed)
        res.setdefault("attacks", {}).update(extra.pop("attacks", {}))
        res.update(extra)
    res["audit_s"] = time.perf_counter() - t0
    atomic_write_json(run_dir / "audit.json", res)
    return res
