"""Folding (DESIGN.md, "Folding: the math and the traps"): the weight algebra as small pure
functions, one piece of math each, in the style of torch/nn/utils/fusion.py (whose
`fuse_conv_bn_*` fold batch norm; they are not written again), then the graph pass `fold`.

    w, b = compose_conv(w1, b1, w2, b2, stride1=2)       # conv2(conv1(x)) as one conv, stride s1*s2
    w, b = add_identity(w, b, padding=(1, 1))            # conv(x) + x as one conv
    w, b = compose_linear(w1, b1, w2, b2)                # linear2(linear1(x)) as one linear
    fast = fold(net, example_inputs)                     # chains merged / fused / kept, per measurement

Convolutions composed here have no padding between them: `ek.linearize(exact_fold=True)` moves a
chain's padding onto its first conv, so that the intermediate map is never zero-padded and
composing the kernels is exact. `fold` finds the chains, times each plan for them (layers
separate, merged, or a pointwise/depthwise pair in the fused `ops.conv_block`) and rewrites the
graph with the fastest; `save_folded` / `load_folded` keep the result.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from . import benchmark, ops
from . import sites as sites_mod
from .entropy import model_device
from .linearize import from_recipe, linearized, recipe

__all__ = ["fold", "decisions", "format_decisions", "save_folded", "load_folded", "FusedConvBlock", "dense_weight", "compose_conv", "add_identity",
           "compose_linear"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def dense_weight(weight: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv weight [O, I/g, *k] as the dense one [O, I, *k] (zero outside the groups)."""
    if groups == 1:
        return weight
    out_channels, in_per_group = weight.shape[:2]
    dense = weight.new_zeros(out_channels, in_per_group * groups, *weight.shape[2:])
    out_per_group = out_channels // groups
    for g in range(groups):
        rows, cols = slice(g * out_per_group, (g + 1) * out_per_group), slice(g * in_per_group, (g + 1) * in_per_group)
        dense[rows, cols] = weight[rows]
    return dense


def compose_conv(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, *,
                 stride1=1, groups1: int = 1, groups2: int = 1) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """conv2(conv1(x)) as one conv: returns (weight, bias, groups).

    Kernel k1 + s1 * (k2 - 1) per dim: W[o, i] = sum_m W2[o, m] (*) W1[m, i], the full convolution of
    the kernels, with W2 dilated by conv1's stride s1; the merged conv has stride s1 * s2. Bias
    b2 + sum(W2) . b1. Equal groups whose channels line up (depthwise then depthwise) stay grouped;
    otherwise both become dense first (a depthwise kernel merged with a dense one is dense).
    """
    dims = w1.dim() - 2
    stride1 = (stride1,) * dims if isinstance(stride1, int) else tuple(stride1)
    if w2.shape[1] * groups2 != w1.shape[0]:
        raise ValueError(f"conv2 reads {w2.shape[1] * groups2} channels but conv1 writes {w1.shape[0]}")
    if groups1 != groups2:
        w1, w2, groups1, groups2 = dense_weight(w1, groups1), dense_weight(w2, groups2), 1, 1
    groups = groups1
    k2 = w2.shape[2:]
    # Per group j: W[o, i] = sum_m W2[o, m] (*) W1[m, i]. As one grouped conv: the "images" are W1's
    # input channels (batch I/g), its output channels the image channels; W2 flipped is the filter.
    images = w1.transpose(0, 1)  # [I/g, O1, *k1]
    padding = [s * (k - 1) for s, k in zip(stride1, k2)]
    weight = _CONV[dims](images, w2.flip(list(range(2, 2 + dims))), padding=padding, dilation=stride1, groups=groups)
    weight = weight.transpose(0, 1).contiguous()  # [O2, I/g, *K]
    if b1 is None:
        return weight, b2, groups
    # b[o] = b2[o] + sum_{m in o's group, taps} W2[o, m, taps] * b1[m]
    w2_sums = w2.flatten(2).sum(-1).view(groups, -1, w2.shape[1])  # [g, O2/g, O1/g]
    bias = (w2_sums @ b1.view(groups, -1, 1)).flatten()
    return weight, bias if b2 is None else bias + b2, groups


