"""act_count on shapes from real networks: activation + counts in one pass vs the activation alone.

Targets (DESIGN.md): CPU act_count(relu) <= 1.1x the time of torch.relu alone; GPU <= 1.05x.
EK_BENCH_QUICK=1 keeps relu on four shapes and gelu on ViT's MLP.
"""

import os

import pytest
import torch
import torch.nn.functional as F

from easier_kernels import ops
from easier_kernels.benchmark import SHAPES, gbps, make_input, reduce_dims

QUICK = os.environ.get("EK_BENCH_QUICK", "0") == "1"
KINDS = {"relu": torch.relu, "gelu": F.gelu, "hardswish": F.hardswish, "leaky_relu": F.leaky_relu}
# gelu and hardswish on the shapes where networks use them, relu everywhere, leaky_relu once
CASES = [(s, "relu") for s in SHAPES] + [("vit-b16-mlp", "gelu"), ("resnet18-cifar-s2", "gelu"),
                                         ("mobilenetv2-224-expand56", "hardswish"), ("resnet18-cifar-s2", "leaky_relu")]
QUICK_CASES = [("resnet18-cifar-s1", "relu"), ("resnet18-cifar-s1-cl", "relu"), ("mobilenetv2-224-expand112", "relu"),
               ("vit-b16-mlp", "relu"), ("vit-b16-mlp", "gelu")]


@pytest.mark.parametrize("shape,kind", QUICK_CASES if QUICK else CASES)
def test_act_count(measure, shape, kind, device, impl):
    x, cdim = make_input(shape, device)
    counts = torch.zeros(x.shape[cdim], dtype=torch.int64, device=device)
    nans = torch.zeros_like(counts)
    activation = KINDS[kind]
    if impl == "torch":  # the plain-torch way: the activation, then a separate counting pass
        dims = reduce_dims(x, cdim)
        fn = lambda: (activation(x), counts.add_((x >= 0).sum(dims)))  # noqa: E731
    else:
        def fn():
            with ops.use_backend(impl):
                return ops.act_count(x, counts, kind, cdim, nan_counts=nans)
    times = measure(fn, device, group=f"act_count {kind} {shape} {device}", name=impl,
                    others={"activation": lambda: activation(x), "sum": lambda: x.sum()})
    if times is None:
        return
    ours = gbps(x, times["self"], passes=2)  # reads x, writes y
    measure.record({
        "device": device,
        "shape": f"{shape} {tuple(x.shape)}",
        "kind": kind,
        "ms": times["self"] * 1e3,
        "GB/s": ours,
        "time / activation alone": times["self"] / times["activation"],
        "bandwidth / torch.sum's": ours / gbps(x, times["sum"]),
    })
