"""Time per round: Flower engine vs in-process engine (issue 6's measurement).

    python -m bench.flower_rounds [--clients 10 50] [--rounds 5] [--out results/flower]

Same config on both engines (synthetic default, builtin tiny CLIP, Dirichlet split so that 50
clients get data, non-private), torch on one thread in this process and in every ClientApp.
Writes ``OUT/flower_rounds.md`` (a Markdown table) and ``OUT/flower_rounds.json`` (every round's
training time and the Flower-side facts: Ray start-up, ClientApp build, messages, bytes), and
checks that both engines reached the same global prompt.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from dpfpl.rundir import atomic_write_bytes, atomic_write_json


def _cfg(n: int, rounds: int):
    from dpfpl.config import RunConfig

    return RunConfig().update({"pretrained": "builtin", "num_clients": n, "rounds": rounds,
                               "partition": "dirichlet", "eval_every": rounds})


def measure(n: int, rounds: int, work: Path) -> dict[str, Any]:
    """One in-process and one Flower run of the same config; per-round train times and start-up."""
    import torch

    from dpfpl.flower import run_flower
    from dpfpl.train import train

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    ip = train(_cfg(n, rounds), out=work / f"inprocess-{n}")
    ip_wall = time.perf_counter() - t0
    t0 = time.perf_counter()
    fl = run_flower(_cfg(n, rounds), out=work / f"flower-{n}")
    fl_wall = time.perf_counter() - t0
    e_ip, e_fl = ip.pop("_engine"), fl.pop("_engine")
    same = bool(torch.equal(e_ip.server.p_G, e_fl.server.p_G))
    r_ip = [r["train_s"] for r in e_ip.history]
    r_fl = [r["train_s"] for r in e_fl.history]
    return {"clients": n, "rounds": rounds, "local_steps": e_ip.local_steps, "same_global_prompt": same,
            "inprocess_round_s": r_ip, "flower_round_s": r_fl, "inprocess_wall_s": ip_wall, "flower_wall_s": fl_wall,
            "inprocess_train_s": ip["train_s"], "flower_train_s": fl["train_s"], "flower": fl.get("flower", {}),
            "local_acc": (ip["local_acc"], fl["local_acc"])}


def table(rows: list[dict[str, Any]]) -> str:
    med = statistics.median
    lines = ["| clients (K steps) | train time per round (median): in process / Flower | whole run wall: in process / "
             "Flower | Flower one-off: Ray start / ClientApp build | same global prompt |",
             "|---|---|---|---|---|"]
    for r in rows:
        f = r["flower"]
        ray = f.get("ray_start_s")
        build = f.get("clientapp_build_s")
        lines.append(f"| {r['clients']} (K={r['local_steps']}) | {med(r['inprocess_round_s']):.3f} s / "
                     f"{med(r['flower_round_s']):.3f} s | {r['inprocess_wall_s']:.1f} s / {r['flower_wall_s']:.1f} s | "
                     f"{'-' if ray is None else f'{ray:.1f} s'} / {'-' if build is None else f'{build:.1f} s'} | "
                     f"{'yes' if r['same_global_prompt'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[10, 50])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="results/flower")
    a = p.parse_args(argv)
    out = Path(a.out)
    rows = []
    with tempfile.TemporaryDirectory(prefix="dpfpl-flower-rounds-") as tmp:
        for n in a.clients:
            rows.append(measure(n, a.rounds, Path(tmp)))
            print(f"{n} clients done", flush=True)
    text = (f"Produced by `python -m bench.flower_rounds --clients {' '.join(map(str, a.clients))} --rounds {a.rounds}` "
            f"({time.strftime('%Y-%m-%d')}).\n\n" + table(rows))
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "flower_rounds.json", rows)
    atomic_write_bytes(out / "flower_rounds.md", text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
