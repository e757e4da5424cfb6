"""Timing and memory measurement done right, the same on CPU and CUDA.

- :func:`time_callable`: warm-up calls (not timed), then several timed repeats; reports the median
  (and quartiles, min, mean). On CUDA every repeat is bracketed by CUDA events and synchronised, so
  asynchronous kernel launches are not mistaken for fast work; on CPU ``time.perf_counter``.
- :class:`Stopwatch`: the same for one region (``with Stopwatch(device) as sw: ...; sw.seconds``).
- :class:`PeakMemory`: peak memory of a region. CUDA: ``torch.cuda.max_memory_allocated`` after a
  reset (bytes held by tensors). CPU: the process resident set size, sampled every few ms by a
  background thread from ``/proc/self/statm`` (torch's CPU allocator bypasses Python's, so
  ``tracemalloc`` would not see tensors), with ``getrusage`` max RSS as fallback.
- :func:`device_name`: the name every timing row carries ("NVIDIA H100 80GB HBM3",
  "cpu: AMD EPYC ... (2 threads)").
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

import torch

__all__ = ["Timing", "Stopwatch", "PeakMemory", "time_callable", "device_name", "synchronize",
           "as_device", "cpu_name"]


def as_device(device: Any = None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device if isinstance(device, torch.device) else torch.device(device)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: Any = None) -> str:
    """Human-readable name of the device that does the work (with the CPU thread count)."""
    dev = as_device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu: {cpu_name()} ({torch.get_num_threads()} threads)"


def synchronize(device: Any = None) -> None:
    dev = as_device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


@dataclass
class Timing:
    """Summary of repeated timings of one callable (seconds)."""

    name: str
    median_s: float
    q25_s: float
    q75_s: float
    min_s: float
    mean_s: float
    repeats: int
    warmup: int
    device: str
    times_s: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("times_s")
        return d

    def __str__(self) -> str:
        return (f"{self.name}: median {self.median_s * 1e3:.3f} ms (IQR {self.q25_s * 1e3:.3f}-"
                f"{self.q75_s * 1e3:.3f}, n={self.repeats}) on {self.device}")


def _quantile(xs: list[float], q: float) -> float:
    s = sorted(xs)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize_times(name: str, times: list[float], warmup: int, device: Any = None) -> Timing:
    if not times:
        raise ValueError("no timings to summarise")
    return Timing(name, statistics.median(times), _quantile(times, 0.25), _quantile(times, 0.75), min(times),
                  statistics.fmean(times), len(times), warmup, device_name(device), list(times))


class Stopwatch:
    """Wall time of a region; synchronised CUDA events on CUDA, ``perf_counter`` on CPU."""

    def __init__(self, device: Any = None):
        self.device = as_device(device)
        self.seconds: float = float("nan")

    def __enter__(self) -> "Stopwatch":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self._end.record()
            torch.cuda.synchronize(self.device)
            self.seconds = self._start.elapsed_time(self._end) / 1e3
        else:
            self.seconds = time.perf_counter() - self._t0


def time_callable(fn: Callable[[], Any], name: str = "fn", *, warmup: int = 3, repeats: int = 10,
                  device: Any = None, setup: Optional[Callable[[], Any]] = None) -> Timing:
    """Median-of-``repeats`` timing of ``fn()`` after ``warmup`` untimed calls.

    ``setup`` (untimed) runs before every call, e.g. to reset state. On CUDA each call is timed
    with CUDA events and a synchronisation, so the result is the device time of the work."""
    if repeats < 1 or warmup < 0:
        raise ValueError("repeats must be >= 1 and warmup >= 0")
    dev = as_device(device)
    for _ in range(warmup):
        if setup:
            setup()
        fn()
    synchronize(dev)
    times = []
    for _ in range(repeats):
        if setup:
            setup()
        with Stopwatch(dev) as sw:
            fn()
        times.append(sw.seconds)
    return summarize_times(name, times, warmup, dev)


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r) * (1 if platform.system() == "Darwin" else 1024)


class PeakMemory:
    """Peak memory of a region: ``peak_mb`` and ``kind`` ('cuda_allocated' or 'cpu_rss').

    CPU: the peak resident set size of the whole process during the region (includes the model,
    the dataset and the Python runtime, i.e. what a user must have available), sampled every
    ``interval_s``; ``process_maxrss_mb`` is the lifetime maximum from ``getrusage``."""

    def __init__(self, device: Any = None, interval_s: float = 0.005):
        self.device = as_device(device)
        self.interval_s = interval_s
        self.peak_mb: Optional[float] = None
        self.kind = "cuda_allocated" if self.device.type == "cuda" else "cpu_rss"
        self.process_maxrss_mb: Optional[float] = None
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            v = _rss_bytes()
            if v is not None and v > self._peak:
                self._peak = v
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._peak = _rss_bytes() or 0
            self._thread = threading.Thread(target=self._sample, name="dpfpl-peak-rss", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            self._stop.set()
            self._thread.join()
            v = _rss_bytes()
            peak = max(self._peak, v or 0)
            self.peak_mb = peak / 2**20 if peak else _maxrss_bytes() / 2**20
        self.process_maxrss_mb = _maxrss_bytes() / 2**20
