"""``dpfpl audit``: membership-inference audits and empirical eps lower bounds.

    dpfpl audit RUN_DIR --attack loss [--attack lira ...] [--out DIR] [--shadows K]
                [--client I|all] [--target personalized|global] [--seed S]
    dpfpl audit --train [training options: --method --privacy --epsilon --rounds ...] --attack ...
    dpfpl audit --control positive|negative [RUN_DIR | training options] --attack ...

``--seed`` is the AUDIT's seed (coin flips, shadow data, canaries); with ``--train`` the recipe's
own seed is ``--train-seed``. ``--delta`` is the recipe's privacy delta; the bounds use
``--audit-delta`` (default: the run's delta).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dpfpl.errors import ConfigError

from .attacks import ATTACKS
from .mechanism_run import MECHANISM_ATTACKS, audit_run_mechanisms
from .audit import CONTROLS, TARGETS, AuditSettings, audit_run_dir, audit_train
from .canary import CANARY_KINDS


def _client(v: str) -> Any:
    if v == "all":
        return v
    try:
        return int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a client id or 'all', got {v!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    from dpfpl.cli import add_config_options

    p = subparsers.add_parser(
        "audit", conflict_handler="resolve",
        help="membership-inference audit of a run (or of a target trained for it): ROC, AUC, TPR at low "
             "FPR, empirical eps lower bounds",
        description="Membership-inference audit. With RUN_DIR: members are the examples a client used, "
                    "non-members its classes' test examples (bounds indicative). With --train: the target is "
                    "trained here with coin-flip membership (sound one-run bounds). Writes audit.json, "
                    "audit.md and roc.png to --out.")
    p.add_argument("run_dir", nargs="?", default=None, metavar="RUN_DIR", help="finished run directory to audit")
    p.add_argument("--attack", action="append", dest="attacks", choices=ATTACKS + MECHANISM_ATTACKS, metavar="NAME",
                   help=f"attack to run (repeatable): {', '.join(ATTACKS)}; mechanism-level (RUN_DIR only, no "
                        f"training): {', '.join(MECHANISM_ATTACKS)}")
    p.add_argument("--trials", type=int, default=100_000,
                   help="mechanism attack: independent trials of the canary world (default 100000; the other "
                        "world gets 4x as many under Poisson sampling)")
    p.add_argument("--out", dest="audit_out", default=None,
                   help="output folder (default: RUN_DIR/audit, or runs/audit-<method>-<dataset>[-control])")
    p.add_argument("--shadows", type=int, default=4, help="shadow/reference models for shadow, lira, rmia (default 4)")
    p.add_argument("--client", type=_client, default=0, help="audited client id, or 'all' (default 0)")
    p.add_argument("--target", choices=TARGETS, default="personalized",
                   help="model attacked: the client's personalised model (default) or the global prompt alone")
    p.add_argument("--train", action="store_true",
                   help="train the target here (coin-flip membership; sound bounds); RUN_DIR, if given, "
                        "supplies the recipe")
    p.add_argument("--control", choices=CONTROLS, default=None,
                   help="positive: non-private overfitting recipe; negative: untrained target (implies --train)")
    p.add_argument("--confidence", type=float, default=0.95, help="confidence of the eps lower bounds (default 0.95)")
    p.add_argument("--audit-delta", type=float, default=None, help="delta of the bounds (default: the run's)")
    p.add_argument("--canaries", type=int, default=None, help="number of canaries (default: min(100, data))")
    p.add_argument("--canary-kind", choices=CANARY_KINDS, default="mislabel", help="canary kind (default mislabel)")
    p.add_argument("--canary-data", choices=("zero", "real"), default="zero",
                   help="whitebox / final-cosine: other examples' gradients on the noised parts, zero (an audit "
                        "dataset chosen in gradient space) or real (default zero)")
    p.add_argument("--canary-directions", choices=("orthonormal", "coordinate"), default="orthonormal",
                   help="whitebox: secret orthonormal or coordinate (Dirac) canary directions (default orthonormal)")
    p.add_argument("--lira-variance", choices=("auto", "fixed", "per-example"), default="auto",
                   help="LiRA variance: fixed below 32 shadows when auto")
    p.add_argument("--no-cache", action="store_true", help="retrain shadow/target models even if cached")
    p.add_argument("--no-progress", action="store_true", help="no progress display")
    p.add_argument("--config", default=None, help="TOML or JSON recipe file for --train (flags override it)")
    add_config_options(p)
    # the audit's own seed takes --seed; the recipe's seed moves to --train-seed
    p.add_argument("--seed", dest="audit_seed", type=int, default=0,
                   help="audit seed: coin flips, shadow data and seeds, canaries (default 0)")
    p.add_argument("--train-seed", dest="seed", type=int, default=argparse.SUPPRESS,
                   help="recipe seed (train.seed) for --train")
    p.set_defaults(func=run)
    return p


def _print_summary(report: dict[str, Any], out: Path) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover
        Console = None
    rows = []
    for name, r in report["attacks"].items():
        rows.append((name, f"{r['auc']:.3f}", f"{r['tpr_at_1pct_fpr']:.3f}", f"{r['tpr_at_0_1pct_fpr']:.3f}",
                     f"{r['eps_lower_bound']:.3f}" + ("" if r["bound_sound"] else " (ind.)"),
                     "-" if r.get("epsilon_spent") is None else f"{r['epsilon_spent']:.3f}"))
    header = ("attack", "AUC", "TPR@1%", "TPR@0.1%", "eps LB", "accountant eps")
    if Console is not None:
        t = Table(title=f"audit: {report['target']['description']}")
        for h in header:
            t.add_column(h)
        for row in rows:
            t.add_row(*row)
        Console().print(t)
    else:  # pragma: no cover
        print("\t".join(header))
        for row in rows:
            print("\t".join(row))
    for f in report.get("findings", []):
        print(f"{f['kind'].upper()} ({f['attack']}): {f['message']}")
    print(f"wrote {out / 'audit.json'}, {out / 'audit.md'}, {out / 'roc.png'}")


def _print_mechanism_summary(report: dict[str, Any], out: Path) -> None:
    m = report["attacks"].get("mechanism")
    if m:
        print(f"mechanism: sound eps lower bound {m['eps_lower_bound']:.3f} (confidence {m['confidence']}, "
              f"{m['trials']} / {m.get('trials_other') or m['trials']} trials (canary / other world), {m['steps']} "
              f"steps, {m['statistic']}) vs "
              f"{'claimed' if m['epsilon_claimed'] is not None else 'accounted'} eps {m['claimed_eps']:.3f}: "
              f"{m['verdict']}; GDP estimate (not a bound) {m['eps_estimate']}")
    r = report["attacks"].get("replay")
    if r:
        print(f"replay: {'ok' if r['ok'] else 'VIOLATIONS'}")
    for f in report["findings"]:
        print(f"{f['kind'].upper()} ({f['attack']}): {f['message']}")
    print(f"wrote {out / 'audit.json'}")


def run(args: argparse.Namespace) -> int:
    from dpfpl.cli import config_from_args

    if not args.attacks:
        raise ConfigError("--attack: name at least one attack (" + ", ".join(ATTACKS + MECHANISM_ATTACKS) + ")")
    mech_level = [a for a in args.attacks if a in MECHANISM_ATTACKS]
    if mech_level:
        if len(mech_level) != len(args.attacks) or args.run_dir is None or args.train or args.control:
            raise ConfigError(f"--attack {'/'.join(MECHANISM_ATTACKS)} audit a RUN_DIR's release code on their own: "
                              "give RUN_DIR and no membership attacks, --train or --control")
        if args.trials < 2:
            raise ConfigError(f"--trials must be >= 2, got {args.trials}")
        out = Path(args.audit_out) if args.audit_out else Path(args.run_dir) / "audit"
        report = audit_run_mechanisms(args.run_dir, out, mech_level, trials=args.trials,
                                      confidence=args.confidence, seed=args.audit_seed)
        _print_mechanism_summary(report, out)
        return 0 if not report["findings"] else 1
    settings = AuditSettings(attacks=args.attacks, shadows=args.shadows, client=args.client, target=args.target,
                             seed=args.audit_seed, confidence=args.confidence, delta=args.audit_delta,
                             canaries=args.canaries, canary_kind=args.canary_kind, canary_data=args.canary_data,
                             canary_directions=args.canary_directions, lira_variance=args.lira_variance,
                             progress=not args.no_progress, cache=not args.no_cache).validate()
    train_mode = args.train or args.control is not None
    cfg, overrides = config_from_args(args)
    if not train_mode:
        if args.run_dir is None:
            raise ConfigError("give a RUN_DIR to audit, or --train (with training options) to train the target")
        if overrides or args.config:
            raise ConfigError(f"training options ({', '.join(sorted(overrides)) or '--config'}) need --train: "
                              "an existing run is audited as it was trained")
        out = Path(args.audit_out) if args.audit_out else Path(args.run_dir) / "audit"
        report = audit_run_dir(args.run_dir, out, settings)
    else:
        if args.run_dir is not None:
            import json

            from dpfpl.config import RunConfig

            src = Path(args.run_dir) / "config.json"
            if not src.is_file():
                raise ConfigError(f"{args.run_dir}: no config.json: not a dpfpl run directory")
            if args.config:
                raise ConfigError("give either RUN_DIR or --config as the recipe, not both")
            d = json.loads(src.read_text())
            d.pop("dpfpl_version", None)
            cfg = RunConfig.from_dict(d, source=str(src))
        cfg.update(overrides)
        cfg.validate()
        suffix = f"-{args.control}" if args.control else ""
        out = Path(args.audit_out) if args.audit_out else \
            Path("runs") / f"audit-{cfg.train.method}-{cfg.data.dataset}-s{cfg.train.seed}{suffix}"
        source = f"recipe of run directory {args.run_dir}" if args.run_dir else "target trained for the audit"
        report = audit_train(cfg, out, settings, control=args.control, source=source)
    _print_summary(report, out)
    return 0


def main(argv=None) -> int:  # pragma: no cover - convenience
    from dpfpl.cli import main as dpfpl_main

    return dpfpl_main(["audit", *(argv if argv is not None else sys.argv[1:])])
