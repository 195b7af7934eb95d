"""The planner: times the segments a chain's plans are made of, in the runtime the model will run
in, and chooses the fastest plan. Used twice: by `ek.linearize`, which plans every chain a linearization creates before
fine-tuning (and moves padding only where the chosen plan merges), and by `ek.fold`, for chains
without a plan.

    options = segment_options(gm, chain, layers, values, fused=True, move=True)   # start -> segments
    label, times = best_plan(gm, chain, options, values, "inductor")             # fastest plan, by a margin
    records = plan_chains(gm, args, runtime="eager", known=recipe["plans"])      # linearize's step
"""

from __future__ import annotations

import copy
import math

import torch
import torch.fx as fx
import torch.nn as nn

from .. import runtimes
from ..capture import batch_size
from ..timing import median_seconds
from .blocks import fused_pattern
from .chains import Chain, act_spec, find_chains, fold_batch_norms, linear_views
from .plans import ChainModule, Segment, laid_out, mergeable, plan_label, segment, signature

__all__ = ["MARGIN", "MAX_MERGE_MACS", "segment_options", "segment_seconds", "best_plan", "choose", "chain_values", "plan_chains"]

# A plan replaces "separate" only when it is faster by more than this: the layout it fixes
# before fine-tuning is permanent, and timing noise must not decide it.
MARGIN = 0.03
# A merge with more than this times its layers' multiply-adds is not a candidate: more than twice
# the work (a pw-expand -> dw pair merges into ~9x) does not pay, and composing a long chain's
# large kernel alone would take seconds.
MAX_MERGE_MACS = 2.0
_TIMINGS: dict = {}  # (runtime, signature, shapes, ...) -> seconds: one measurement per process


def _seconds(module: torch.nn.Module, args: tuple, runtime: str) -> float:
    device = args[0].device
    key = (runtime, signature(module), tuple(tuple(a.shape) for a in args), args[0].dtype, str(device),
           torch.get_num_threads())
    if key not in _TIMINGS:
        _TIMINGS[key] = median_seconds(runtimes.runner(module, args, runtime), device, min_time=0.05, min_runs=7)
    return _TIMINGS[key]


def segment_options(gm: fx.GraphModule, chain: Chain, layers: list, values: dict, *, fused: bool,
                    move: bool) -> dict[int, list[Segment]]:
    """Per first layer, the segments a plan can start there with: the layer alone, each merge
    (in the layout it needs when `move`, else as the layers are) unless it has more than
    MAX_MERGE_MACS times the multiply-adds of its layers, and a fused pair."""
    n = len(layers)
    options = {i: [segment(gm, chain, layers, "sep", i, 1)] for i in range(n)}
    for i in range(n):
        shape = tuple(values[chain.layers[i].args[0]].shape)
        for k in range(2, n - i + 1):
            if mergeable(layers[i:i + k]) and _merge_macs(layers[i:i + k], shape) <= MAX_MERGE_MACS * _macs(layers[i:i + k], shape):
                plan = ("sep",) * i + (f"merge{k}",) + ("sep",) * (n - i - k)
                options[i].append(segment(gm, chain, laid_out(layers, plan) if move else layers, f"merge{k}", i, k))
        if fused and i + 2 <= n and fused_pattern(layers[i], layers[i + 1]) is not None:
            options[i].append(segment(gm, chain, layers, "fused", i, 2))
    return options


def segment_seconds(gm: fx.GraphModule, chain: Chain, part: Segment, values: dict, runtime: str) -> float:
    """Seconds of one segment alone in `runtime`, on the value its first layer reads (the last
    segment with the chain's add and activation)."""
    last = part.start + part.size == len(chain.layers)
    residual = values.get(chain.residual) if last else None
    act = act_spec(gm, chain.act) if last and chain.act is not None else None
    args = (values[chain.layers[part.start].args[0]],) + (() if residual is None else (residual,))
    return _seconds(ChainModule([part], residual is not None, act), args, runtime)


