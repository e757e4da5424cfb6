"""``dpfpl account``: epsilon of a planned run, calibration, per-round curve, reference claim.

Examples::

    dpfpl account --noise-multiplier 1.1 --sampling-rate 0.01 --steps 1000 --json
    dpfpl account --calibrate --epsilon 1 --sampling-rate 0.01 --steps 1000
    dpfpl account --per-round --noise-multiplier 1.1 --sampling-rate 0.01 \\
        --steps-per-round 10 --rounds 100 [--pld]
    dpfpl account --reference --epsilon 0.1 --rounds 100 --batch-size 32 \\
        --steps-per-round 10 --clients 10
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Optional

from ..errors import ConfigError
from . import accountants, calibration, events, reference

HELP = "epsilon of a planned run (RDP and PLD), noise calibration, reference-mode claim"


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``account`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser("account", help=HELP, description=HELP)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noise-multiplier", type=float, help="noise std / clipping bound")
    p.add_argument("--sampling-rate", type=float, default=1.0, help="Poisson sampling rate q")
    p.add_argument("--sampling", default="poisson", choices=events.SAMPLINGS,
                   help="poisson (amplified) or none/shuffle (plain Gaussian per step)")
    p.add_argument("--steps", type=int, help="number of releases (default: steps-per-round x rounds)")
    p.add_argument("--delta", type=float, default=1e-5, help="target delta")
    p.add_argument("--epsilon", type=float, help="target epsilon (--calibrate, --reference)")
    p.add_argument("--calibrate", action="store_true", help="find the noise multiplier for --epsilon")
    p.add_argument("--accountant", default="pld", choices=("rdp", "pld"),
                   help="accountant used by --calibrate")
    p.add_argument("--per-round", action="store_true", help="print the eps curve of a planned run")
    p.add_argument("--steps-per-round", type=int, help="releases per round")
    p.add_argument("--rounds", type=int, help="rounds")
    p.add_argument("--pld", action="store_true", help="with --per-round: also the PLD curve (slow)")
    p.add_argument("--reference", action="store_true",
                   help="claimed vs accounted eps of the public DP-FPL code's calibration")
    p.add_argument("--batch-size", type=int, help="--reference: minibatch size B")
    p.add_argument("--clients", type=int, help="--reference: number of clients N")
    p.add_argument("--sensitivity-factor", type=float, default=2.0,
                   help="--reference: true sensitivity of the batch-clipped mean, in units of C "
                        "(2: worst case; 1: optimistic)")
    p.add_argument("--dataset-size", type=int, help="a client's training-set size: warn when delta >= 1/n; with "
                   "--reference, count one exposure per epoch (replace-one, shuffled batches)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _need(args: argparse.Namespace, *names: str, why: str) -> None:
    missing = [n for n in names if getattr(args, n.replace("-", "_")) is None]
    if missing:
        raise ConfigError(f"{why} needs " + ", ".join(f"--{n}" for n in missing))


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The result of an ``account`` invocation as a JSON-able dict (raises ConfigError)."""
    delta = events.check_delta(args.delta)
    if args.dataset_size is not None:
        if args.dataset_size < 1:
            raise ConfigError(f"--dataset-size must be >= 1, got {args.dataset_size}")
        if delta >= 1 / args.dataset_size:
            print(f"warning: delta={delta:g} >= 1/n = {1 / args.dataset_size:g}: such a delta "
                  "allows releasing an example outright; use delta << 1/n", file=sys.stderr)
    if args.epsilon is not None:
        events.check_epsilon(args.epsilon)
    if args.noise_multiplier is not None:
        events.check_noise(args.noise_multiplier)

    if args.reference:
        _need(args, "epsilon", "rounds", "batch-size", "steps-per-round", "clients", why="--reference")
        sigma = reference.reference_sigma(args.epsilon, args.rounds, delta)
        ev = reference.reference_accounted_events(sigma, args.batch_size, args.steps_per_round, args.rounds,
                                            args.clients, sensitivity_factor=args.sensitivity_factor)
        out = {"mode": "reference", "epsilon": args.epsilon, "delta": delta, "rounds": args.rounds,
               "batch_size": args.batch_size, "steps_per_round": args.steps_per_round,
               "clients": args.clients, "sensitivity_factor": args.sensitivity_factor,
               "reference_sigma": sigma,
               "effective_noise_multiplier": reference.reference_noise_multiplier(
                   sigma, args.batch_size, args.sensitivity_factor),
               "claimed_epsilon": reference.reference_claimed_epsilon(sigma, args.rounds, delta),
               "releases": {k: sum(n for _, n in v) for k, v in ev.items()}}
        for view in ("local", "global", "personalized"):
            out[f"accounted_rdp_epsilon_{view}"] = accountants.rdp_epsilon(ev[view], delta)
        out["accounted_pld_epsilon_personalized"] = accountants.pld_epsilon(ev["personalized"], delta)
        out["accounted_epsilon"] = out["accounted_rdp_epsilon_personalized"]
        if args.dataset_size:  # replace-one: one exposure per epoch (what the engine records)
            epochs = math.ceil(args.rounds * args.steps_per_round * args.batch_size / args.dataset_size)
            ev_e = reference.reference_accounted_events(sigma, args.batch_size, args.steps_per_round, args.rounds,
                                                  args.clients, sensitivity_factor=args.sensitivity_factor,
                                                  epochs=epochs)
            out["epochs"] = epochs
            out["accounted_rdp_epsilon_personalized_per_epoch"] = accountants.rdp_epsilon(ev_e["personalized"], delta)
            out["accounted_epsilon"] = out["accounted_rdp_epsilon_personalized_per_epoch"]
        return out

    if args.steps is None and args.steps_per_round is not None and args.rounds is not None:
        steps = events.check_steps(args.steps_per_round, "--steps-per-round") * \
            events.check_steps(args.rounds, "--rounds")
    else:
        _need(args, "steps", why="accounting")
        steps = events.check_steps(args.steps, "--steps")
    q = events.check_rate(args.sampling_rate, "--sampling-rate")
    out: dict[str, Any] = {"mode": "account", "sampling_rate": q, "sampling": args.sampling,
                           "steps": steps, "delta": delta}
    if args.calibrate:
        _need(args, "epsilon", why="--calibrate")
        nm = calibration.calibrate_noise_multiplier(args.epsilon, delta, q, steps, args.sampling,
                                            args.accountant)
        out.update(mode="calibrate", target_epsilon=args.epsilon, accountant=args.accountant)
    else:
        _need(args, "noise-multiplier", why="accounting")
        nm = args.noise_multiplier
    out["noise_multiplier"] = nm
    event = events.make_event(nm, q, args.sampling)
    out["rdp_epsilon"] = accountants.rdp_epsilon([(event, steps)], delta)
    out["pld_epsilon"] = accountants.pld_epsilon([(event, steps)], delta)

    if args.per_round:
        _need(args, "steps-per-round", "rounds", why="--per-round")
        s = events.check_steps(args.steps_per_round, "--steps-per-round")
        r = events.check_steps(args.rounds, "--rounds")
        out["per_round"] = [{"round": i, "steps": i * s,
                             "rdp_epsilon": accountants.rdp_epsilon([(event, i * s)], delta)}
                            for i in range(1, r + 1)]
        if args.pld:
            from dp_accounting.pld import PLDAccountant
            pld = PLDAccountant(value_discretization_interval=accountants.PLD_DISCRETIZATION)
            for row in out["per_round"]:
                pld.compose(event, s)  # incremental: the accountant keeps the composed PLD
                row["pld_epsilon"] = float(pld.get_epsilon(delta))
    return out


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:.6g}"
    return str(v)