def add_identity(weight: torch.Tensor, bias: torch.Tensor | None, *, padding, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor | None]:
    """conv(x) + x as one conv (stride 1, as many output as input channels): the identity is a 1 at
    tap `padding` of each channel's own kernel, the tap that reads x at the output's position."""
    out_channels, in_per_group = weight.shape[:2]
    dims = weight.dim() - 2
    padding = (padding,) * dims if isinstance(padding, int) else tuple(padding)
    if out_channels != in_per_group * groups:
        raise ValueError(f"an identity skip needs as many output as input channels, not {out_channels} and {in_per_group * groups}")
    if any(not 0 <= p < k for p, k in zip(padding, weight.shape[2:])):
        raise ValueError(f"padding {padding} puts the identity outside the kernel {tuple(weight.shape[2:])}")
    weight = weight.clone()
    channels = torch.arange(out_channels)
    weight[(channels, channels % in_per_group, *padding)] += 1
    return weight, bias


def compose_linear(w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """linear2(linear1(x)) as one linear: W = W2 W1, b = W2 b1 + b2."""
    weight = w2 @ w1
    if b1 is None:
        return weight, b2
    bias = w2 @ b1
    return weight, bias if b2 is None else bias + b2


# ---- the graph pass: ek.fold

_FORMAT = "easier_kernels.folded/1"
_ADDS = {operator.add, operator.iadd, torch.add}
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # identities in eval mode
_TIMINGS: dict = {}  # (segment signature, input shape, ...) -> seconds: one measurement per shape and process
DECIDE = ("measure", "merge", "separate")


class FusedConvBlock(nn.Module):
    """A pointwise/depthwise conv pair run by the fused `ek.ops.conv_block` kernel, with the
    residual add and the next activation in its epilogue. Weights are conv-shaped buffers."""

    def __init__(self, pattern: str, w1, b1, w2, b2, stride, padding, activation: str = "identity", kind_args=None):
        super().__init__()
        self.pattern, self.stride, self.padding = pattern, tuple(stride), tuple(padding)
        self.activation, self.kind_args = activation, dict(kind_args or {})
        for name, t in (("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)):
            self.register_buffer(name, t.detach().clone().contiguous())

    def forward(self, x, residual=None):
        return ops.conv_block(x, self.w1, self.b1, self.w2, self.b2, pattern=self.pattern, stride=self.stride,
                              padding=self.padding, residual=residual, activation=self.activation, **self.kind_args)

    def extra_repr(self) -> str:
        return (f"{self.pattern}, {self.w1.shape[1] if self.pattern == 'pw_dw' else self.w1.shape[0]} -> {self.w2.shape[0]}, "
                f"kernel={tuple((self.w2 if self.pattern == 'pw_dw' else self.w1).shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, activation={self.activation}")


@dataclasses.dataclass
class _Chain:
    """Maximal linear chain: layers (conv or linear call_module nodes) linked only through
    identities, then optionally `+ residual` and an activation."""

    layers: list
    end: fx.Node                 # the last node the chain covers without its activation (layer or add)
    residual: fx.Node | None     # the other operand of the add
    act: fx.Node | None          # the activation right after (a fused kernel can take it in)

    @property
    def name(self) -> str:
        return self.layers[0].name

    @property
    def input(self) -> fx.Node:
        return self.layers[0].args[0]


def _module(gm: fx.GraphModule, node, types):
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, types):
            return module
    return None


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def fold_batch_norms(gm: fx.GraphModule) -> list[str]:
    """Every batch norm (eval statistics) that reads a conv/linear's output alone goes into that
    layer's weights (torch's own fusion math). Returns the folded batch norms' node names."""
    calls, folded = sites_mod.module_calls(gm), []
    for node in list(gm.graph.nodes):
        bn = _module(gm, node, nn.modules.batchnorm._BatchNorm)
        layer_node = node.args[0] if bn is not None else None
        layer = _module(gm, layer_node, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
        if layer is None or len(layer_node.users) != 1 or calls[node.target] > 1 or calls[layer_node.target] > 1:
            continue
        if bn.running_mean is None:  # no running statistics: it normalizes with the batch's, even in eval
            continue
        if isinstance(layer, nn.Linear):
            if bn.num_features != layer.out_features:
                continue
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        _set_module(gm, layer_node.target, fused)
        node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(node)
        folded.append(node.name)
    return folded


def _set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(gm.get_submodule(parent), child, module)


def _passthrough(gm, node: fx.Node) -> bool:
    """An identity in eval mode: a linearized site, nn.Identity, dropout, an empty nn.Sequential."""
    if node.op == "call_function":
        return node.target is linearized
    module = _module(gm, node, (*_PASSTHROUGH, nn.Sequential))
    return module is not None and not (isinstance(module, nn.Sequential) and len(module))


def _origin(gm, node: fx.Node) -> fx.Node:
    """The node an identity passes on (itself when it is none)."""
    while isinstance(node, fx.Node) and _passthrough(gm, node):
        node = node.args[0]
    return node


def _family(module) -> tuple:
    return ("linear",) if isinstance(module, nn.Linear) else ("conv", module.weight.dim())


def find_chains(gm: fx.GraphModule) -> list[_Chain]:
    """The maximal linear chains of at least two layers (after batch-norm folding). A layer whose
    module is called more than once is never part of one (its weights serve other calls too)."""
    calls, chains, taken = sites_mod.module_calls(gm), [], set()
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

    def layer(node):
        module = _module(gm, node, layer_types)
        return module if module is not None and calls[node.target] == 1 else None

    def after(node):  # the next non-identity node on a single-user path, else None
        node = _sole_user(node)
        while node is not None and _passthrough(gm, node):
            node = _sole_user(node)
        return node

    for start in gm.graph.nodes:
        if start in taken or layer(start) is None:
            continue
        layers = [start]
        while True:
            nxt = after(layers[-1])
            if nxt is None or layer(nxt) is None or _family(layer(nxt)) != _family(layer(start)) or nxt.args[0] is None:
                break
            layers.append(nxt)
        if len(layers) < 2:
            continue
        taken.update(layers)
        end, residual, act = layers[-1], None, None
        nxt = after(end)
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2 and not nxt.kwargs:
            path = [a for a in nxt.args if isinstance(a, fx.Node) and _origin(gm, a) is end]
            others = [a for a in nxt.args if isinstance(a, fx.Node) and a not in path]
            if len(path) == 1 and len(others) == 1:
                end, residual = nxt, others[0]
                nxt = after(end)
        if nxt is not None and sites_mod._call_spec(gm, nxt) is not None:
            act = nxt
        chains.append(_Chain(layers, end, residual, act))
    return chains




# ---- plans: how a chain runs. A plan splits the chain's layers into segments, each one layer
# ("sep"), k layers merged into one ("merge<k>"), or a pointwise/depthwise pair run fused ("fused").


def _conv_spec(conv: nn.Module) -> bool:
    """Convs the weight algebra can merge: zero padding given as numbers, no dilation."""
    return (isinstance(conv.padding, tuple) and conv.padding_mode == "zeros" and all(d == 1 for d in conv.dilation))


def _pointwise(conv, padded: bool = False) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1
            and (padded or conv.padding == (0, 0)))


def _depthwise(conv) -> bool:
    return conv.groups == conv.in_channels == conv.out_channels


def fused_pattern(first: nn.Module, second: nn.Module) -> str | None:
    """'pw_dw' / 'dw_pw' when the pair of 2-D convs is one the fused kernel runs, else None. A
    padded pointwise conv before an unpadded depthwise one is what `linearize(exact_fold=True)`
    makes of a pw -> dw pair: it runs too (see `fused_block`)."""
    if not all(isinstance(c, nn.Conv2d) and _conv_spec(c) for c in (first, second)):
        return None
    if _pointwise(first, padded=not any(second.padding)) and _depthwise(second):
        return "pw_dw"
    if _depthwise(first) and _pointwise(second):
        return "dw_pw"
    return None


def merged_layer(layers: list[nn.Module], identity: bool = False) -> tuple[nn.Module, bool]:
    """The layers as one (conv or linear), and whether that is exact: for convs, only when every
    conv after the first has no padding (`linearize(exact_fold=True)` arranges that). `identity`
    adds the skip `+ x` into the weights. Composed in float64, stored in the layers' dtype."""
    first = layers[0]
    dtype = first.weight.dtype
    double = lambda t: None if t is None else t.detach().double()  # noqa: E731
    w, b = double(first.weight), double(first.bias)
    if isinstance(first, nn.Linear):
        for layer in layers[1:]:
            w, b = compose_linear(w, b, double(layer.weight), double(layer.bias))
        if identity:
            w = w + torch.eye(w.shape[0], dtype=w.dtype, device=w.device)
        merged = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=dtype)
        _assign(merged, w, b)
        return merged, True
    groups, stride, padding = first.groups, first.stride, first.padding
    for conv in layers[1:]:
        w, b, groups = compose_conv(w, b, double(conv.weight), double(conv.bias), stride1=stride, groups1=groups,
                                    groups2=conv.groups)
        padding = tuple(p + s * q for p, s, q in zip(padding, stride, conv.padding))
        stride = tuple(s * t for s, t in zip(stride, conv.stride))
    if identity:
        w, b = add_identity(w, b, padding=padding, groups=groups)
    exact = all(not any(c.padding) for c in layers[1:])
    merged = type(first)(w.shape[1] * groups, w.shape[0], w.shape[2:], stride=stride, padding=padding, groups=groups,
                         bias=b is not None, device=w.device, dtype=dtype)
    _assign(merged, w, b)
    return merged, exact


def _assign(layer: nn.Module, w, b) -> None:
    with torch.no_grad():
        layer.weight.copy_(w)
        if b is not None:
            layer.bias.copy_(b)


def identity_fits(merged: nn.Module) -> bool:
    """`x + chain(x)` folds into the merged conv's kernel: stride 1, same channels and size."""
    if isinstance(merged, nn.Linear):
        return merged.in_features == merged.out_features
    return (all(s == 1 for s in merged.stride) and merged.in_channels == merged.out_channels
            and all(2 * p == k - 1 for p, k in zip(merged.padding, merged.kernel_size)))


def fused_block(first: nn.Conv2d, second: nn.Conv2d, act_spec=None) -> FusedConvBlock:
    pattern = fused_pattern(first, second)
    b1, b2 = (c.bias if c.bias is not None else c.weight.new_zeros(c.out_channels) for c in (first, second))
    dw = second if pattern == "pw_dw" else first
    padding = dw.padding
    if pattern == "pw_dw" and any(first.padding):
        # The padding sits on the pointwise conv, so the intermediate's border holds b1, not 0:
        # zero-pad instead and carry b1 through the depthwise taps into b2 (exact).
        padding = first.padding
        b2 = b2 + b1 * second.weight.sum((1, 2, 3))
        b1 = torch.zeros_like(b1)
    kind, kind_args = act_spec if act_spec else ("identity", {})
    return FusedConvBlock(pattern, first.weight, b1, second.weight, b2, dw.stride, padding, kind, kind_args)


def plans(chain_layers: list[nn.Module]) -> list[tuple[str, ...]]:
    """Every split of the chain into segments, each as its segment labels (sep / merge<k> / fused)."""
    n = len(chain_layers)
    out = []

    def split(i, labels):
        if i == n:
            out.append(tuple(labels))
            return
        split(i + 1, labels + ["sep"])
        for k in range(2, n - i + 1):
            if mergeable(chain_layers[i:i + k]):
                split(i + k, labels + [f"merge{k}"])
        if i + 2 <= n and fused_pattern(chain_layers[i], chain_layers[i + 1]) is not None:
            split(i + 2, labels + ["fused"])

    split(0, [])
    return out


def mergeable(layers: list[nn.Module]) -> bool:
    return isinstance(layers[0], nn.Linear) or all(_conv_spec(c) for c in layers)


def plan_label(plan: tuple[str, ...]) -> str:
    if all(s == "sep" for s in plan):
        return "separate"
    return "+".join(plan)


def parse_plan(label: str, n: int) -> tuple[str, ...]:
    plan = ("sep",) * n if label == "separate" else tuple(label.split("+"))
    if sum(_size(s) for s in plan) != n:
        raise ValueError(f"plan {label!r} does not cover a chain of {n} layers")
    return plan


def _size(segment: str) -> int:
    return 1 if segment == "sep" else 2 if segment == "fused" else int(segment[len("merge"):])


# ---- deciding per chain


def _segments(plan: tuple[str, ...]):
    """(label, first layer index, size) per segment."""
    i = 0
    for label in plan:
        yield label, i, _size(label)
        i += _size(label)


def _act_spec(gm, node):
    kind, kind_args, _, _ = sites_mod._call_spec(gm, node)
    return kind, kind_args


def _absorbs(gm, chain: _Chain, modules: list, label: str, start: int, size: int) -> tuple[bool, bool]:
    """Does this segment take in the chain's (residual, activation)? Only the last segment can:
    a fused kernel takes both; a merge of the whole chain takes an identity skip into its kernel."""
    if start + size != len(modules) or chain.residual is None and chain.act is None:
        return False, False
    if label == "fused":
        return chain.residual is not None, chain.act is not None
    if label.startswith("merge") and start == 0 and _origin(gm, chain.residual) is _origin(gm, chain.input):
        merged, _ = merged_layer(modules)
        return identity_fits(merged), False
    return False, False


def _build_segment(gm, chain: _Chain, modules: list, label: str, start: int, size: int):
    """(module, takes_residual, takes_activation, exact) for one segment."""
    takes_residual, takes_act = _absorbs(gm, chain, modules, label, start, size)
    if label == "sep":
        return modules[start], False, False, True
    if label == "fused":
        act = _act_spec(gm, chain.act) if takes_act else None
        return fused_block(modules[start], modules[start + 1], act), takes_residual, takes_act, True
    merged, exact = merged_layer(modules[start:start + size], identity=takes_residual)
    return merged, takes_residual, False, exact


def _run_segment(gm, chain, module, x, residual, last: bool, takes_residual: bool, takes_act: bool):
    out = module(x, residual) if takes_residual and isinstance(module, FusedConvBlock) else module(x)
    if last and chain.residual is not None and not takes_residual:
        out = out + residual
    if last and chain.act is not None and not takes_act:
        kind, param = ops.kinds.resolve(*_act_spec(gm, chain.act))
        out = ops.kinds.forward(out, kind, param)
    return out


def _signature(module: nn.Module) -> tuple:
    keys = ("stride", "padding", "groups", "pattern", "activation")
    return (type(module).__name__, *[tuple(t.shape) for t in module.buffers() if t.dim() > 1],
            *[tuple(p.shape) for p in module.parameters()], *[repr(getattr(module, k, None)) for k in keys])


def _decide(gm, chain: _Chain, values: dict, decide, allow_inexact: bool, device: torch.device) -> dict:
    modules = [gm.get_submodule(n.target) for n in chain.layers]
    inputs = [values[n.args[0]] for n in chain.layers]
    residual = values.get(chain.residual)
    candidates = plans(modules)
    built: dict = {}  # (label, start) -> (module, takes_residual, takes_act, exact, seconds, error)

    def segment(label, start, size, timed):
        key = (label, start)
        if key not in built or (timed and built[key][4] is None):
            module, takes_residual, takes_act, exact = _build_segment(gm, chain, modules, label, start, size)
            last = start + size == len(modules)
            run = lambda: _run_segment(gm, chain, module, inputs[start], residual, last, takes_residual, takes_act)  # noqa: E731
            error = None
            if not exact:  # the merged conv pads the input, not the intermediate: measure what that costs
                ref = _chain_reference(gm, chain, modules, inputs, residual, start, size, last, takes_act)
                error = float((run() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            seconds = _time(run, (label, tuple(_signature(m) for m in modules[start:start + size]), last,
                                  takes_residual, takes_act, residual is not None and last,
                                  chain.act is not None and last), inputs[start], device) if timed else None
            built[key] = (module, takes_residual, takes_act, exact, seconds, error)
        return built[key]

    def exact(plan):
        return all(segment(label, start, size, False)[3] for label, start, size in _segments(plan))

    names = {plan_label(p): p for p in candidates}
    times, errors = {}, {}
    if isinstance(decide, dict):
        if chain.name not in decide:
            raise ValueError(f"no decision for the chain starting at {chain.name!r}; the decisions were made for another model")
        choice, why = parse_plan(decide[chain.name], len(modules)), "replayed"
    elif decide == "separate":
        choice, why = ("sep",) * len(modules), "decide='separate'"
    elif decide == "merge":
        whole = f"merge{len(modules)}"
        merge = (whole,) if whole in names and (allow_inexact or exact((whole,))) else None
        choice = merge or ("sep",) * len(modules)
        why = ("decide='merge'" if merge else "decide='merge', but these layers do not merge (dilation, padding mode)"
               if whole not in names else "decide='merge', but merging is not exact here (allow_inexact=False)")
    else:
        for label, plan in names.items():
            times[label] = sum(segment(s, start, size, True)[4] for s, start, size in _segments(plan))
        allowed = {label: t for label, t in times.items() if allow_inexact or exact(names[label])}
        choice = names[min(allowed, key=allowed.get)]
        why = "fastest" + ("" if len(allowed) == len(times) else " exact plan (allow_inexact=False)")
    for label, plan in names.items():  # what merging costs at the borders, shown whichever plan wins
        if not exact(plan):
            errors[label] = max(segment(s, start, size, False)[5] or 0.0 for s, start, size in _segments(plan))
    return {
        "chain": chain.name,
        "layers": [n.target for n in chain.layers],
        "residual": chain.residual is not None,
        "activation": _act_spec(gm, chain.act)[0] if chain.act is not None else None,
        "input": list(inputs[0].shape),
        "candidates_ms": {label: round(t * 1e3, 4) for label, t in times.items()},
        "border_error": errors,
        "choice": plan_label(choice),
        "why": why,
        "_built": {key: value[:3] for key, value in built.items()},
    }


def _chain_reference(gm, chain, modules, inputs, residual, start, size, last, takes_act):
    """What the segment's layers compute run one by one (the exact answer)."""
    out = inputs[start]
    for i in range(start, start + size):
        out = modules[i](out)
    if last and chain.residual is not None:
        out = out + residual
    if last and chain.act is not None and takes_act:
        kind, param = ops.kinds.resolve(*_act_spec(gm, chain.act))
        out = ops.kinds.forward(out, kind, param)
    return out


def _time(run, key, x: torch.Tensor, device: torch.device) -> float:
    """Median seconds of one segment, measured once per shape, dtype, device and thread count."""
    key = (key, tuple(x.shape), x.dtype, str(device), torch.get_num_threads())
    if key not in _TIMINGS:
        with torch.no_grad():
            _TIMINGS[key] = benchmark.median_seconds(run, device, min_time=0.05, min_runs=7)
    return _TIMINGS[key]


# ---- rewriting the graph


def _rewrite(gm: fx.GraphModule, chain: _Chain, decision: dict) -> tuple[fx.Node, fx.Node]:
    """Replaces the chain's nodes by the chosen plan's segments: (old last node, its replacement)."""
    plan = parse_plan(decision["choice"], len(chain.layers))
    segments = list(_segments(plan))
    built = decision.pop("_built")
    modules = [gm.get_submodule(n.target) for n in chain.layers]
    parts = [built.get((label, start)) or _build_segment(gm, chain, modules, label, start, size)[:3]
             for label, start, size in segments]
    takes_residual, takes_act = parts[-1][1], parts[-1][2]
    last = chain.act if takes_act else chain.end
    graph = gm.graph
    with graph.inserting_before(last.next):
        out = chain.input
        for (label, start, size), (module, residual_in, _) in zip(segments, parts):
            if label == "sep":
                target = chain.layers[start].target
            else:
                target = f"fold_{chain.name}" + (f"_{start}" if len(segments) > 1 else "")
                gm.add_submodule(target, module)
            args = (out, chain.residual) if residual_in and label == "fused" else (out,)
            out = graph.call_module(target, args)
        if chain.residual is not None and not takes_residual:
            out = graph.call_function(operator.add, (out, chain.residual))
    last.replace_all_uses_with(out)
    nodes = list(graph.nodes)
    for node in reversed(nodes[nodes.index(chain.layers[0]):nodes.index(last) + 1]):  # the old chain, last first
        if not node.users and (node in chain.layers or node in (chain.end, chain.act) or _passthrough(gm, node)):
            graph.erase_node(node)
    return last, out


def _drop_identities(gm: fx.GraphModule) -> None:
    for node in list(gm.graph.nodes):
        if _passthrough(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


class _Capture(fx.Interpreter):
    """Runs the graph once, keeping a copy of the named nodes' values."""

    def __init__(self, gm, keep: set):
        super().__init__(gm)
        self.keep, self.values = keep, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep and isinstance(out, torch.Tensor):
            self.values[n] = out.clone()  # an in-place op later must not change it
        return out


def _outputs(out) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _relative_error(got, expected) -> float:
    errors = [float((g.float() - e.float()).abs().max() / e.float().abs().max().clamp_min(1e-30))
              for g, e in zip(_outputs(got), _outputs(expected)) if e.numel()]
    return max(errors, default=0.0)


def fold(model: nn.Module, example_inputs, *, decide="measure", device=None, allow_inexact: bool = False,
         leaf_modules=None) -> fx.GraphModule:
    """An inference module computing `model`'s eval outputs with its linear chains folded.

    Batch norms go into the conv/linear before them; chains of convs or linears linked only by
    linearized activations (identity skips and the next activation around them) are run per a
    plan: layers separate, merged into one, or a pointwise/depthwise pair by the fused kernel.
    decide="measure" times every plan on `device` with `example_inputs` and keeps the fastest
    (separate is always a candidate, so folding is never slower than not); "merge" merges every
    chain; "separate" only folds batch norms. A merge is exact when the chain's padding sits on
    its first conv (`linearize(exact_fold=True)`); otherwise its border error is measured, shown
    in the decision table, and the plan is used only with allow_inexact=True.

    The result carries the decisions: `folded.meta["easier_kernels"]["fold"]` (see
    `format_decisions`), and the measured relative error of its outputs on `example_inputs`.
    """
    if not (isinstance(decide, dict) or decide in DECIDE):
        raise ValueError(f"decide must be one of {', '.join(DECIDE)} (or a saved decision table), not {decide!r}")
    device = torch.device(device) if device is not None else model_device(model)
    args = tuple(a.to(device) for a in sites_mod.as_args(example_inputs))
    if not all(a.is_floating_point() for a in args):
        raise TypeError("fold: example_inputs must be floating-point tensors (a batch of real inputs)")
    gm = sites_mod.trace(copy.deepcopy(model), leaf_modules).to(device).eval()
    gm.requires_grad_(False)
    with torch.no_grad():
        expected = gm(*args)
        batch_norms = fold_batch_norms(gm)
        chains = find_chains(gm)
        keep = {n.args[0] for c in chains for n in c.layers} | {c.residual for c in chains if c.residual is not None}
        capture = _Capture(gm, keep)
        capture.run(*args)
        decisions = [_decide(gm, chain, capture.values, decide, allow_inexact, device) for chain in chains]
        del capture
        replaced = {}  # a chain's old last node -> its new output, for the chains that read it as a residual
        for chain, decision in zip(chains, decisions):
            chain.residual = replaced.get(chain.residual, chain.residual)
            old, new = _rewrite(gm, chain, decision)
            replaced[old] = new
        _drop_identities(gm)
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
        error = _relative_error(gm(*args), expected)
    done = recipe(gm)
    done["fold"] = {"decide": decide if isinstance(decide, str) else "replayed", "allow_inexact": allow_inexact,
                    "device": str(device), "batch_norms": len(batch_norms), "decisions": decisions,
                    "relative_error": error, "example_shape": [list(a.shape) for a in args]}
    gm.meta["easier_kernels"] = done
    return gm


def decisions(folded: nn.Module) -> list[dict]:
    """The decision table of a folded module: one row per chain."""
    return recipe(folded).get("fold", {}).get("decisions", [])


def format_decisions(rows: list[dict]) -> str:
    """The decision table as aligned text (what `easier-kernels fold` prints)."""
    if not rows:
        return "no linear chains to fold (batch norms folded only)"
    lines = [f"{'chain':<28} {'layers':>6} {'input':<18} {'choice':<16} candidates (ms)"]
    for row in rows:
        cands = ", ".join(f"{k} {v:.3f}" + (f" (err {row['border_error'][k]:.1e})" if k in row["border_error"] else "")
                          for k, v in sorted(row["candidates_ms"].items(), key=lambda kv: kv[1]))
        lines.append(f"{row['chain']:<28} {len(row['layers']):>6} {'x'.join(map(str, row['input'])):<18} "
                     f"{row['choice']:<16} {cands or row['why']}")
    return "\n".join(lines)


# ---- saving: weights plus a JSON recipe, no pickled code (like PruneResult.save)


def save_folded(folded: fx.GraphModule, path) -> None:
    """Writes `folded`'s weights and recipe (linearized sites, paddings, fold decisions) atomically;
    `load_folded(path, model_fn)` rebuilds it."""
    from .prune import atomic_write

    done = recipe(folded)
    if "fold" not in done:
        raise ValueError("save_folded: this module was not made by ek.fold; save a PruneResult with .save() instead")
    saved = {"format": _FORMAT, "record": json.dumps(done), "state_dict": folded.state_dict()}
    atomic_write(path, lambda f: torch.save(saved, f))


def load_folded(path, model_fn, *, leaf_modules=None) -> fx.GraphModule:
    """A module saved by `save_folded`: `model_fn` builds the original (unpruned) architecture, or
    is that module; the recipe's sites are linearized in it, its chains folded with the saved
    decisions (no timing), then the saved weights loaded."""
    from .prune import load_file

    saved = load_file(path, _FORMAT, "ek.save_folded")
    done = json.loads(saved["record"])
    record = done["fold"]
    original = model_fn if isinstance(model_fn, nn.Module) else model_fn()
    example = tuple(torch.zeros(shape) for shape in record["example_shape"])
    net = from_recipe(original, done, example, leaf_modules=leaf_modules) if done["linearized"] or done["padding"] else original
    replay = {row["chain"]: row["choice"] for row in record["decisions"]}
    folded = fold(net, example, decide=replay, device="cpu", allow_inexact=record["allow_inexact"], leaf_modules=leaf_modules)
    chains = [row["chain"] for row in decisions(folded)]
    if chains != list(replay):
        raise ValueError(f"{path}: the model from model_fn has other linear chains than the saved one "
                         f"({chains} vs {list(replay)}); pass the architecture it was folded from")
    folded.load_state_dict(saved["state_dict"])
    folded.meta["easier_kernels"] = done  # the saved decision table, with its timings
    return folded
