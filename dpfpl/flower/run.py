"""Run a dpfpl training run through Flower's simulation engine (``dpfpl train --engine flower``):
resources, a private local Ray instance, and :func:`run_flower`, which takes the same arguments as
:func:`dpfpl.train.train` and writes the same run directory and ``summary.json``. Ray's temporary
files go inside the run directory (``RUN_DIR/.ray``, reached through a short symbolic link because
Ray's socket paths must stay under 107 bytes; removed after a successful run unless
``keep_ray_dir``). The server-side pieces (:class:`FlowerEngine`, :class:`Job`, the fault policy)
live in :mod:`dpfpl.flower.engine`; the apps in :mod:`dpfpl.flower.apps`.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from ..config import RunConfig
from ..errors import ConfigError, DpfplError
from ..registry import get_method
from ..train import finished_noop, open_run
from .engine import FaultPolicy, Job, require_flwr

# ------------------------------------------------------------------------------- resources
def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _model_bytes(cfg: RunConfig) -> int:
    """Rough size of the frozen model's weights (for the memory check)."""
    p = cfg.model.pretrained
    try:
        if p == "builtin":
            from ..assets import ASSET_DIR

            f = Path(ASSET_DIR) / f"{cfg.model.model}.safetensors"
            if f.is_file():
                return f.stat().st_size
        elif p and Path(p).is_file():
            return Path(p).stat().st_size
        from ..clip import _open_clip

        mc = _open_clip().get_model_config(cfg.model.model) or {}
        n = 0
        for key in ("vision_cfg", "text_cfg"):
            c = mc.get(key, {})
            w, layers = int(c.get("width", 512)), int(c.get("layers", 12))
            n += 12 * layers * w * w + int(c.get("vocab_size", 0)) * w
        return 4 * n
    except Exception:  # noqa: BLE001 - an estimate only
        return 0


ACTOR_BASE_BYTES = 900 * 2**20  # a Ray worker with torch, open_clip and flwr imported (measured ~0.7 GiB)


