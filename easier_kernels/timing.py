"""Timing: how every latency in this package is measured (the fold's plans, its whole-network check,
the benchmarks).

Ratios are only meaningful side by side: time the candidates in the same process, on the same
inputs, with the same method (warm-up, then the median of repeated runs, or paired rounds).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["synchronized", "median_seconds", "interleaved_times", "paired_ratio", "compare"]


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """fn, followed by a device sync where the device runs asynchronously."""
    device = torch.device(device)
    if device.type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def median_seconds(fn: Callable, device: torch.device, *, min_time: float = 0.2, min_runs: int = 5) -> float:
    """Median wall time of fn after one warm-up call, over at least min_runs and min_time."""
    fn = synchronized(fn, device)
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def interleaved_times(candidates: dict[str, Callable], device="cpu", *, rounds: int = 10) -> dict[str, list[float]]:
    """Seconds of each candidate per round, run in turns (A B C A B C ...) after one warm-up each.
    For steps of a pipeline (a forward, a training step) that take ~a second: a tight loop per
    candidate would take too long, and turns let slow drifts of the machine hit all alike."""
    device = torch.device(device)
    runs = {label: synchronized(fn, device) for label, fn in candidates.items()}
    for fn in runs.values():
        fn()
    times = {label: [] for label in runs}
    for _ in range(rounds):
        for label, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - t0)
    return times


def paired_ratio(times: dict[str, list[float]], label: str, baseline: str) -> tuple[float, float, float]:
    """Quartiles (25%, median, 75%) over rounds of time[label] / time[baseline] within the same
    round: neighbours in time share the machine's state, where absolute times drift by 10%."""
    q1, median, q3 = statistics.quantiles([a / b for a, b in zip(times[label], times[baseline])], n=4, method="inclusive")
    return q1, median, q3


def compare(calls: dict[str, Callable], baseline: str, device="cpu", *, seconds: float = 2.0, min_rounds: int = 5,
            max_rounds: int = 60) -> dict[str, dict]:
    """Per candidate: median ms and the quartiles of its paired ratio to `baseline`, over as many
    interleaved rounds as fit in about `seconds` (at least min_rounds)."""
    device = torch.device(device)
    for fn in calls.values():  # warms up (compiles, allocates) before one round is timed
        fn()
    one_round = sum(median_seconds(fn, device, min_time=0.0, min_runs=3) for fn in calls.values())
    rounds = max(min_rounds, min(max_rounds, int(seconds / max(one_round, 1e-9))))
    times = interleaved_times(calls, device, rounds=rounds)
    rows = {}
    for label, ts in times.items():
        q1, median, q3 = paired_ratio(times, label, baseline)
        rows[label] = {"ms": statistics.median(ts) * 1e3, "ratio": median, "q1": q1, "q3": q3, "rounds": rounds}
    return rows
