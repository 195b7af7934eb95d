"""count_on on shapes from real networks: every available backend vs the plain-torch way.

Targets (DESIGN.md): CPU >= 0.8x the bandwidth of torch.sum over the same tensor; GPU (a tensor
of >= 256 MB, `test_count_on_bandwidth`) >= 0.9x torch.sum's and >= 85% of the read bandwidth of
a device copy (`y.copy_(x)`, its GB/s counting the bytes it reads: numel * itemsize).

On CUDA the real-network shapes (33-154 MB) partly fit in an H100's 50 MB L2 cache when the same
tensor is read back to back; the 256 MiB case does not, so it is the one to read for bandwidth.
On the CPU the same holds for the 32 MiB L3 of the machine in bench/RESULTS.md: `test_count_on_dram`
(128 MiB) is the case that streams from DRAM (target >= 0.9x torch.sum), timed on every
instruction set the CPU has (`ops.use_cpu_isa`), so an AVX-512 machine also reports the AVX2 path.
EK_BENCH_QUICK=1 keeps four of the shapes.
"""

import os

import pytest
import torch

from easier_kernels import ops
from easier_kernels.benchmark import SHAPES, gbps, make_input, reduce_dims

QUICK = os.environ.get("EK_BENCH_QUICK", "0") == "1"
QUICK_SHAPES = ("resnet18-cifar-s1", "resnet18-cifar-s1-cl", "mobilenetv2-224-expand112", "vit-b16-mlp")
BANDWIDTH_SHAPE = (64, 256, 64, 64)  # 2^26 float32 elements: 256 MiB
DRAM_SHAPE = (128, 256, 32, 32)  # 2^25 float32 elements: 128 MiB


def counter(x, cdim, device, impl):
    """The call timed for impl: the plain-torch way, or count_on under that backend."""
    nans = torch.zeros(x.shape[cdim], dtype=torch.int64, device=device)
    if impl == "torch":
        dims = reduce_dims(x, cdim)
        return lambda: (x >= 0).sum(dims)
    expected = (x >= 0).sum(reduce_dims(x, cdim))

    def fn():
        with ops.use_backend(impl):
            return ops.count_on(x, cdim, nan_counts=nans)

    assert torch.equal(fn(), expected), f"{impl} counts differ from (x >= 0).sum()"  # a wrong kernel is no benchmark
    nans.zero_()
    return fn


@pytest.mark.parametrize("shape", [s for s in SHAPES if not QUICK or s in QUICK_SHAPES])
def test_count_on(measure, shape, device, impl):
    x, cdim = make_input(shape, device)
    fn = counter(x, cdim, device, impl)
    others = {"sum": lambda: x.sum()}
    if device == "cuda":
        y = torch.empty_like(x)
        others["copy"] = lambda: y.copy_(x)
    times = measure(fn, device, group=f"count_on {shape} {device}", name=impl, others=others)
    if times is None:
        return
    row = {
        "device": device,
        "shape": f"{shape} {tuple(x.shape)}",
        "ms": times["self"] * 1e3,
        "GB/s": gbps(x, times["self"]),
        "bandwidth / torch.sum's": times["sum"] / times["self"],
    }
    if device == "cuda":  # the copy's read bandwidth: it reads x's bytes once (and writes as many)
        row["bandwidth / copy read's"] = times["copy"] / times["self"]
    measure.record(row)


def large_tensor_row(device, x, times) -> dict:
    """What the one-large-tensor cases report: GB/s of ours and of torch.sum, and their ratio."""
    return {
        "device": device,
        "shape": f"{tuple(x.shape)} float32, {x.numel() * x.element_size() / 2**20:.0f} MiB",
        "ms": times["self"] * 1e3,
        "GB/s": gbps(x, times["self"]),
        "torch.sum GB/s": gbps(x, times["sum"]),
        "bandwidth / torch.sum's": times["sum"] / times["self"],
    }


def on_isa(fn, isa):
    """fn with the cpp kernels forced to one instruction set."""

    def run():
        with ops.use_cpu_isa(isa):
            return fn()

    return run


def test_count_on_dram(measure, device, impl):
    """The CPU's DRAM case: one float32 tensor of 128 MiB, 4x this machine's L3; the cpp backend
    also on each instruction set the CPU has."""
    if device != "cpu":
        pytest.skip("the GPU's case is test_count_on_bandwidth")
    x = torch.randn(DRAM_SHAPE, generator=torch.Generator().manual_seed(0))
    fn = counter(x, 1, device, impl)
    isas = ops.cpu_isas() if impl == "cpp" else []
    others = {"sum": lambda: x.sum(), **{isa: on_isa(fn, isa) for isa in isas}}
    times = measure(fn, device, group=f"count_on 128 MiB {device}", name=impl, others=others)
    if times is None:
        return
    measure.record({
        **large_tensor_row(device, x, times),
        "per ISA, bandwidth / torch.sum's": ", ".join(f"{isa} {times['sum'] / times[isa]:.2f}" for isa in isas) or "-",
    })


@pytest.mark.gpu
def test_count_on_bandwidth(measure, device, impl):
    """The GPU targets' case: one float32 tensor of 256 MiB, far larger than any L2 cache."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(BANDWIDTH_SHAPE, generator=gen, device=device)
    fn = counter(x, 1, device, impl)
    y = torch.empty_like(x)
    times = measure(fn, device, group=f"count_on 256 MiB {device}", name=impl,
                    others={"sum": lambda: x.sum(), "copy": lambda: y.copy_(x)})
    if times is None:
        return
    measure.record({
        **large_tensor_row(device, x, times),
        "copy read GB/s": gbps(x, times["copy"]),
        "bandwidth / copy read's": times["copy"] / times["self"],
    })
