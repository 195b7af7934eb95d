"""count_on on shapes from real networks: every available backend vs the plain-torch way.

Targets (DESIGN.md): CPU >= 0.8x the bandwidth of torch.sum over the same tensor; GPU >= 85% of
the device's copy bandwidth.
"""

import pytest
import torch

from easier_kernels import ops
from easier_kernels.benchmark import SHAPES, gbps, make_input, reduce_dims


@pytest.mark.parametrize("shape", list(SHAPES))
def test_count_on(measure, shape, device, impl):
    x, cdim = make_input(shape, device)
    nans = torch.zeros(x.shape[cdim], dtype=torch.int64, device=device)
    dims = reduce_dims(x, cdim)
    if impl == "torch":
        fn = lambda: (x >= 0).sum(dims)  # noqa: E731 -- the plain-torch way
    else:
        def fn():
            with ops.use_backend(impl):
                return ops.count_on(x, cdim, nan_counts=nans)
    others = {"sum": lambda: x.sum()}
    if device == "cuda":
        others["copy"] = lambda: x.clone()
    times = measure(fn, device, group=f"count_on {shape} {device}", name=impl, others=others)
    if times is None:
        return
    row = {
        "ms": times["self"] * 1e3,
        "GB/s": gbps(x, times["self"]),
        "bandwidth / torch.sum's": times["sum"] / times["self"],
    }
    if device == "cuda":  # a copy reads and writes x's bytes
        row["bandwidth / copy's"] = gbps(x, times["self"]) / gbps(x, times["copy"], passes=2)
    measure.record(row)
