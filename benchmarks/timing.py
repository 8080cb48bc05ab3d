"""Timing: CUDA events on a GPU, ``time.perf_counter`` on the CPU; medians after warm-up.

``measure`` follows ``triton.testing.do_bench``'s recipe (one call to compile/warm caches,
a short estimate, warm-up for ``warmup_ms``, then ``rep_ms`` of individually timed calls)
but keeps every sample so the median, spread and the pytest-benchmark stats come from the
same run.  Instead of flushing L2 between calls, the callables rotate through enough input
sets that each call reads data last touched more than an L2-size ago (``rotation_count``).
"""
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import torch


@dataclass
class Timing:
    samples_ms: List[float]
    method: str  # cuda_events | cpu_perf_counter | single_call
    peak_mem_bytes: Optional[int] = None
    warmup_calls: int = 0

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def min_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def iqr_ms(self) -> float:
        if len(self.samples_ms) < 4:
            return 0.0
        q = statistics.quantiles(self.samples_ms, n=4)
        return q[2] - q[0]

    def as_dict(self) -> dict:
        return dict(median_ms=self.median_ms, mean_ms=self.mean_ms, min_ms=self.min_ms, iqr_ms=self.iqr_ms,
                    n_samples=len(self.samples_ms), timing=self.method, warmup_calls=self.warmup_calls,
                    peak_mem_bytes=self.peak_mem_bytes)


def rotation_count(bytes_per_set: int, l2_bytes: int, factor: float = 2.0, cap: int = 16) -> int:
    """How many input sets to rotate through so they span ``factor`` x the L2 cache."""
    if bytes_per_set <= 0 or l2_bytes <= 0:
        return 1
    return int(max(1, min(cap, math.ceil(factor * l2_bytes / bytes_per_set))))


class Rotation:
    """Cycles through a list of input sets: ``next()`` returns the next one."""

    def __init__(self, sets: Sequence):
        if not sets:
            raise ValueError("Rotation needs at least one input set")
        self.sets, self.i = list(sets), 0

    def __len__(self) -> int:
        return len(self.sets)

    def next(self):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        return s


def repetitions(estimate_ms: float, budget_ms: float, lo: int, hi: int) -> int:
    """Calls that fit ``budget_ms`` at ``estimate_ms`` each, clamped to [lo, hi]."""
    n = int(budget_ms / max(estimate_ms, 1e-6))
    return max(lo, min(hi, n))


def l2_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20))
    return 32 << 20  # a generous guess for a CPU's last-level cache


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced_perf_counter() -> float:
    """A timer for pytest-benchmark that waits for queued GPU work first."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


@contextmanager
def peak_memory(device: torch.device):
    """Yields a dict whose ``bytes`` is the peak allocated CUDA memory inside the block (None on CPU)."""
    box = {"bytes": None}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield box
    if device.type == "cuda":
        synchronize(device)
        box["bytes"] = int(torch.cuda.max_memory_allocated(device))


def measure(fn: Callable[[], object], device: torch.device, *, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            min_reps: int = 5, max_reps: int = 1000, single: bool = False) -> Timing:
    """Median-ready samples of ``fn()`` (milliseconds per call).

    ``single``: call ``fn`` once and time that (the smoke mode: checks the path, says
    nothing about speed).
    """
    with peak_memory(device) as peak:
        if single:
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            samples, method, n_warm = [(time.perf_counter() - t0) * 1e3], "single_call", 0
        elif device.type == "cuda":
            samples, n_warm = _cuda_samples(fn, device, warmup_ms, rep_ms, min_reps, max_reps)
            method = "cuda_events"
        else:
            samples, n_warm = _cpu_samples(fn, warmup_ms, rep_ms, min_reps, max_reps)
            method = "cpu_perf_counter"
    return Timing(samples, method, peak["bytes"], n_warm)


def _cuda_samples(fn, device, warmup_ms, rep_ms, min_reps, max_reps):
    fn()  # first call: compilation, autotuning, cuDNN algorithm search
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    estimate = start.elapsed_time(end) / 3
    n_warm = repetitions(estimate, warmup_ms, 1, max_reps)
    n_rep = repetitions(estimate, rep_ms, min_reps, max_reps)
    for _ in range(n_warm):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) for s, e in zip(starts, ends)], n_warm + 4


def _cpu_samples(fn, warmup_ms, rep_ms, min_reps, max_reps):
    t0 = time.perf_counter()
    fn()
    estimate = (time.perf_counter() - t0) * 1e3
    n_warm = repetitions(estimate, warmup_ms, 1, max_reps)
    n_rep = repetitions(estimate, rep_ms, min_reps, max_reps)
    for _ in range(n_warm):
        fn()
    samples = []
    for _ in range(n_rep):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples, n_warm + 1
