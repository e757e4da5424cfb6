"""Live progress for ``dpfpl train``: a rich display of rounds and steps with current accuracy,
or one plain line per round when disabled (non-interactive logs)."""

from __future__ import annotations

import sys
from typing import Any, Optional

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _fmt(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


class LiveProgress:
    """Context manager: a rich progress display on stderr when ``enabled`` and stderr is a terminal
    (``self.progress``, None otherwise). :meth:`log` writes above the bars, or a plain
    ``prefix``-ed line on stderr when there are none and ``echo`` is set."""

    def __init__(self, enabled: bool, prefix: str, echo: bool, console: Optional[Console] = None):
        self.console = console or Console(stderr=True)
        self.live = enabled and self.console.is_terminal
        self.prefix, self.echo = prefix, echo
        self.progress: Optional[Progress] = None

    def __enter__(self):
        if self.live:
            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TimeRemainingColumn(), console=self.console)
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress:
            self.progress.stop()

    def log(self, msg: str) -> None:
        if self.progress:
            self.progress.console.log(msg)
        elif self.echo:
            print(f"{self.prefix} {msg}", file=sys.stderr)


class TrainProgress(LiveProgress):
    """Engine callback + context manager; status lines are printed even without the display."""

    def __init__(self, enabled: bool = True, console: Optional[Console] = None):
        super().__init__(enabled, "[dpfpl]", echo=True, console=console)
        self.rounds_task = self.steps_task = None

    def status(self, msg: str) -> None:
        self.log(msg)

    def step(self, done: int, total: int) -> None:
        if not self.progress:
            return
        if self.steps_task is None:
            self.steps_task = self.progress.add_task("  steps", total=total)
        self.progress.update(self.steps_task, completed=done, total=total)

    def on_round_end(self, engine, row: dict[str, Any]) -> None:
        total = engine.total_rounds
        acc = f"local {_fmt(row.get('local_acc'))} neigh {_fmt(row.get('neighbor_acc'))}" if "local_acc" in row else ""
        eps = f" eps {row['epsilon_spent_rdp']:.3g} (RDP)" if row.get("epsilon_spent_rdp") is not None else ""
        if self.progress:
            if self.rounds_task is None:
                self.rounds_task = self.progress.add_task("rounds", total=max(total, 1))
            self.progress.update(self.rounds_task, completed=row["round"], description=f"rounds  {acc}{eps}")
        elif total == 0:  # a method without training (zero-shot): one evaluation, no round
            print(f"[dpfpl] evaluated without training: {acc}", file=sys.stderr)
        else:
            print(f"[dpfpl] round {row['round']}/{total} loss {row.get('train_loss', float('nan')):.3f} {acc}{eps}",
                  file=sys.stderr)

    def print_summary(self, s: dict[str, Any], run_dir) -> None:
        t = Table(title=f"{s['method']} on {s['dataset']} ({s['rounds']} rounds, {s['wall_s']:.1f} s)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("local accuracy", _fmt(s.get("local_acc")))
        t.add_row("neighbour accuracy", _fmt(s.get("neighbor_acc")))
        t.add_row("zero-shot local / neighbour", f"{_fmt(s.get('zeroshot_local_acc'))} / {_fmt(s.get('zeroshot_neighbor_acc'))}")
        if s.get("epsilon_spent") is not None:
            t.add_row(f"epsilon spent ({s.get('accountant', 'rdp').upper()})", f"{s['epsilon_spent']:.4g}")
            if s.get("accountant") == "pld" and s.get("epsilon_rdp") is not None:
                t.add_row("epsilon spent (RDP)", f"{s['epsilon_rdp']:.4g}")
        if "noise_secret" in s:
            t.add_row("noise", "secret (OS CSPRNG)" if s["noise_secret"] else "REPRODUCIBLE from noise_seed (public)")
        if s.get("epsilon_claimed") is not None:
            t.add_row("epsilon claimed (reference rule)", f"{s['epsilon_claimed']:.4g}")
        if s.get("stopped_reason"):
            t.add_row("stopped", str(s["stopped_reason"]))
        t.add_row("run directory", str(run_dir))
        Console().print(t)
