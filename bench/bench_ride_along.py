"""Ride-along scoring: training steps through `EntropyMeter.model` vs the same steps through the
plain model (same parameters, same real CIFAR-10 batch, SGD with momentum), in turns.

Target (issue 3, DESIGN.md): <= 1.02x the plain training's time. Reported as the median over
rounds of the per-round ratio (neighbouring steps share the machine's state), under
`steady_malloc` (conftest.py).
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.timing import interleaved_times, paired_ratio

MODELS = ("resnet18", "mobilenet_v2")
BATCH = 128


@pytest.mark.parametrize("name", MODELS)
def test_ride_along_training(benchmark, record, real_images, steady_malloc, name):
    torch.manual_seed(0)
    model = ek.models.paper_model(name).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    meters = {mode: ek.EntropyMeter(model, mode=mode) for mode in ek.entropy.MODES}
    images, labels = real_images
    size = BATCH if benchmark.enabled else 8  # CI: a small step, for correctness only
    batch = images[:size], labels[:size]

    def step(net):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        optimizer.step()

    candidates = {"plain": lambda: step(model)}
    candidates.update({mode: (lambda m=meter: step(m.model)) for mode, meter in meters.items()})
    if not benchmark.enabled:
        benchmark(lambda: [run() for run in candidates.values()])
        assert all(meter.scores().batches == 1 for meter in meters.values())
        return
    benchmark.group, benchmark.name = f"training step {name} batch {BATCH}", "ride-along pooled"
    benchmark.pedantic(candidates["pooled"], rounds=1, iterations=1)
    t = interleaved_times(candidates, rounds=8)
    record({
        "plain s/step": statistics.median(t["plain"]),
        **{f"ride-along {mode} / plain (q1 median q3)": " ".join(f"{r:.3f}" for r in paired_ratio(t, mode, "plain"))
           for mode in ek.entropy.MODES},
    })
