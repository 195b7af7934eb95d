"""What a latency-aware step costs, and whether its local gains predict the whole network.

`select="entropy_latency"` measures, before each step, the latency gain of every remaining site
(`easier_kernels.fold.gains.site_gains`). Per model (the paper's CIFAR-style networks, width
0.25, batch 1, eager on CPU):
- the wall time of one `site_gains` call over every site, cold (an empty timing cache: the first
  step) and warm (the cache the previous step left: every later step);
- for the three moves it ranks highest and the lowest, the gain it predicts beside the whole
  folded network's measured saving: `ek.fold` of the network with the move linearized against
  `ek.fold` of the network without it, timed in turns (paired rounds).

Target (issue 15): a step costs seconds, not minutes. With --benchmark-disable (CI) one small
model runs once and the gains' structure is checked.
"""

from __future__ import annotations

import time

import torch

import easier_kernels as ek
from easier_kernels.fold import gains, planner
from easier_kernels.timing import compare

MODELS = {"mobilenet_v2": (1, 28), "resnet18": (1, 28), "vgg16_bn": (1, 28)}  # in_channels, size (Fashion-MNIST)


def pytest_generate_tests(metafunc):
    """Every model with the benchmarks enabled; one small one otherwise (CI)."""
    if "name" in metafunc.fixturenames:
        metafunc.parametrize("name", ["mobilenet_v2"] if metafunc.config.getoption("benchmark_disable") else list(MODELS))


def test_site_gains_cost_and_prediction(benchmark, record, name):
    small = not benchmark.enabled
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what the evidence runs use: one thread per run
    try:
        _measure(benchmark, record, name, small)
    finally:
        torch.set_num_threads(threads)


def _measure(benchmark, record, name: str, small: bool) -> None:
    torch.manual_seed(0)
    channels, size = MODELS[name]
    model = ek.models.build(name, num_classes=10, in_channels=channels, width=0.125 if small else 0.25).eval()
    x = torch.randn(1, channels, size, size, generator=torch.Generator().manual_seed(1))
    sites = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, [], x, plan="none")
    planner._TIMINGS.clear()
    started = time.perf_counter()
    moves = gains.site_gains(net, sites, (x,), runtime="eager")
    cold = time.perf_counter() - started
    benchmark.group, benchmark.name = "site_gains (eager, batch 1)", name
    warm = benchmark.pedantic(lambda: gains.site_gains(net, sites, (x,), runtime="eager"), rounds=1, iterations=1)
    assert {tuple(m["sites"]) for m in moves} >= {(s,) for s in sites}  # every site, and the pairs
    assert moves == warm  # a later step finds every timing in the cache
    if small:
        return
    warm_seconds = benchmark.stats.stats.median
    ranked = sorted(moves, key=lambda m: -m["ms_saved"])
    base = ek.fold(net, x, original=model)
    for move in ranked[:3] + ranked[-1:]:
        folded = ek.fold(ek.linearize(net, move["sites"], x), x, original=model)
        with torch.no_grad():
            timed = compare({"without": lambda: base(x), "with": lambda: folded(x)}, "without", seconds=4.0)
        measured = timed["without"]["ms"] * (1 - timed["with"]["ratio"])
        record({"model": name, "sites": len(sites), "moves": len(moves), "cold s": cold, "warm s": warm_seconds,
                "move": "+".join(move["sites"]), "predicted ms": move["ms_saved"], "measured ms": measured,
                "network ms": timed["without"]["ms"], "q1-q3": f"{timed['with']['q1']:.3f}-{timed['with']['q3']:.3f}"})
