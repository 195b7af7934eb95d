"""A scoring pass over real CIFAR-10 batches vs plain inference over the same batches, vs the
reference code's way of scoring, and the peak memory of each.

Targets (issue 3, DESIGN.md): scoring / plain inference <= 1.05 on CPU (1.02 on GPU); the
reference approach's overhead >= 5x ours; peak memory of a scoring pass <= 1.05x plain inference.

Time is taken per batch, the candidates in turns on the same real batch (plain forward, the
traced graph with plain activations, forward with probes, the reference's forward with hooks +
per-layer ops), as quartiles of per-round ratios (under `steady_malloc`, see conftest.py);
a pass's fixed cost (tracing, instrumenting, the final entropies) is timed apart and reported
in ms. The reference approach, as the method's code does it: forward hooks store each
activation's input, then per batch and layer torch ops give on-fractions and entropies, one
`.item()` per layer per batch.

Peak memory is measured in a fresh process per candidate (`python bench/bench_scoring.py peak
MODEL CANDIDATE`): glibc's mmap threshold is pinned so freed tensors leave the resident set at
once, the kernel's peak-RSS mark is reset after a warm-up pass, and the peak's rise over the
resident set before the pass is reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import easier_kernels as ek
from easier_kernels.timing import interleaved_times, median_seconds, paired_ratio
from easier_kernels.activations import ACTIVATION_MODULES

MODELS = ("resnet18", "mobilenet_v2")
BATCH = 128


class ReferenceScoring:
    """The reference code's scoring: hooks store activation inputs; per-batch torch ops; .item()."""

    def __init__(self, model):
        self.model, self.stored, self.scores = model, [], []
        self.hooks = [m.register_forward_hook(lambda m, inputs, out: self.stored.append(inputs[0]))
                      for m in model.modules() if type(m) in ACTIVATION_MODULES]

    def batch(self, x):
        self.stored.clear()
        with torch.no_grad():
            self.model(x)
            for a in self.stored:
                p = (a >= 0).float().mean([d for d in range(a.dim()) if d != 1])
                h = -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p)).nan_to_num(0.0)
                self.scores.append(h.mean().item())

    def close(self):
        for h in self.hooks:
            h.remove()


def plain_pass(model, batches) -> None:
    with torch.no_grad():
        for x in batches:
            model(x)


def reference_pass(model, batches) -> None:
    reference = ReferenceScoring(model)
    for x in batches:
        reference.batch(x)
    reference.close()


PASSES = {
    "plain": plain_pass,
    "pooled": lambda model, batches: ek.entropy_scores(model, batches, mode="pooled"),
    "batch_mean": lambda model, batches: ek.entropy_scores(model, batches, mode="batch_mean"),
    "reference": reference_pass,
}


