"""Benchmark setup: which implementations to compare, and a summary table at the end.

Run with `pytest bench/`. Every figure in `extra_info` is a ratio or GB/s measured side by side
in the same test on the same tensor; the table printed at the end is what bench/RESULTS.md holds.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform
import sys
from pathlib import Path

import pytest
import torch

from easier_kernels import ops
from easier_kernels.timing import median_seconds, synchronized

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers: one source of real images
import helpers  # noqa: E402

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
def record(benchmark):
    """record(row): puts a row of figures into the benchmark's extra_info and the summary table."""

    def run(row):
        row = {"group": benchmark.group, "impl": benchmark.name, **row}
        benchmark.extra_info.update(row)
        _ROWS.append(row)

    return run


@pytest.fixture
def measure(benchmark, record):
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

    run.record = record
    return run


@pytest.fixture
def steady_malloc():
    """Pipeline benchmarks (whole forwards and training steps at batch 128) allocate 4-34 MB per
    layer output. On this VM faulting in fresh pages costs more than the convolutions, and
    whether glibc hands freed memory back to the OS depends on its history, so the same forward
    took 0.4-3.4 s. Inside this fixture freed memory stays in the heap (no mmap, no trim), so
    timings measure compute; every candidate runs under it alike."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_trim_threshold, m_mmap_max = -1, -4  # glibc's mallopt parameters
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)
    yield
    libc.mallopt(m_mmap_max, 65536)  # glibc's defaults
    libc.mallopt(m_trim_threshold, 128 * 1024)


@pytest.fixture(scope="session")
def real_images():
    """Real images (normalized float32 [N, 3, 32, 32]) and labels: tests/helpers.py's, the
    CIFAR-10 subset where the shared data is here, else the shipped Fashion-MNIST subset."""
    return helpers.real_images()


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("easier_kernels benchmark summary (ratios measured side by side)")
    tr.write_line(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
                  + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
                  + (f"; images: {helpers.real_images_source()}" if helpers.real_images_source() else ""))
    tables: dict[tuple, list[dict]] = {}  # one table per set of columns (one per benchmark file)
    for row in _ROWS:
        tables.setdefault(tuple(row), []).append(row)
    for keys, rows in tables.items():
        tr.write_line("")
        tr.write_line("| " + " | ".join(keys) + " |")
        tr.write_line("|" + "---|" * len(keys))
        for row in rows:
            cells = [f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
            tr.write_line("| " + " | ".join(cells) + " |")
