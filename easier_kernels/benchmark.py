"""Timing helpers and the real-network shapes shared by `bench/` and `easier-kernels bench`.

Ratios are only meaningful side by side: time both candidates in the same process, on the same
tensor, with the same method (warm-up, then the median of repeated runs).
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from . import ops
from .ops.reference import reduce_dims

# (name, shape, channel_dim, memory format) of activation inputs in real networks.
SHAPES = {
    "resnet18-cifar-s1": ((128, 64, 32, 32), 1, "contiguous"),
    "resnet18-cifar-s1-cl": ((128, 64, 32, 32), 1, "channels_last"),
    "resnet18-cifar-s2": ((128, 128, 16, 16), 1, "contiguous"),
    "resnet18-cifar-s3": ((128, 256, 8, 8), 1, "contiguous"),
    "resnet18-cifar-s4": ((128, 512, 4, 4), 1, "contiguous"),
    "mobilenetv2-224-expand112": ((32, 96, 112, 112), 1, "contiguous"),
    "mobilenetv2-224-expand56": ((32, 144, 56, 56), 1, "contiguous"),
    "mobilenetv2-224-expand14": ((32, 384, 14, 14), 1, "contiguous"),
    "mobilenetv2-224-last7": ((32, 1280, 7, 7), 1, "contiguous"),
    "vit-b16-mlp": ((32, 197, 3072), -1, "contiguous"),
}


def make_input(name: str, device="cpu", dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, int]:
    shape, channel_dim, memory_format = SHAPES[name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, channel_dim


def synchronized(fn: Callable, device: torch.device) -> Callable:
    """fn, followed by a device sync where the device runs asynchronously."""
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
    q1, median, q3 = statistics.quantiles([a / b for a, b in zip(times[label], times[baseline])], n=4)
    return q1, median, q3


def gbps(x: torch.Tensor, seconds: float, passes: int = 1) -> float:
    """Effective bandwidth: `passes` full passes over x's bytes per call."""
    return passes * x.numel() * x.element_size() / seconds / 1e9


def kernel_report(names=("resnet18-cifar-s1", "vit-b16-mlp"), device="cpu") -> list[dict]:
    """A short count_on / act_count(relu) benchmark: GB/s and ratios against torch, per shape."""
    device = torch.device(device)
    rows = []
    for name in names:
        x, cdim = make_input(name, device)
        channels = x.shape[cdim]
        counts = torch.zeros(channels, dtype=torch.int64, device=device)
        nans = torch.zeros_like(counts)
        t_sum = median_seconds(lambda: x.sum(), device)
        t_torch_way = median_seconds(lambda: (x >= 0).sum(reduce_dims(x, cdim)), device)
        t_relu = median_seconds(lambda: torch.relu(x), device)
        t_count = median_seconds(lambda: ops.count_on(x, cdim, nan_counts=nans), device)
        t_act = median_seconds(lambda: ops.act_count(x, counts, "relu", cdim, nan_counts=nans), device)
        rows.append(
            {
                "shape": name,
                "backend": ops.backends.backend_name(device),
                "count_on GB/s": gbps(x, t_count),
                "count_on / torch.sum bandwidth": t_sum / t_count,
                "count_on speed-up vs (x>=0).sum": t_torch_way / t_count,
                "act_count(relu) / relu time": t_act / t_relu,
            }
        )
    return rows


# ---- folding: latency of a model's variants


def bn_folded(model: torch.nn.Module) -> torch.nn.Module:
    """The original with batch norms folded into their convs by torch's own pass
    (`torch.fx.experimental.optimization.fuse`); a model fx's plain tracer cannot trace, or one
    without batch norms, is returned as it is."""
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    return fuse(model.eval())


def fold_variants(model: torch.nn.Module, sites, example: torch.Tensor, *, compile: bool = True) -> dict:
    """The variants a folded model is measured against, all in eval mode: the original (eager),
    its batch norms folded (eager, and torch.compile'd), the network with `sites` linearized but
    not folded, `ek.fold` of it (decided by measuring on example's device), and that compiled."""
    from .fold import fold
    from .linearize import linearize

    model = model.eval()
    net = linearize(model, sites, example).eval()
    variants = {"original": model, "bn_folded": bn_folded(model), "linearized": net, "folded": fold(net, example)}
    if compile:
        variants["compiled_bn_folded"] = torch.compile(variants["bn_folded"])
        variants["compiled_folded"] = torch.compile(variants["folded"])
    return variants


def latency_ratios(variants: dict, example: torch.Tensor, *, baseline: str = "bn_folded", seconds: float = 20.0) -> dict:
    """Per variant: median ms per forward and the median (q1, q3) of its per-round time over the
    baseline's, the variants run in turns (see `interleaved_times`) for about `seconds`."""
    device = example.device
    with torch.no_grad():
        calls = {label: (lambda m=m: m(example)) for label, m in variants.items()}
        for fn in calls.values():  # compiles and warms up every variant before timing starts
            fn()
        one_round = sum(median_seconds(fn, device, min_time=0.0, min_runs=3) for fn in calls.values())
        rounds = max(5, min(60, int(seconds / one_round)))
        times = interleaved_times(calls, device, rounds=rounds)
    rows = {}
    for label, ts in times.items():
        q1, median, q3 = paired_ratio(times, label, baseline)
        rows[label] = {"ms": statistics.median(ts) * 1e3, "ratio": median, "q1": q1, "q3": q3, "rounds": rounds}
    return rows