def plan_resources(cfg: RunConfig, n_images: int, client_cpus: float, num_cpus: Optional[int],
                   client_gpus: float) -> tuple[int, int, str]:
    """(Ray CPUs, actors, note). Raises ConfigError when the resources cannot hold one client."""
    if not client_cpus > 0:
        raise ConfigError(f"client_cpus must be positive, got {client_cpus!r}")
    cpus = int(num_cpus or os.cpu_count() or 1)
    if client_cpus > cpus:
        raise ConfigError(f"the Ray resources cannot hold one client: each ClientApp asks for {client_cpus} CPUs "
                          f"but this machine gives Ray {cpus}; lower the client CPUs (e.g. client_cpus=1)")
    if client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError(f"each ClientApp asks for {client_gpus} GPUs but no CUDA GPU is visible; "
                          "use client_gpus=0 (CPU) or run on a machine with a GPU")
    n = cfg.data.num_clients
    actors = max(1, min(int(cpus // client_cpus), n))  # more actors than clients would only load models
    note = ""
    mem = _mem_available()
    if mem is not None:
        per_actor = ACTOR_BASE_BYTES + 2 * _model_bytes(cfg) + n_images * 1024 * 4
        per_client = 64 * 1024 + 3 * cfg.train.n_ctx * 1024 * 4  # context state held by the simulation
        budget = int(0.85 * mem) - n * per_client - 2**30  # the driver process
        fit = budget // per_actor if budget > 0 else 0
        if fit < 1:
            raise ConfigError(
                f"{n} clients do not fit in memory: each ClientApp process needs ~{per_actor / 2**30:.1f} GiB "
                f"(model, features) and the simulation ~{n * per_client / 2**30:.2f} GiB of client state, "
                f"but only {mem / 2**30:.1f} GiB is available; use fewer clients or a smaller model, "
                "or run SuperNodes on several machines (see dpfpl/flower/README.md)")
        if fit < actors:
            note = f"memory holds {fit} ClientApp processes (of {actors} the CPUs allow)"
            actors = int(fit)
    return max(1, int(math.ceil(actors * client_cpus))), actors, note


def _short_dir(target: Path) -> tuple[str, Optional[Path]]:
    """A path to ``target`` short enough for Ray's AF_UNIX sockets (a symlink in the temp dir)."""
    target = target.resolve()
    if len(str(target)) <= 40:
        return str(target), None
    link = Path(tempfile.gettempdir()) / f"dpfpl-ray-{secrets.token_hex(4)}"
    try:
        os.symlink(target, link)
    except OSError:
        return str(target), None
    return str(link), link


def start_ray(ray_dir: Path, cpus: int, gpus: float, client_threads: int, verbose: bool) -> Optional[Path]:
    """Start a private local Ray instance on loopback; returns the symlink to remove afterwards."""
    import logging

    import ray

    if ray.is_initialized():
        raise DpfplError("Ray is already initialised in this process; the flower engine starts its own "
                         "local instance (call ray.shutdown() first)")
    ray_dir.mkdir(parents=True, exist_ok=True)
    temp, link = _short_dir(ray_dir)
    pythonpath = os.pathsep.join(p for p in ([os.getcwd()] + [p for p in sys.path if p]) if p)
    env = {"PYTHONPATH": pythonpath, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "OMP_NUM_THREADS": str(client_threads)}
    os.environ["PYTHONPATH"] = pythonpath
    try:
        ray.init(address="local", num_cpus=cpus, num_gpus=gpus, include_dashboard=False, _temp_dir=temp,
                 _node_ip_address="127.0.0.1", logging_level=logging.INFO if verbose else logging.ERROR,
                 log_to_driver=verbose, runtime_env={"env_vars": env}, configure_logging=True)
    except Exception as exc:  # noqa: BLE001 - reported with the remedies
        if ray.is_initialized():
            ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
        raise DpfplError(
            f"Ray could not start ({type(exc).__name__}: {str(exc)[:300]}). Check that the loopback "
            f"interface is up (Ray binds 127.0.0.1), that {ray_dir} is writable with free space, and that "
            "no firewall blocks local ports; Ray's logs are under that folder") from None
    return link


# ---------------------------------------------------------------------------------- entry point
def _preflight(cfg: RunConfig) -> int:
    """Cheap checks with the in-process engine's messages before Ray starts; returns #images."""
    from ..clip import _open_clip
    from ..data import load_run_dataset, partition

    t, d = cfg.train, cfg.data
    get_method(t.method)
    if cfg.model.model not in _open_clip().list_models():
        from ..clip import load_clip

        load_clip(cfg.model.model, "none", "cpu")  # raises the engine's ConfigError
    p = cfg.model.pretrained
    if p and p not in ("builtin", "none") and (os.path.sep in p or Path(p).suffix) and not Path(p).is_file():
        raise ConfigError(f"model.pretrained: checkpoint file not found: {p}")
    ds = load_run_dataset(cfg)
    partition(ds, d.num_clients, d.partition, seed=t.seed, beta=d.dirichlet_beta, shots=d.shots)
    return len(ds.train) + len(ds.test)


def run_flower(cfg: Optional[RunConfig] = None, out: Optional[str | Path] = None,
               resume: Optional[str | Path] = None, overrides: Optional[dict[str, Any]] = None,
               callbacks: tuple = (), on_status: Optional[Callable[[str], None]] = None,
               on_step: Optional[Callable[[int, int], None]] = None, *,
               policy: Optional[FaultPolicy] = None, faults: tuple = (), client_cpus: float = 1.0,
               num_cpus: Optional[int] = None, client_gpus: float = 0.0, model_init_seed: Optional[int] = 0,
               keep_ray_dir: bool = False, verbose: bool = False, **engine_kwargs: Any) -> dict[str, Any]:
    """Like :func:`dpfpl.train.train`, through Flower's simulation engine.

    ``policy``: the fault policy; ``faults``: injected :class:`Fault` s (tests); ``client_cpus`` /
    ``client_gpus``: Ray resources per ClientApp process (``num_cpus``: Ray's CPUs, default all);
    ``model_init_seed``: torch seed for a randomly initialised model (``pretrained='none'``), so
    that every ClientApp process builds the same weights; ``keep_ray_dir``: keep ``RUN_DIR/.ray``.
    Returns the summary; its ``_engine`` key holds the :class:`FlowerEngine`.
    """
    if engine_kwargs:
        raise ConfigError(f"the flower engine builds the model and data inside each ClientApp from the config; "
                          f"{sorted(engine_kwargs)} cannot be passed (use the in-process engine)")
    require_flwr()
    t0 = time.perf_counter()
    cfg, rd, checkpoint = open_run(cfg, out, resume, overrides, engine="flower")
    if rd is not None and resume is not None and rd.finished_summary(cfg) is not None:
        rd.release()
        return finished_noop(rd, rd.finished_summary(cfg))
    try:
        return _run_flower(cfg, rd, checkpoint, resume, t0, callbacks, on_status, on_step, policy, faults,
                           client_cpus, num_cpus, client_gpus, model_init_seed, keep_ray_dir, verbose)
    finally:
        if rd is not None:
            rd.release()


def _run_flower(cfg, rd, checkpoint, resume, t0, callbacks, on_status, on_step, policy, faults, client_cpus,
                num_cpus, client_gpus, model_init_seed, keep_ray_dir, verbose) -> dict[str, Any]:
    """:func:`run_flower` once the run directory is open (and locked)."""
    policy = policy or FaultPolicy()
    n_images = _preflight(cfg)
    cpus, actors, note = plan_resources(cfg, n_images, client_cpus, num_cpus, client_gpus)
    threads = max(1, int(client_cpus))
    cbs = ((rd,) if rd is not None else ()) + tuple(callbacks)
    job = Job(cfg, rd, checkpoint, str(resume) if resume is not None else None, cbs, on_status,
              on_step, policy, tuple(faults), model_init_seed, threads, t0)
    if note:
        job.status(note)
    own_tmp = rd is None
    ray_dir = (rd.path / ".ray") if rd is not None else Path(tempfile.mkdtemp(prefix="dpfpl-ray-"))
    from . import apps  # imports flwr

    job.status(f"starting Ray ({actors} ClientApp process{'es' if actors > 1 else ''}, temp files in {ray_dir})")
    t_ray = time.perf_counter()
    pythonpath = os.environ.get("PYTHONPATH")
    link, ok, started = None, False, False
    try:
        link = start_ray(ray_dir, cpus, client_gpus * actors, threads, verbose)
        started = True
        from flwr.simulation.ray_transport.ray_actor import pool_size_from_resources

        resources = {"num_cpus": float(client_cpus), "num_gpus": float(client_gpus)}
        try:
            pool_size_from_resources(resources)
        except ValueError:
            raise ConfigError(f"the Ray resources cannot hold one client (each ClientApp asks for {resources}); "
                              "lower client_cpus/client_gpus") from None
        job.stats["ray_start_s"] = time.perf_counter() - t_ray
        job.stats["actors"] = actors
        try:
            apps.run_simulation_job(job, apps.client_app, resources, verbose)
        except RuntimeError as exc:
            if job.summary is not None or "simulation" not in str(exc).lower():
                raise
            raise DpfplError(f"the Flower simulation engine failed ({exc}; cause: {exc.__cause__!r}); "
                             f"Ray's logs are kept in {ray_dir}") from exc
        if job.summary is None:
            raise DpfplError("the Flower simulation ended without a result (see the log above); "
                             f"Ray's logs are in {ray_dir}")
        ok = True
    except KeyboardInterrupt:
        job.abort.set()
        raise
    finally:
        job.abort.set()
        import ray

        if started and ray.is_initialized():
            ray.shutdown()
        if link is not None:
            link.unlink(missing_ok=True)
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
        if (ok and not keep_ray_dir) or own_tmp:
            shutil.rmtree(ray_dir, ignore_errors=True)
    summary = dict(job.summary)
    summary["_engine"] = job.engine
    return summary