def _print_table(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"dpfpl account ({out['mode']})")
    t.add_column("quantity")
    t.add_column("value", justify="right")
    for k, v in out.items():
        if k in ("per_round", "mode"):
            continue
        if isinstance(v, dict):
            v = ", ".join(f"{a}={_fmt(b)}" for a, b in v.items())
        t.add_row(k, _fmt(v))
    console.print(t)
    if "per_round" in out:
        c = Table(title="epsilon per round")
        cols = [k for k in ("round", "steps", "rdp_epsilon", "pld_epsilon") if k in out["per_round"][0]]
        for k in cols:
            c.add_column(k, justify="right")
        for row in out["per_round"]:
            c.add_row(*(_fmt(row[k]) for k in cols))
        console.print(c)
    if out["mode"] == "reference":
        console.print("[bold]claimed_epsilon[/bold] is the public code's closed-form claim; the "
                      "accounted values are what its noise really buys (every draw counted: add/remove-one; "
                      "with --dataset-size, one exposure per epoch: replace-one, as the engine records).")


def _jsonable(v: Any) -> Any:
    """Plain JSON: numpy scalars to float, non-finite floats to the strings 'inf'/'nan'."""
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) or (hasattr(v, "dtype") and hasattr(v, "item")):
        v = float(v)
        return v if math.isfinite(v) else str(v)
    return v


def run(args: argparse.Namespace) -> int:
    """Execute ``dpfpl account``; returns the exit status (2 on bad input, message on stderr)."""
    try:
        out = compute(args)
    except ConfigError as err:
        print(f"dpfpl: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(_jsonable(out)))
    else:
        _print_table(out)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """Standalone entry point (``python -m dpfpl.privacy.account_cli``)."""
    p = argparse.ArgumentParser(prog="dpfpl account", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
