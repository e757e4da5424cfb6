"""The ``dpfpl`` command line: train, account, audit, bench, pretrain, methods, datasets.

Every training option is a field of :class:`dpfpl.config.RunConfig`; ``--help`` lists them with
their defaults. Errors a user can fix print one line on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from typing import Any, Optional, Sequence

from .config import RunConfig, base_type, field_index, load_mapping
from .errors import ConfigError, DpfplError

# subcommands defined elsewhere: (module with add_parser(sub), help); a module is imported only when
# its command runs (``dpfpl --help`` stays fast)
EXTERNAL = {
    "account": ("dpfpl.privacy.account_cli",
                "epsilon of a planned run (RDP and PLD), noise calibration, reference-mode claim"),
    "pretrain": ("dpfpl.pretrain", "pretrain the tiny CLIP on the synthetic world (reproduces the builtin checkpoint)"),
    "audit": ("audits.cli", "membership-inference audit of a run (or of a target trained for it): ROC, AUC, TPR "
                            "at low FPR, empirical eps lower bounds"),
    "bench": ("bench.cli", "run a benchmark grid (method x eps x seed) and write tables and plots"),
}
SHOW_DEFAULTS = ("account",)  # subcommands whose help does not state its defaults itself


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line plus where to find the usage (exit 2)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_options(p: argparse.ArgumentParser) -> None:
    """One ``--flag`` per RunConfig field (default SUPPRESS so explicit flags can be told apart)."""
    defaults = RunConfig()
    for sec in RunConfig.SECTIONS:
        group = p.add_argument_group(f"{sec} options")
        for name, (s, f) in field_index().items():
            if s != sec:
                continue
            typ, optional = base_type(f.type)
            default = getattr(getattr(defaults, sec), name)
            choices = f.metadata.get("choices")
            meta = "{" + ",".join(str(c) for c in choices if c is not None) + "}" if choices else typ.__name__.upper()
            group.add_argument(_flag(name), dest=name, default=argparse.SUPPRESS, metavar=meta,
                               help=f"{f.metadata.get('help', '')} (default: {default})")


def config_from_args(args: argparse.Namespace) -> tuple[RunConfig, dict[str, Any]]:
    cfg = RunConfig.from_file(args.config) if getattr(args, "config", None) else RunConfig()
    overrides = {k: v for k, v in vars(args).items() if k in field_index()}
    return cfg, overrides


def asked_fields(args: argparse.Namespace) -> set[str]:
    """The config fields the user set, by flag or in the --config file."""
    asked = {k for k in vars(args) if k in field_index()}
    if getattr(args, "config", None):
        for k, v in load_mapping(args.config).items():
            asked |= set(v) if isinstance(v, dict) else {k}
    return asked


# ---------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from .preflight import check_config, reference_note
    from .progress import TrainProgress

    if args.resume is not None:
        given = [f for f, v in (("--config", args.config), ("--out", args.out)) if v is not None]
        if given:
            raise ConfigError(f"--resume {args.resume} continues that run with its saved config and directory; "
                              f"{' and '.join(given)} cannot be combined with it")
    cfg, overrides = config_from_args(args)
    if args.resume is None:
        cfg.update(overrides)
        check_config(cfg, getattr(args, "engine", "inprocess"))
        note = reference_note(cfg, asked_fields(args))
        if note:
            print(f"dpfpl: note: {note}", file=sys.stderr)
        if args.out is None:
            args.out = f"runs/{cfg.train.method}-{cfg.data.dataset}-s{cfg.train.seed}"
    if getattr(args, "engine", "inprocess") == "flower":  # issue 6: same run, through Flower's simulation engine
        from .flower import run_flower as train
    else:
        from .train import train
    with TrainProgress(enabled=not args.no_progress) as prog:
        summary = train(cfg if args.resume is None else None, out=args.out, resume=args.resume,
                        overrides=overrides if args.resume else None, callbacks=(prog,),
                        on_status=prog.status, on_step=prog.step)
    summary.pop("_engine", None)
    noop = summary.pop("_noop", None)
    if noop:
        print(f"dpfpl: {noop}", file=sys.stderr)
    prog.print_summary(summary, args.out or args.resume)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .registry import get_method, method_names

    for name in method_names():
        m = get_method(name)
        print(f"{name:12s} {m.description} [protocol: {m.default_protocol}]")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from .data import dataset_names

    print("\n".join(dataset_names()))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bench.compare import write_comparison  # issue 11: result folders side by side

    files = write_comparison(args.dirs, args.out, command="dpfpl report " + " ".join(sys.argv[2:]))
    print(files["README.md"])
    return 0


def build_parser(argv: Optional[Sequence[str]] = None) -> argparse.ArgumentParser:
    """The full parser; with ``argv``, only the subcommand it names is built in full (the others
    get a stub with their help line), so that a command imports only what it needs."""
    full = argv is None
    wanted = None if full else next((a for a in argv if not a.startswith("-")), None)
    parser = Parser(prog="dpfpl", description="Differentially private federated prompt learning on CLIP")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train one run into a run directory")
    p.add_argument("--config", help="TOML or JSON config file (flags override it)")
    p.add_argument("--out", default=None, help="run directory to write (default: runs/<method>-<dataset>-s<seed>)")
    p.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue an interrupted run")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of the live display")
    p.add_argument("--engine", choices=("inprocess", "flower"), default="inprocess",
                   help="inprocess (default) or flower: Flower's simulation engine on Ray, one ClientApp per "
                        "client (needs pip install 'dpfpl[flower]'; see dpfpl/flower/README.md)")
    add_config_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("report", help="compare result folders (or preset:paper's published numbers): tables "
                       "with deltas and intervals, overlaid plots (Markdown, LaTeX, PNG)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="result folders holding runs.csv, or preset:NAME")
    p.add_argument("--out", required=True, metavar="OUT", help="folder to write the comparison into")
    p.set_defaults(func=cmd_report)

    sub.add_parser("methods", help="list the methods").set_defaults(func=cmd_methods)
    sub.add_parser("datasets", help="list the dataset formats").set_defaults(func=cmd_datasets)
    for name, (mod, help_line) in EXTERNAL.items():
        if importlib.util.find_spec(mod.split(".")[0]) is None:
            continue  # that part of the suite is not installed in this checkout
        if not full and wanted != name:
            sub.add_parser(name, help=help_line, add_help=False)  # a stub: `dpfpl --help` lists it
            continue
        __import__(mod, fromlist=["add_parser"]).add_parser(sub)
        if name in SHOW_DEFAULTS:
            sub.choices[name].formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DpfplError as exc:
        print(f"dpfpl: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        from .rundir import os_error_line

        print(f"dpfpl: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dpfpl: interrupted; the run directory holds the last finished round (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
