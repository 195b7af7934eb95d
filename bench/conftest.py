"""Benchmark setup: which implementations to compare, and a summary table at the end.

Run with `pytest bench/`. Every figure in `extra_info` is a ratio or GB/s measured side by side
in the same test on the same tensor; the table printed at the end is what bench/RESULTS.md holds.

On a CUDA machine every benchmark with a `device` also runs on `cuda`; those cases carry the
`gpu` marker (`pytest -m gpu bench/...`: the CUDA cases only), and a benchmark marked `gpu`
itself runs on CUDA only (skipped, saying so, where there is none). Knobs:
- EK_BENCH_QUICK=1: a short run (scripts/gpu_check.sh): fewer shapes (each benchmark says which),
  no `reference` backend (it is the oracle, plain torch), 3 pytest-benchmark rounds, shorter
  side-by-side timing. The figures keep their meaning; they are only noisier.
- EK_BENCH_JSON=path: the summary rows (with machine, device and TF32 state) also go there as JSON.
Without pytest-benchmark installed the `benchmark` fixture is a stand-in (below): the figures in
the summary come from this file's own timing either way, so they are still measured.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from easier_kernels import ops
from easier_kernels.timing import median_seconds, synchronized

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' helpers: one source of real images
import helpers  # noqa: E402

QUICK = os.environ.get("EK_BENCH_QUICK", "0") == "1"
# EK_BENCH_STAND_IN=1 (with `-p no:benchmark`) runs the stand-in where pytest-benchmark is installed: to test it.
HAVE_PYTEST_BENCHMARK = importlib.util.find_spec("pytest_benchmark") is not None and os.environ.get("EK_BENCH_STAND_IN") != "1"
NEEDS_CUDA = "needs a CUDA GPU"

_ROWS: list[dict] = []


def devices() -> list[str]:
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def backends_for(device: str) -> list[str]:
    # The interpreted Triton is a correctness tool, not a fast path: never benchmarked.
    return [b for b in ops.available_backends() if device in ops.backends.devices_for(b) and not (b == "triton" and device == "cpu")
            and not (QUICK and b == "reference")]


def tf32_state(device) -> str:
    """Whether float32 convolutions (cuDNN) and matmuls may round through TF32 right now."""
    if torch.device(device).type != "cuda":
        return "n/a"
    on = lambda flag: "on" if flag else "off"  # noqa: E731
    return f"cuDNN {on(torch.backends.cudnn.allow_tf32)}, matmul {on(torch.backends.cuda.matmul.allow_tf32)}"


class tf32_allowed:
    """with tf32_allowed(False): float32 convolutions and matmuls in full precision inside the block
    (what correctness checks compare against); with tf32_allowed(True): TF32 allowed for both."""

    def __init__(self, allowed: bool):
        self.allowed = allowed

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = self.allowed
        return self

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


@pytest.fixture
def tf32():
    """tf32.state(device) -> "cuDNN on, matmul off" (or "n/a" off CUDA); `with tf32.allowed(False):`."""
    return SimpleNamespace(state=tf32_state, allowed=tf32_allowed)


def _case(device: str, *values):
    return pytest.param(*values, marks=[pytest.mark.gpu] if device == "cuda" else [])


def pytest_generate_tests(metafunc):
    """Every benchmark with `device` and `impl` runs for the plain-torch way and each backend, on
    each device; one with `device` alone runs on each device. CUDA cases are marked `gpu`; a
    benchmark marked `gpu` runs on CUDA only."""
    names = set(metafunc.fixturenames)
    if "device" not in names:
        return
    gpu_only = metafunc.definition.get_closest_marker("gpu") is not None
    where = [d for d in devices() if d == "cuda"] if gpu_only else devices()
    if not where:
        skip = pytest.mark.skip(reason=NEEDS_CUDA)
        values = ("cuda", "none") if "impl" in names else ("cuda",)
        metafunc.parametrize("device,impl" if "impl" in names else "device", [pytest.param(*values, marks=skip)],
                             ids=["cuda"])
        return
    if "impl" in names:
        cases = [(d, b) for d in where for b in ["torch", *backends_for(d)]]
        metafunc.parametrize("device,impl", [_case(d, d, b) for d, b in cases], ids=[f"{d}-{b}" for d, b in cases])
    else:
        metafunc.parametrize("device", [_case(d, d) for d in where], ids=where)


def device_seconds(fn, device, *, min_time: float | None = None) -> float:
    """Seconds per call of fn. CPU: easier_kernels.timing.median_seconds. CUDA: CUDA events around
    batches of back-to-back calls (no host sync between them, so a short kernel is not buried
    under the sync's latency), the median over 5 batches."""
    min_time = (0.05 if QUICK else 0.2) if min_time is None else min_time
    device = torch.device(device)
    if device.type != "cuda":
        return median_seconds(fn, device, min_time=min_time)
    fn()
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize(device)
    per_batch = max(1, min(10_000, int(min_time / 5 / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        for _ in range(per_batch):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / per_batch)
    return statistics.median(times)


@pytest.fixture
def record(benchmark, request):
    """record(row): puts a row of figures into the benchmark's extra_info and the summary table."""

    def run(row):
        row = {"group": benchmark.group, "impl": benchmark.name, **row}
        benchmark.extra_info.update(row)
        _ROWS.append({"bench": request.node.nodeid, **row})

    return run


@pytest.fixture
def measure(benchmark, record):
    """measure(fn, device, group=, name=, others={label: fn}) -> {label: seconds, "self": seconds}

    pytest-benchmark times fn (its table and JSON); then fn and every other candidate are timed
    again side by side with one method (`device_seconds`: warm-up, median), and those seconds are
    returned for the caller's ratios. `record(row)` (below) puts them into extra_info and the summary."""

    def run(fn, device, *, group, name, others):
        device = torch.device(device)
        benchmark.group = group
        benchmark.name = name
        if QUICK and benchmark.enabled:
            benchmark.pedantic(synchronized(fn, device), rounds=3, warmup_rounds=1, iterations=1)
        else:
            benchmark(synchronized(fn, device))
        if not benchmark.enabled:
            return None
        times = {"self": device_seconds(fn, device)}
        times.update({label: device_seconds(other, device) for label, other in others.items()})
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


# ---- without pytest-benchmark: a stand-in for the parts of its fixture the benchmarks use


class StandInBenchmark:
    """pytest-benchmark's `benchmark` fixture as far as bench/ uses it (calling it, `pedantic`,
    `enabled`, `group`, `name`, `extra_info`, `stats.stats.median`), timing with perf_counter.
    Its own figures are not reported anywhere; the summary's come from `device_seconds`."""

    def __init__(self, name: str, enabled: bool):
        self.name, self.enabled, self.group = name, enabled, None
        self.extra_info: dict = {}
        self.stats = None

    def __call__(self, fn, *args, **kwargs):
        return self.pedantic(fn, args, kwargs, rounds=5 if not QUICK else 3, warmup_rounds=1)

    def pedantic(self, target, args=(), kwargs=None, setup=None, rounds=1, warmup_rounds=0, iterations=1):
        kwargs = kwargs or {}
        if setup is not None:
            args, kwargs = setup() or (args, kwargs)
        if not self.enabled:
            return target(*args, **kwargs)
        for _ in range(warmup_rounds):
            target(*args, **kwargs)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for _ in range(iterations):
                result = target(*args, **kwargs)
            times.append((time.perf_counter() - t0) / iterations)
        self.stats = SimpleNamespace(stats=SimpleNamespace(median=statistics.median(times), min=min(times), max=max(times),
                                                           rounds=rounds))
        return result


if not HAVE_PYTEST_BENCHMARK:

    def pytest_addoption(parser):
        parser.addoption("--benchmark-disable", action="store_true",
                         help="(stand-in: pytest-benchmark is not installed) run each benchmark once, for correctness")

    @pytest.fixture
    def benchmark(request):
        return StandInBenchmark(request.node.name, enabled=not request.config.getoption("--benchmark-disable"))


# ---- the summary


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
            + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "")
            + (f"; images: {helpers.real_images_source()}" if helpers.real_images_source() else ""))


def pytest_sessionfinish(session):
    path = os.environ.get("EK_BENCH_JSON")
    if path:
        Path(path).write_text(json.dumps({"machine": machine(), "quick": QUICK, "pytest_benchmark": HAVE_PYTEST_BENCHMARK,
                                          "rows": _ROWS}, indent=1, default=str))


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("easier_kernels benchmark summary (ratios measured side by side)")
    tr.write_line(f"machine: {machine()}")
    tables: dict[tuple, list[dict]] = {}  # one table per set of columns (one per benchmark file)
    for row in _ROWS:
        row = {k: v for k, v in row.items() if k != "bench"}
        tables.setdefault(tuple(row), []).append(row)
    for keys, rows in tables.items():
        tr.write_line("")
        tr.write_line("| " + " | ".join(keys) + " |")
        tr.write_line("|" + "---|" * len(keys))
        for row in rows:
            cells = [f"{row[k]:.3g}" if isinstance(row[k], float) else str(row[k]) for k in keys]
            tr.write_line("| " + " | ".join(cells) + " |")
