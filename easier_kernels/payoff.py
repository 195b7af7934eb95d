"""The payoff of a pruned network: what folding it buys in latency, multiply-adds and parameters,
against the original with batch norms folded, in the runtime the user deploys with.

    before = ek.payoff.counts(model, example)                  # {"macs", "params"} of the BN-folded original
    after = ek.payoff.measure(net, model, example, runtime="eager")
    # {"latency_ratio": 0.71, "latency_ms": 1.2, "baseline_ms": 1.7, "macs": ..., "params": ...}

The latency is `ek.fold`'s whole-network check (paired rounds against the original, in the
runtime, on the example's device and batch); MACs count the multiply-adds of every conv and
linear call on the example; parameters count the folded module's (what it stores).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn

from .fold import fold, lower_fused
from .capture import call
from .sites import recipe

__all__ = ["measure", "counts"]

_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def measure(net: nn.Module, original: nn.Module, example_inputs, *, runtime: str = "eager", leaf_modules=None) -> dict:
    """`net` folded for `runtime` and timed against `original` (BN-folded): the latency ratio and
    both latencies in ms, with the folded network's MACs and parameters."""
    folded = fold(net, example_inputs, runtime=runtime, original=original, leaf_modules=leaf_modules)
    latency = recipe(folded)["fold"]["latency"]
    return {"latency_ratio": latency["ratio"], "latency_ms": latency["ms"], "baseline_ms": latency["baseline_ms"],
            **counts(folded, example_inputs)}


def counts(model: nn.Module, example_inputs) -> dict:
    """Multiply-adds of one forward on `example_inputs` (convs and linears, fused blocks as their
    two convs) and parameters, of `model` with its batch norms folded (as inference runs it)."""
    folded = fold(model, example_inputs, decide="separate", check=False) if recipe(model).get("fold") is None else model
    module = copy.deepcopy(folded)
    lower_fused(module)
    macs = []

    def hook(layer, args, out):
        per_output = layer.in_features if isinstance(layer, nn.Linear) else \
            layer.in_channels // layer.groups * math.prod(layer.kernel_size)
        macs.append(out.numel() * per_output)

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, _LAYERS)]
    try:
        with torch.no_grad():
            call(module, example_inputs)
    finally:
        for handle in handles:
            handle.remove()
    return {"macs": int(sum(macs)), "params": int(sum(p.numel() for p in folded.parameters()))}
