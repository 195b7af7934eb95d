"""The real-network shapes and model variants shared by `bench/` and `easier-kernels bench`
(timing itself: `easier_kernels.timing`)."""

from __future__ import annotations

import torch

from . import ops
from .ops.reference import reduce_dims
from .timing import compare, median_seconds

# (name, shape, channel_dim, memory format) of activation inputs in real networks.
SHAPES = {
    "resnet18-cifar-s1": ((128, 64, 32, 32), 1, "contiguous"),
    "resnet18-cifar-s1-cl": ((128, 64, 32, 32), 1, "channels_last"),
    "resnet18-cifar-s2": ((128, 128, 16, 16), 1, "contiguous"),
    "resnet18-cifar-s3": ((128, 256, 8, 8), 1, "contiguous"),
    "resnet18-cifar-s4": ((128, 512, 4, 4), 1, "contiguous"),
    "mobilenetv2-224-expand112": ((32, 96, 112, 112), 1, "contiguous"),
    "mobilenetv2-224-expand56": ((32, 144, 56, 56), 1, "contiguous"),
    "mobilenetv2-224-expand14": ((32, 384, 14, 14), 1, "contiguous"),
    "mobilenetv2-224-last7": ((32, 1280, 7, 7), 1, "contiguous"),
    "vit-b16-mlp": ((32, 197, 3072), -1, "contiguous"),
}


def make_input(name: str, device="cpu", dtype=torch.float32, seed: int = 0) -> tuple[torch.Tensor, int]:
    shape, channel_dim, memory_format = SHAPES[name]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=dtype).to(device)
    if memory_format == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x, channel_dim


def gbps(x: torch.Tensor, seconds: float, passes: int = 1) -> float:
    """Effective bandwidth: `passes` full passes over x's bytes per call."""
    return passes * x.numel() * x.element_size() / seconds / 1e9


def kernel_report(names=("resnet18-cifar-s1", "vit-b16-mlp"), device="cpu") -> list[dict]:
    """A short count_on / act_count(relu) benchmark: GB/s and ratios against torch, per shape."""
    device = torch.device(device)
    rows = []
    for name in names:
        x, cdim = make_input(name, device)
        channels = x.shape[cdim]
        counts = torch.zeros(channels, dtype=torch.int64, device=device)
        nans = torch.zeros_like(counts)
        t_sum = median_seconds(lambda: x.sum(), device)
        t_torch_way = median_seconds(lambda: (x >= 0).sum(reduce_dims(x, cdim)), device)
        t_relu = median_seconds(lambda: torch.relu(x), device)
        t_count = median_seconds(lambda: ops.count_on(x, cdim, nan_counts=nans), device)
        t_act = median_seconds(lambda: ops.act_count(x, counts, "relu", cdim, nan_counts=nans), device)
        rows.append(
            {
                "shape": name,
                "backend": ops.backends.backend_name(device),
                "count_on GB/s": gbps(x, t_count),
                "count_on / torch.sum bandwidth": t_sum / t_count,
                "count_on speed-up vs (x>=0).sum": t_torch_way / t_count,
                "act_count(relu) / relu time": t_act / t_relu,
            }
        )
    return rows


# ---- folding: latency of a model's variants


def bn_folded(model: torch.nn.Module) -> torch.nn.Module:
    """The original with batch norms folded into their convs by torch's own pass
    (`torch.fx.experimental.optimization.fuse`); a model fx's plain tracer cannot trace, or one
    without batch norms, is returned as it is."""
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return model
    return fuse(model.eval())


def fold_variants(model: torch.nn.Module, sites, example: torch.Tensor, *, compile: bool = True) -> dict:
    """The variants a folded model is measured against, all in eval mode: the original (eager),
    its batch norms folded (eager, and torch.compile'd), the network with `sites` linearized but
    not folded, `ek.fold` of it (decided by measuring on example's device), and that compiled."""
    from .fold import fold
    from .linearize import linearize

    model = model.eval()
    net = linearize(model, sites, example).eval()
    variants = {"original": model, "bn_folded": bn_folded(model), "linearized": net, "folded": fold(net, example)}
    if compile:
        variants["compiled_bn_folded"] = torch.compile(variants["bn_folded"])
        variants["compiled_folded"] = torch.compile(variants["folded"])
    return variants


def latency_ratios(variants: dict, example: torch.Tensor, *, baseline: str = "bn_folded", seconds: float = 20.0) -> dict:
    """Per variant: median ms per forward and the median (q1, q3) of its per-round time over the
    baseline's, the variants run in turns (see `timing.compare`) for about `seconds`."""
    with torch.no_grad():
        calls = {label: (lambda m=m: m(example)) for label, m in variants.items()}
        return compare(calls, baseline, example.device, seconds=seconds)
