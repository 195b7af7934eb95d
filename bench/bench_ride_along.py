"""Ride-along scoring: training steps through `EntropyMeter.model` vs the same steps through the
plain model (same parameters, same real CIFAR-10 batch, SGD with momentum), in turns.

Target (issue 3, DESIGN.md): <= 1.02x the plain training's time (CPU and GPU). Reported as the
median over rounds of the per-round ratio (neighbouring steps share the machine's state), under
`steady_malloc` (conftest.py). On CUDA every GPU backend also runs the pooled meter side by side
("pooled triton", "pooled cuda"), and the step runs as torch configures float32 convolutions by
default (cuDNN may use TF32); the row states which.
"""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.timing import interleaved_times, paired_ratio, synchronized

MODELS = ("resnet18", "mobilenet_v2")
BATCH = 128
ROUNDS = {"cpu": 8, "cuda": 30}  # a GPU step takes milliseconds: more rounds for the same confidence


@pytest.mark.parametrize("name", MODELS)
def test_ride_along_training(benchmark, record, real_images, steady_malloc, tf32, device, name):
    torch.manual_seed(0)
    model = ek.models.paper_model(name).train().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    meters = {mode: ek.EntropyMeter(model, mode=mode) for mode in ek.entropy.MODES}
    images, labels = real_images
    size = BATCH if benchmark.enabled else 8  # CI: a small step, for correctness only
    batch = images[:size].to(device), labels[:size].to(device)

    def step(net):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(batch[0]), batch[1]).backward()
        optimizer.step()

    candidates = {"plain": lambda: step(model)}
    candidates.update({mode: (lambda m=meter: step(m.model)) for mode, meter in meters.items()})
    if device == "cuda" and benchmark.enabled:  # every GPU backend side by side (the default is one of them)
        for backend in gpu_backends():
            candidates[f"pooled {backend}"] = lambda b=backend: with_backend(b, lambda: step(meters["pooled"].model))
    if not benchmark.enabled:
        benchmark(lambda: [run() for run in candidates.values()])
        assert all(meter.scores().batches == 1 for meter in meters.values())
        return
    benchmark.group, benchmark.name = f"training step {name} batch {BATCH} {device}", "ride-along pooled"
    benchmark.pedantic(synchronized(candidates["pooled"], device), rounds=1, iterations=1)
    t = interleaved_times(candidates, device, rounds=ROUNDS[device])
    record({
        "device": device,
        "TF32": tf32.state(device),
        "plain s/step": statistics.median(t["plain"]),
        **{f"ride-along {mode} / plain (q1 median q3)": " ".join(f"{r:.3f}" for r in paired_ratio(t, mode, "plain"))
           for mode in [m for m in candidates if m != "plain"]},
        **({"default backend": ek.ops.backends.backend_name(torch.device(device))} if device == "cuda" else {}),
    })


def gpu_backends() -> list:
    return [b for b in ek.ops.available_backends() if "cuda" in ek.ops.backends.devices_for(b) and b != "reference"]


def with_backend(backend, fn):
    with ek.ops.use_backend(backend):
        return fn()
