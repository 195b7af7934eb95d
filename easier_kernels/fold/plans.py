"""Plans: how one chain runs. A plan splits the chain's layers into segments, each one layer
("sep"), k layers merged into one ("merge<k>"), or a pointwise/depthwise pair run by the fused
kernel ("fused"); labels join with "+", and "separate" is every layer on its own.

    for plan in plans(layers):                       # ("sep", "sep"), ("merge2",), ("fused",) ...
        layers_now = laid_out(layers, plan)          # the padding layout the plan needs (copies)
        module = ChainModule(build(gm, chain, layers_now, plan), chain)   # the chain as planned

A merge is exact only when its later convs have no padding: the plan's layout moves that padding
onto the merge's first conv (DESIGN.md, "Padding is the trap"). Separate layers and fused pairs
need no move, so a plan without merges keeps the original layout and costs no more than it.
"""

from __future__ import annotations

import copy
import dataclasses

import torch.fx as fx
import torch.nn as nn

from .. import ops
from .algebra import foldable_conv, identity_fits, merged_layer, merged_padding, unpad_pointwise
from .blocks import fused_block, fused_pattern
from .chains import Chain, act_spec, origin

__all__ = ["plans", "mergeable", "plan_label", "parse_plan", "segments", "layout", "laid_out", "Segment", "segment", "build",
           "ChainModule", "signature"]


def plans(layers: list[nn.Module], *, fused: bool = True) -> list[tuple[str, ...]]:
    """Every split of the chain into segments, each as its segment labels (sep / merge<k> / fused)."""
    n, out = len(layers), []

    def split(i, labels):
        if i == n:
            out.append(tuple(labels))
            return
        split(i + 1, labels + ["sep"])
        for k in range(2, n - i + 1):
            if mergeable(layers[i:i + k]):
                split(i + k, labels + [f"merge{k}"])
        if fused and i + 2 <= n and fused_pattern(layers[i], layers[i + 1]) is not None:
            split(i + 2, labels + ["fused"])

    split(0, [])
    return out


def mergeable(layers: list[nn.Module]) -> bool:
    return isinstance(layers[0], nn.Linear) or all(foldable_conv(c) for c in layers)


def plan_label(plan: tuple[str, ...]) -> str:
    return "separate" if all(s == "sep" for s in plan) else "+".join(plan)


def parse_plan(label: str, n: int) -> tuple[str, ...]:
    plan = ("sep",) * n if label == "separate" else tuple(label.split("+"))
    if any(not (s in ("sep", "fused") or s.startswith("merge") and s[5:].isdigit()) for s in plan) \
            or sum(_size(s) for s in plan) != n:
        raise ValueError(f"plan {label!r} does not describe a chain of {n} layers")
    return plan


def _size(segment: str) -> int:
    return 1 if segment == "sep" else 2 if segment == "fused" else int(segment[len("merge"):])


def segments(plan: tuple[str, ...]):
    """(label, first layer index, size) per segment."""
    i = 0
    for label in plan:
        yield label, i, _size(label)
        i += _size(label)


# ---- the padding layout a plan needs


def layout(layers: list[nn.Module], plan: tuple[str, ...]) -> list:
    """Each layer's padding under `plan`: a merge's padding all on its first conv (the
    intermediate maps then hold real data only), every other layer as it is. None for linears."""
    paddings = [tuple(m.padding) if isinstance(m, nn.modules.conv._ConvNd) else None for m in layers]
    for label, start, size in segments(plan):
        if label.startswith("merge") and paddings[start] is not None:
            paddings[start] = merged_padding(layers[start:start + size])
            paddings[start + 1:start + size] = [(0,) * len(paddings[start])] * (size - 1)
    return paddings


def laid_out(layers: list[nn.Module], plan: tuple[str, ...]) -> list[nn.Module]:
    """The layers with `plan`'s layout: shallow copies (weights shared) where the padding changes."""
    out = []
    for module, padding in zip(layers, layout(layers, plan)):
        if padding is not None and padding != tuple(module.padding):
            module = copy.copy(module)
            module.padding = padding
        out.append(module)
    return out


# ---- building a plan's modules


@dataclasses.dataclass
class Segment:
    label: str
    start: int
    size: int
    module: nn.Module
    takes_residual: bool = False  # the chain's `+ residual` is inside the module
    takes_act: bool = False       # the chain's next activation is inside the module
    exact: bool = True


def build(gm: fx.GraphModule, chain: Chain, layers: list[nn.Module], plan: tuple[str, ...]) -> list[Segment]:
    """The segments of `plan` over `layers` (the chain's modules, in the layout to use). A padded
    pointwise layer run on its own before an unpadded conv is run unpadded (`unpad_pointwise`)."""
    parts = [segment(gm, chain, layers, label, start, size) for label, start, size in segments(plan)]
    for a, b in zip(parts, parts[1:]):
        if a.label == "sep" and b.label != "fused" and not b.takes_residual:
            pair = unpad_pointwise(a.module, b.module)
            if pair is not None:
                a.module, b.module = pair
    return parts


def segment(gm, chain: Chain, layers: list, label: str, start: int, size: int) -> Segment:
    last = start + size == len(layers)
    if label == "sep":
        return Segment(label, start, size, layers[start])
    if label == "fused":
        takes_act = last and chain.act is not None
        block = fused_block(layers[start], layers[start + 1], act_spec(gm, chain.act) if takes_act else None)
        return Segment(label, start, size, block, last and chain.residual is not None, takes_act)
    identity = (last and start == 0 and chain.residual is not None
                and origin(gm, chain.residual) is origin(gm, chain.input) and identity_fits(merged_layer(layers)[0]))
    merged, exact = merged_layer(layers[start:start + size], identity=identity)
    return Segment(label, start, size, merged, identity, False, exact)


class ChainModule(nn.Module):
    """A chain as planned, on its own: forward(x, residual) runs the segments, the add and the
    activation the segments did not take in. What a plan is timed and checked as."""

    def __init__(self, parts: list[Segment], residual: bool, act: tuple | None):
        super().__init__()
        self.segments = nn.ModuleList(p.module for p in parts)
        self.fused_residual = parts[-1].takes_residual and parts[-1].label == "fused"
        self.add_residual = residual and not parts[-1].takes_residual
        self.act = None if act is None or parts[-1].takes_act else ops.kinds.resolve(*act)

    def forward(self, x, residual=None):
        *body, last = self.segments
        for module in body:
            x = module(x)
        x = last(x, residual) if self.fused_residual else last(x)
        if self.add_residual:
            x = x + residual
        return x if self.act is None else ops.kinds.forward(x, *self.act)


def signature(module: nn.Module) -> tuple:
    """What a module's run time depends on: its layers' types, weight shapes and settings."""
    keys = ("stride", "padding", "groups", "pattern", "activation", "kind_args", "act", "add_residual", "fused_residual")
    return tuple((type(m).__name__, *[tuple(t.shape) for t in m.parameters(recurse=False)],
                  *[tuple(t.shape) for t in m.buffers(recurse=False)], *[repr(getattr(m, k, None)) for k in keys])
                 for m in module.modules())