@pytest.mark.parametrize("name", MODELS)
def test_scoring_pass(benchmark, record, real_images, steady_malloc, name):
    torch.manual_seed(0)
    model = ek.models.paper_model(name).eval()
    images = real_images[0]
    if not benchmark.enabled:  # CI: one small pass of each candidate, for correctness only
        benchmark(lambda: [run(model, list(images[:16].split(8))) for run in PASSES.values()])
        return
    batches = list(images[: 2 * BATCH].split(BATCH))
    benchmark.group, benchmark.name = f"scoring pass {name} batch {BATCH}", "pooled"
    benchmark.pedantic(PASSES["pooled"], args=(model, batches), rounds=1, iterations=1)

    meters = {mode: ek.EntropyMeter(model, mode=mode) for mode in ek.entropy.MODES}
    reference = ReferenceScoring(model)
    x = batches[0]

    def forward(net):
        with torch.no_grad():
            net(x)

    def graph_only():  # the same GraphModule with plain activations: what the counting itself costs
        with meters["pooled"].paused():
            forward(meters["pooled"].model)

    t = interleaved_times({"plain": lambda: forward(model), "graph": graph_only, "pooled": lambda: forward(meters["pooled"].model),
                           "batch_mean": lambda: forward(meters["batch_mean"].model), "reference": lambda: reference.batch(x)},
                          rounds=8)
    reference.close()
    fixed = statistics.median(_fixed_cost(model, mode) for mode in ek.entropy.MODES for _ in range(3))
    ratios = {label: paired_ratio(t, label, "plain") for label in ("graph", "pooled", "batch_mean", "reference")}
    probes = probe_overhead(model, x) / statistics.median(t["plain"])
    ours, theirs = ratios["batch_mean"][1] - 1, ratios["reference"][1] - 1
    peaks = {label: peak_memory(name, label) for label in PASSES}
    record({
        "plain s/batch": statistics.median(t["plain"]),
        **{f"{label} / plain (q1 median q3)": " ".join(f"{r:.3f}" for r in ratios[label]) for label in ratios},
        "pooled / graph": paired_ratio(t, "pooled", "graph")[1],
        "probes' own cost / plain": probes,
        "reference overhead / ours": theirs / ours if ours > 0 else float("inf"),
        "reference overhead / probes' cost": theirs / probes,
        "fixed ms per pass": fixed * 1e3,
        "peak pooled / plain": peaks["pooled"] / peaks["plain"],
        "peak batch_mean / plain": peaks["batch_mean"] / peaks["plain"],
        "peak reference / plain": peaks["reference"] / peaks["plain"],
        "peak plain MiB": peaks["plain"],
    })


def probe_overhead(model, x) -> float:
    """Seconds a forward spends more with probes than with plain activations, summed site by site
    on the activation inputs of this batch, each timed in a tight loop (warm-up, median): a
    steadier figure than the difference of two whole forwards on a noisy machine."""
    meter = ek.EntropyMeter(model)
    inputs = {}
    hooks = [meter.model.get_submodule(f"ek_probe_{i}").register_forward_pre_hook(
        lambda m, a, name=s.name: inputs.setdefault(name, a[0])) for i, s in enumerate(meter.sites)]
    with torch.no_grad():
        meter.model(x)
    for h in hooks:
        h.remove()
    total = 0.0
    for site in meter.sites:
        a, probe = inputs[site.name], meter.probes[site.name]
        activation = model.get_submodule(site.module)
        total += median_seconds(lambda: probe(a), a.device) - median_seconds(lambda: activation(a), a.device)
    return total


def _fixed_cost(model, mode) -> float:
    """A pass's cost besides its batches: trace + instrument, and the entropies at the end."""
    t0 = time.perf_counter()
    meter = ek.EntropyMeter(model, mode=mode)
    t1 = time.perf_counter()
    with torch.no_grad():
        meter.model(torch.zeros(2, 3, 32, 32))
    t2 = time.perf_counter()
    meter.scores()
    return (t1 - t0) + (time.perf_counter() - t2)


def peak_memory(name: str, candidate: str) -> float:
    """MiB the pass adds to the resident set at its peak, measured in a fresh process."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    proc = subprocess.run([sys.executable, __file__, "peak", name, candidate], capture_output=True, text=True, env=env,
                          cwd=Path(__file__).parent)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak(name: str, candidate: str) -> float:
    import conftest  # noqa: F401  (puts the tests' helpers on the path, as under pytest)
    from helpers import real_images

    torch.manual_seed(0)
    model = ek.models.paper_model(name).eval()
    batches = [real_images()[0][:BATCH].clone()]
    run = PASSES[candidate]
    run(model, batches)  # warm-up: lazy initialisation is not part of the pass
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak (VmHWM) to the current RSS
    run(model, batches)
    return (_rss_kib("VmHWM") - before) / 1024


if __name__ == "__main__" and sys.argv[1:2] == ["peak"]:
    print(json.dumps({"peak_mib": _measure_peak(sys.argv[2], sys.argv[3])}))
