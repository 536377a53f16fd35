"""Timing steps: ``warmup`` untimed steps, then every timed step alone (CUDA events on a GPU,
``time.perf_counter`` on a CPU), the statistics reported over the times, and the progress bar of a
measurement."""
from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], object], device, warmup: int, timed: int,
               on_timed_start: Callable[[], None] | None = None,
               progress: Callable[[int], None] | None = None) -> dict:
    """Run ``warmup`` untimed steps, then ``timed`` steps each timed alone (``on_timed_start`` is called
    in between, after a sync: telemetry brackets the timed steps only; ``progress(n)`` is told of the
    steps done after the warm-up and after the timed loop, never inside it).

    On CUDA: an event pair around every step, all recorded back to back with no host sync in between
    (what the device spent per step, launch gaps included); on a CPU: perf_counter around every step.
    Returns {"first_step_s", "warmup_s", "times_s" (list), "wall_s" (the timed loop, synchronised)}."""
    device = torch.device(device)
    synchronize(device)
    t0 = time.perf_counter()
    first = None
    for i in range(warmup):
        step()
        if i == 0:
            synchronize(device)
            first = time.perf_counter() - t0
    synchronize(device)
    warm = time.perf_counter() - t0
    if progress is not None:
        progress(warmup)
    if on_timed_start is not None:
        on_timed_start()
    times: list[float] = []
    if device.type == "cuda":
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(timed)]
        w0 = time.perf_counter()
        for a, b in ev:
            a.record()
            step()
            b.record()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - w0
        times = [a.elapsed_time(b) / 1e3 for a, b in ev]
    else:
        w0 = time.perf_counter()
        for _ in range(timed):
            s = time.perf_counter()
            step()
            times.append(time.perf_counter() - s)
        wall = time.perf_counter() - w0
    if progress is not None:
        progress(timed)
    return {"first_step_s": first, "warmup_s": warm, "times_s": times, "wall_s": wall}


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    s = sorted(xs)
    if not s:
        raise ValueError("no samples")
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def time_stats(times: list[float], wall_s: float | None = None) -> dict:
    """median, p10, p90, min, mean (seconds) and steps/s (1 / median; and over the wall time)."""
    med = statistics.median(times)
    out = {"n": len(times), "median_s": med, "p10_s": percentile(times, 10), "p90_s": percentile(times, 90),
           "min_s": min(times), "mean_s": statistics.fmean(times),
           "steps_per_s": 1.0 / med if med > 0 else None}
    if wall_s:
        out["wall_steps_per_s"] = len(times) / wall_s
    return out


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, file=sys.stderr, leave=False)
