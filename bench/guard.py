"""The regression guard: the hot paths a user pays for, each timed against what torch does
instead, in paired rounds in one process, compared with the ratio recorded in `guard.json`.

    python bench/guard.py             # measure, print the table, exit 1 when a path regressed
    python bench/guard.py --record    # write this machine's ratios into bench/guard.json
    python bench/guard.py count_on scoring_pass   # some paths only

Every figure is a ratio (our time / the reference's, the two run in turns, the median of the
per-round ratios), never an absolute time, so a slow or busy machine does not fail it; a path fails
when its ratio exceeds `LOOSENESS` times the recorded one, twice in a row (the second
measurement with twice the rounds, so a burst of load does not fail it either). `.ci/run` runs it
after the tests. It is not a test: tests never time anything (DEVELOPERS.md).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.benchmark import bn_folded
from easier_kernels.compat import import_torchvision
from easier_kernels.timing import interleaved_times, paired_ratio

RECORD = Path(__file__).with_name("guard.json")
LOOSENESS = 1.3  # a 2-core VM shared with others moves paired ratios by up to ~15%


def _count_on():
    """count_on vs torch.sum over the same DRAM-resident tensor (64 MiB)."""
    x = torch.randn(64, 256, 32, 32, generator=torch.Generator().manual_seed(0))
    nans = torch.zeros(256, dtype=torch.int64)
    return (lambda: ek.ops.count_on(x, 1, nan_counts=nans)), (lambda: x.sum()), 15


def _act_count():
    """act_count(relu) vs torch.relu on the same tensor (64 MiB): the activation and its counts in one pass."""
    x = torch.randn(64, 256, 32, 32, generator=torch.Generator().manual_seed(0))
    counts, nans = torch.zeros(256, dtype=torch.int64), torch.zeros(256, dtype=torch.int64)
    return (lambda: ek.ops.act_count(x, counts, "relu", 1, nan_counts=nans)), (lambda: torch.relu(x)), 15


def _scoring_pass():
    """ek.entropy_scores over 4 batches of 128 vs plain inference over the same batches (the paper's
    ResNet-18 at width 0.5, eval): capture, its check and shape recording included."""
    model = ek.models.resnet18(width=0.5).eval()
    batches = [torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]

    def plain():
        with torch.no_grad():
            for x in batches:
                model(x)
    return (lambda: ek.entropy_scores(model, batches)), plain, 5


def _training_step():
    """The scoring pass's model in train mode, a batch of 128 and one SGD step of any network
    sharing the model's parameters."""
    model = ek.models.resnet18(width=0.5).train()
    x = torch.randn(128, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (128,), generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def step(net):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()
    return model, x, step


def _ride_along_step():
    """A training step through EntropyMeter.model (every activation counted) vs the plain model's."""
    model, _, step = _training_step()
    meter = ek.EntropyMeter(model)
    return (lambda: step(meter.model)), (lambda: step(model)), 6


def _ride_along_first_step():
    """Making the meter (capture, check, shapes, counts) and its first step vs a plain step: what
    every prune step pays once."""
    model, x, step = _training_step()

    def first_step():
        meter = ek.EntropyMeter(model, example_inputs=x)
        step(meter.model)
        meter.close()
    return first_step, (lambda: step(model)), 6


def _fold():
    """ek.fold's result vs the original with batch norms folded, eager, batch 16: torchvision's
    MobileNetV2 (width 0.25, 64 px) with its first 17 of 35 sites linearized (planned, folded and
    checked as `ek.fold` does)."""
    model = import_torchvision().models.mobilenet_v2(width_mult=0.25).eval()
    x = torch.randn(16, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    sites = [s.name for s in ek.find_sites(model, x)][:17]
    folded = ek.fold(ek.linearize(model, sites, x).eval(), x, original=model)
    baseline = bn_folded(copy.deepcopy(model))
    return torch.no_grad()(lambda: folded(x)), torch.no_grad()(lambda: baseline(x)), 15


PATHS: dict[str, Callable] = {
    "count_on": _count_on,
    "act_count_relu": _act_count,
    "scoring_pass": _scoring_pass,
    "ride_along_step": _ride_along_step,
    "ride_along_first_step": _ride_along_first_step,
    "fold_eager": _fold,
}


def measure(path: str, rounds_factor: int = 1) -> tuple[float, float, float]:
    """(q1, median, q3) of our time / the reference's over paired rounds."""
    ours, reference, rounds = PATHS[path]()
    times = interleaved_times({"ours": ours, "reference": reference}, rounds=rounds * rounds_factor)
    return paired_ratio(times, "ours", "reference")


def steady_heap() -> None:
    """Freed memory stays in glibc's heap (no mmap, no trim): page faults would otherwise time the
    allocator's history, not the work (bench/conftest.py, `steady_malloc`)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    libc.mallopt(-4, 0)          # M_MMAP_MAX
    libc.mallopt(-1, 2**31 - 1)  # M_TRIM_THRESHOLD


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.exists() else []
    return f"{names[0] if names else platform.processor()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def judge(name: str, recorded: float | None) -> tuple[tuple[float, float, float], float | None, str]:
    """(the quartiles of the path's ratio, its limit, the verdict): above the limit, it is measured
    again with twice the rounds (a burst of load fails nothing), and fails only then."""
    quartiles = measure(name)
    limit = None if recorded is None else recorded * LOOSENESS
    if limit is not None and quartiles[1] > limit:
        quartiles = measure(name, rounds_factor=2)
    verdict = "new" if limit is None else "ok" if quartiles[1] <= limit else "FAIL"
    return quartiles, limit, verdict


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help=f"paths to measure (default: all): {', '.join(PATHS)}")
    parser.add_argument("--record", action="store_true", help=f"write the measured ratios to {RECORD.name}")
    args = parser.parse_args(argv)
    if unknown := [p for p in args.paths if p not in PATHS]:
        parser.error(f"unknown path(s) {', '.join(unknown)}; the paths are {', '.join(PATHS)}")
    steady_heap()
    recorded = json.loads(RECORD.read_text())["paths"] if RECORD.exists() else {}
    print(f"guard: {machine()}; a path fails above {LOOSENESS} x its recorded ratio")
    print(f"{'path':<22} {'ours / reference (q1-q3)':<26} {'recorded':>9} {'limit':>7}  verdict")
    shown = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
    measured, failed, started = {}, [], time.perf_counter()
    for name in args.paths or list(PATHS):
        before = None if args.record else recorded.get(name, {}).get("ratio")
        (q1, ratio, q3), limit, verdict = judge(name, before)
        measured[name] = {"ratio": round(ratio, 3), "what": " ".join(PATHS[name].__doc__.split())}
        print(f"{name:<22} {ratio:.3f} ({q1:.2f}-{q3:.2f}){'':<10} {shown(before):>9} {shown(limit):>7}  "
              f"{'recorded' if args.record else verdict}", flush=True)
        if verdict == "FAIL":
            failed.append(f"{name}: ours / reference {ratio:.3f} now, {before:.3f} recorded (limit {limit:.3f})")
    print(f"guard: {len(measured)} paths in {time.perf_counter() - started:.0f} s")
    if args.record:
        record = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), "looseness": LOOSENESS,
                  "paths": {**recorded, **measured}}
        RECORD.write_text(json.dumps(record, indent=1) + "\n")
        print(f"guard: recorded in {RECORD}")
    for line in failed:
        print(f"guard: REGRESSION {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
