"""``dpfpl bench``: run a benchmark grid and write tables, plots and a README under results/.

    dpfpl bench                                  # the default grid -> results/default/
    dpfpl bench --preset audits                  # every attack on DP-FPL, DP vs reference mode
    dpfpl bench --preset paper --root DATA --pretrained /path/ViT-B-16.pt
    dpfpl bench --config my_grid.toml            # a custom grid (see bench.presets)
    dpfpl bench --methods dpfpl promptfl --epsilons none 2 --seeds 0 1 --rounds 3
    dpfpl bench --list                           # presets; --dry-run: the cells and their state

Any training option (``--rounds``, ``--pretrained``, ``--root``, ``--device``...) applies to every
cell; ``--method`` / ``--seed`` / ``--epsilon`` are read as one-element ``--methods`` /
``--seeds`` / ``--epsilons``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from dpfpl.errors import ConfigError


def add_parser(sub) -> argparse.ArgumentParser:
    from dpfpl.cli import add_config_options

    from .presets import preset_names

    p = sub.add_parser("bench", help="run a benchmark grid (method x eps x seed) and write tables and plots",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, help=f"embedded grid: {', '.join(preset_names())} (default: default)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="TOML/JSON grid file ([bench] table + run options); see bench/presets.py")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: results/<preset>)")
    p.add_argument("--methods", nargs="+", default=None, metavar="M", help="methods to run (see `dpfpl methods`)")
    p.add_argument("--epsilons", nargs="+", default=None, metavar="E", help="eps levels; 'none' = non-private")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S", help="seeds")
    p.add_argument("--axis", action="append", default=[], metavar="NAME=V1,V2",
                   help="sweep (or restrict) another run option, e.g. --axis rank=1,2,4 (repeatable)")
    p.add_argument("--private-mode", choices=("dp", "reference"), default=None,
                   help="privacy mode of the eps cells: dp (accounted) or reference (public code's claim)")
    p.add_argument("--jobs", default="auto",
                   help="cells run in this many worker processes, each with cores/jobs torch threads; 'auto' "
                        "(default): one per core (max 8) for the tiny CPU model, 1 on a GPU or for large models")
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker (with --jobs > 1)")
    p.add_argument("--no-audit", action="store_true", help="do not run the membership audits even if available")
    p.add_argument("--rerun-changed", action="store_true",
                   help="rerun finished cells whose settings differ from the grid's (default: stop with an error)")
    p.add_argument("--fresh", action="store_true",
                   help="run every cell again, finished ones too (each old run directory is replaced when its "
                        "cell starts); default: skip finished cells and resume interrupted ones")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoint.pt (only needed to resume; removed by default)")
    p.add_argument("--keep-going", action="store_true", help="record a failed cell and go on with the others")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.add_argument("--dry-run", action="store_true", help="list the cells and their state, run nothing")
    p.add_argument("--report-only", action="store_true", help="rebuild tables, plots and README from finished runs")
    add_config_options(p)
    p.set_defaults(func=cmd_bench)
    return p


def build_grid(args: argparse.Namespace):
    from dpfpl.config import field_index

    from .grid import parse_axis
    from .presets import get_preset, load_grid_file

    if args.config:
        grid = load_grid_file(args.config, preset=args.preset)
    else:
        grid = get_preset(args.preset or "default")
    overrides: dict[str, Any] = {k: v for k, v in vars(args).items() if k in field_index()}
    methods, seeds, epsilons = args.methods, args.seeds, args.epsilons
    if "method" in overrides:
        methods = (methods or []) + [overrides.pop("method")]
    if "seed" in overrides:
        seeds = (seeds or []) + [overrides.pop("seed")]
    if "epsilon" in overrides:
        epsilons = (epsilons or []) + [overrides.pop("epsilon")]
    if "privacy" in overrides:
        mode = overrides.pop("privacy")
        if mode != "none":
            grid.private_mode = mode
        elif epsilons is None:
            epsilons = ["none"]
    if args.private_mode:
        grid.private_mode = args.private_mode
    axes = dict(parse_axis(a) for a in args.axis)
    grid = grid.select(methods=methods, epsilons=epsilons, seeds=seeds, axes=axes)
    for k in list(overrides):
        # an explicit option overrides the grid's base (for every cell) and removes a sweep over it
        grid.axes.pop(k, None)
        grid.private_base.pop(k, None)
        grid.nonprivate_base.pop(k, None)
        for ov in grid.tuned.values():
            ov.pop(k, None)
        for b in grid.blocks:
            b.get("axes", {}).pop(k, None)
    grid.base.update(overrides)
    return grid.validate()


def cmd_bench(args: argparse.Namespace) -> int:
    from .harness import Harness, auto_jobs, command_line, default_out
    from .presets import PRESETS, get_preset

    if args.list:
        for name in PRESETS:
            g = get_preset(name)
            print(f"{name:10s} {len(g.cells())} cells  {g.description}")
        return 0
    grid = build_grid(args)
    out = Path(args.out) if args.out else default_out(grid)
    if str(args.jobs) == "auto":
        jobs = auto_jobs(grid)
    else:
        try:
            jobs = int(args.jobs)
        except ValueError:
            raise ConfigError(f"--jobs must be a positive integer or 'auto', got {args.jobs!r}") from None
        if jobs < 1:
            raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    harness = Harness(grid, out, jobs=jobs, threads=args.threads, progress=not args.no_progress,
                      audit=False if args.no_audit else None, rerun_changed=args.rerun_changed, fresh=args.fresh,
                      command=command_line(), keep_going=args.keep_going,
                      keep_checkpoints=args.keep_checkpoints)
    if args.dry_run:
        cells, status = harness.plan()
        for c in cells:
            print(f"{c.id:40s} {status[c.id]}")
        print(f"{len(cells)} cells -> {out}")
        return 0
    if args.report_only:
        from .report import write_report

        import json

        command = None
        try:  # the report describes the run that produced the cells, not this rebuild
            command = json.loads((out / "grid.json").read_text()).get("command")
        except (OSError, ValueError):
            pass
        files = write_report(out, grid, grid.cells(), command=command or command_line())
        print("\n".join(str(p) for p in files.values()))
        return 0
    try:
        result = harness.run()
    except KeyboardInterrupt:
        print(f"dpfpl bench: interrupted; finished cells are kept in {out}/runs and the report covers them; "
              "rerun the same command to continue", file=sys.stderr)
        return 130
    print(f"{len(result.ran)} cell(s) run, {len(result.skipped)} skipped (finished)"
          + (f", {len(result.failed)} failed" if result.failed else "")
          + f" in {result.wall_s:.1f} s; report: {out / 'README.md'}")
    return 1 if result.failed else 0
