"""Benchmark setup: which implementations to compare, and a summary table at the end.

Run with `pytest bench/`. Every figure in `extra_info` is a ratio or GB/s measured side by side
in the same test on the same tensor; the table printed at the end is what bench/RESULTS.md holds.
"""

from __future__ import annotations

import platform

import pytest
import torch

from easier_kernels import ops
from easier_kernels.benchmark import median_seconds, synchronized

_ROWS: list[dict] = []


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    # The interpreted Triton is a correctness tool, not a fast path: never benchmarked.
    return [b for b in ops.available_backends() if device in ops.backends.devices_for(b) and not (b == "triton" and device == "cpu")]


def pytest_generate_tests(metafunc):
    """Every benchmark with `device` and `impl` runs for the plain-torch way and each backend."""
    if {"device", "impl"} <= set(metafunc.fixturenames):
        cases = [(d, b) for d in devices() for b in ["torch", *backends_for(d)]]
        metafunc.parametrize("device,impl", cases, ids=[f"{d}-{b}" for d, b in cases])


@pytest.fixture
def measure(benchmark):
    """measure(fn, device, group=, name=, others={label: fn}) -> {label: seconds, "self": seconds}

    pytest-benchmark times fn (its table and JSON); then fn and every other candidate are timed
    again side by side with one method (warm-up, median), and those seconds are returned for
    the caller's ratios. `record(row)` (below) puts them into extra_info and the summary."""

    def run(fn, device, *, group, name, others):
        device = torch.device(device)
        benchmark.group = group
        benchmark.name = name
        benchmark(synchronized(fn, device))
        if not benchmark.enabled:
            return None
        times = {"self": median_seconds(fn, device)}
        times.update({label: median_seconds(other, device) for label, other in others.items()})
        return times

    def record(row):
        row = {"group": benchmark.group, "impl": benchmark.name, **row}
        benchmark.extra_info.update(row)
        _ROWS.append(row)

    run.record = record
    return run


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("easier_kernels benchmark summary (ratios measured side by side)")
    tr.write_line(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
                  + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    keys = []
    for row in _ROWS:
        keys += [k for k in row if k not in keys]
    tr.write_line("| " + " | ".join(keys) + " |")
    tr.write_line("|" + "---|" * len(keys))
    for row in _ROWS:
        cells = [f"{row[k]:.3g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        tr.write_line("| " + " | ".join(cells) + " |")