def best_plan(gm: fx.GraphModule, chain: Chain, options: dict[int, list[Segment]], values: dict, runtime: str,
              allowed=lambda s: True) -> tuple[str, dict[str, float]]:
    """The fastest plan by dynamic programming over the segments' times (`segment_seconds`), and
    the times of "separate", the whole merge and the winner. "separate" wins ties within MARGIN."""
    n = len(chain.layers)

    def seconds(part):
        return segment_seconds(gm, chain, part, values, runtime)

    best = {n: (0.0, ())}
    for i in reversed(range(n)):
        best[i] = min(((seconds(p) + best[i + p.size][0], (p.label,) + best[i + p.size][1])
                       for p in options[i] if allowed(p)), key=lambda c: c[0])
    times = {"separate": sum(seconds(options[i][0]) for i in range(n)), plan_label(best[0][1]): best[0][0]}
    whole = [p for p in options[0] if p.size == n and p.label.startswith("merge") and allowed(p)]
    if whole:
        times[whole[0].label] = seconds(whole[0])
    return choose(times), times


def _macs(layers: list, shape: tuple) -> int:
    """Multiply-adds of the layers run one after another on an input of `shape`."""
    total = 0
    for layer in layers:
        macs, shape = _layer_macs(layer, shape)
        total += macs
    return total


def _layer_macs(layer, shape: tuple) -> tuple[int, tuple]:
    if isinstance(layer, nn.Linear):
        out = (*shape[:-1], layer.out_features)
        return math.prod(out) * layer.in_features, out
    spatial = tuple((size + 2 * p - k) // s + 1 for size, p, k, s in zip(shape[2:], layer.padding, layer.kernel_size, layer.stride))
    out = (shape[0], layer.out_channels, *spatial)
    return math.prod(out) * layer.in_channels // layer.groups * math.prod(layer.kernel_size), out


def _merge_macs(layers: list, shape: tuple) -> int:
    """Multiply-adds of the layers merged into one, from shapes alone (before composing weights:
    a long merge's kernel is large and costly to compose)."""
    if isinstance(layers[0], nn.Linear):
        return math.prod(shape[:-1]) * layers[0].in_features * layers[-1].out_features
    out, kernel, stride = shape, [1] * (len(shape) - 2), [1] * (len(shape) - 2)
    for layer in layers:
        out = _layer_macs(layer, out)[1]
        kernel = [k + s * (lk - 1) for k, s, lk in zip(kernel, stride, layer.kernel_size)]
        stride = [s * ls for s, ls in zip(stride, layer.stride)]
    depthwise = all(layer.groups == layer.in_channels == layer.out_channels for layer in layers)
    return math.prod(out) * (1 if depthwise else layers[0].in_channels) * math.prod(kernel)


def choose(times: dict[str, float]) -> str:
    """The fastest plan, unless "separate" is within MARGIN of it (then "separate")."""
    best = min(times, key=times.get)
    if "separate" in times and times["separate"] <= times[best] * (1 + MARGIN):
        return "separate"
    return best


class Capture(fx.Interpreter):
    """Runs the graph once, keeping a copy of the named nodes' values."""

    def __init__(self, gm, keep: set):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep and isinstance(out, torch.Tensor):
            self.values[n] = out.clone()  # an in-place op later must not change it
        return out


def chain_values(gm: fx.GraphModule, chains: list[Chain], args: tuple) -> dict:
    """The values every chain layer reads, and the chains' residuals, when `gm` runs on `args`."""
    keep = {n.args[0] for c in chains for n in c.layers} | {c.residual for c in chains if c.residual is not None}
    capture = Capture(gm, keep)
    with torch.no_grad():
        capture.run(*args)
    return capture.values


def plan_chains(gm: fx.GraphModule, args: tuple, *, runtime: str, known: list[dict]) -> list[dict]:
    """One plan record per chain of the trainable network `gm` (its batch norms are folded in an
    eval copy first): chains in `known` (same layers) keep their record; the others get the
    fastest plan (`best_plan`), each merge timed in the padding layout it needs, on `args` (the
    record says at which batch)."""
    net = copy.deepcopy(gm).eval()
    net.requires_grad_(False)
    linear_views(net)
    fold_batch_norms(net, args)
    chains = find_chains(net)
    known = {tuple(r["layers"]): r for r in known}
    values = chain_values(net, [c for c in chains if tuple(c.targets) not in known], args)
    records = []
    for chain in chains:
        if tuple(chain.targets) in known:
            records.append(known[tuple(chain.targets)])
            continue
        layers = [net.get_submodule(t) for t in chain.targets]
        options = segment_options(net, chain, layers, values, fused=not runtimes.standard_only(runtime), move=True)
        with torch.no_grad():
            choice, times = best_plan(net, chain, options, values, runtime)
        records.append({"layers": chain.targets, "plan": choice, "runtime": runtime, "batch": batch_size(args),
                        "candidates_ms": {k: round(v * 1e3, 4) for k, v in times.items()}})
    return records
