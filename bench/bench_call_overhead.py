"""What counting adds to one activation call when the kernel's own work is ~0 (a [1, 16, 4, 4]
tensor): the Python and dispatch cost paid once per site per forward, which a GPU layer of tens
of microseconds would feel. `act_count` is the public op (argument checks each call),
`act_count_resolved` what the meter's probes call (checked once), `meter` a one-site network
under `EntropyMeter` against the same network plain. With and without autograd."""

import pytest
import torch
import torch.nn as nn

import easier_kernels as ek
from easier_kernels import ops


class OneSite(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(x)


def calls(x: torch.Tensor, counts: torch.Tensor, nans: torch.Tensor) -> dict:
    model = OneSite()
    meter = ek.EntropyMeter(model)
    return {
        "act_count": (lambda: ops.act_count(x, counts, "relu", nan_counts=nans), lambda: torch.relu(x)),
        "act_count_resolved": (lambda: ops.act_count_resolved(x, counts, nans, "relu", 1, 0.0), lambda: torch.relu(x)),
        "meter": (lambda: meter.model(x), lambda: model(x)),
    }


def backend_cases() -> list:
    """(device, backend) for every backend that runs compiled on a device here; CUDA's marked gpu."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [pytest.param(d, b, marks=[pytest.mark.gpu] if d == "cuda" else [], id=f"{d}-{b}")
            for d in devices for b in ops.available_backends()
            if d in ops.backends.devices_for(b) and not (b == "triton" and d == "cpu")]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("path", ["act_count", "act_count_resolved", "meter"])
@pytest.mark.parametrize("where,backend", backend_cases())  # (not `device`: bench/conftest.py parametrizes that)
def test_call_overhead(measure, where, backend, path, grad):
    device = where
    x = torch.randn(1, 16, 4, 4, device=device, requires_grad=grad)
    counts = torch.zeros(16, dtype=torch.int64, device=device)
    nans = torch.zeros_like(counts)
    with ops.use_backend(backend):
        ours, plain = calls(x, counts, nans)[path]
        times = measure(ours, device, group=f"call overhead {path} {'grad' if grad else 'no_grad'} {device}", name=backend,
                        others={"plain": plain})
    if times is None:
        return
    measure.record({
        "us per call": times["self"] * 1e6,
        "us plain": times["plain"] * 1e6,
        "us added": (times["self"] - times["plain"]) * 1e6,
    })
