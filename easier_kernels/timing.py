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

__all__ = ["synchronized", "median_seconds", "interleaved_times", "paired_ratio", "compare", "spread", "steady",
           "NOISY_SPREAD", "RETRIES"]

# The widest relative interquartile range ((q3 - q1) / median) of a paired ratio, or of the baseline's
# own round times, that is still trusted. Measured on a 2-vCPU AMD EPYC, 2 torch threads (fold's
# whole-network check, 1 s; ResNet-18 at width 1/8, batch 1, ~0.5 ms, and at width 1, batch 8, ~23 ms):
# idle, the ratio's <= 0.044 over 20 timings and the times' <= 0.032 over 10; with one to three other
# processes busy (a spinning Python loop, a torch matmul loop), one or the other was 0.15 to 580 in 37
# of 52 timings. The other 15 were tight; 2 of them at 500-1000x the idle milliseconds throughout
# (the original at 320 and 480 ms instead of 0.46): no spread shows that, only another timing of the
# same network (`payoff.against_start`).
NOISY_SPREAD = 0.10
RETRIES = 2  # timings repeated, each twice as long, while too wide: a passing load may be over by then


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
        ms_q1, ms, ms_q3 = statistics.quantiles(ts, n=4, method="inclusive")
        rows[label] = {"ms": ms * 1e3, "ratio": median, "q1": q1, "q3": q3, "rounds": rounds, "ms_q1": ms_q1 * 1e3,
                       "ms_q3": ms_q3 * 1e3}
    return rows


def spread(row: dict) -> tuple[float, float]:
    """(relative interquartile range of a `compare` row's paired ratio, that of its own times)."""
    own = (row["ms_q3"] - row["ms_q1"]) / row["ms"] if "ms_q1" in row and row["ms"] > 0 else 0.0
    return (row["q3"] - row["q1"]) / row["ratio"] if row["ratio"] > 0 else 0.0, own


def steady(timing: Callable[[int], dict], candidate: str, baseline: str, *, retries: int = RETRIES) -> dict:
    """A `compare` result from `timing(k)` (k = 0, 1, ...: each try may time longer), timed again
    while the candidate's paired ratio or the baseline's own times spread wider than NOISY_SPREAD:
    a busy machine makes both wide. The narrowest of at most 1 + `retries` tries; the candidate's
    row gets "tries", "noisy" (still too wide) and "noisy_why" (what was, "" if nothing)."""
    tries = []
    for k in range(1 + retries):
        timed = timing(k)
        tries.append((max(spread(timed[candidate])[0], spread(timed[baseline])[1]), timed))
        if tries[-1][0] <= NOISY_SPREAD:
            break
    width, timed = min(tries, key=lambda t: t[0])
    row, base = timed[candidate], timed[baseline]
    ratio_spread, own_spread = spread(row)[0], spread(base)[1]
    why = "" if width <= NOISY_SPREAD else (
        f"interquartile range / median at best {ratio_spread:.0%} for the paired ratio, {own_spread:.0%} for the "
        f"{baseline}'s own times over {len(tries)} timings, trusted up to {NOISY_SPREAD:.0%}: the machine is busy")
    timed[candidate] = {**row, "tries": len(tries), "noisy": bool(why), "noisy_why": why}
    return timed
