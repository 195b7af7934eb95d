"""Activation sites: every activation CALL of a model, found in its torch.fx graph.

    sites = ek.find_sites(model, example_inputs)      # [Site(name='relu', kind='relu', channels=64, ...), ...]

The graph is `capture.capture`'s (torch.fx, else torch.export). A site is one call, not one module: torchvision's BasicBlock calls `self.relu` twice, which gives
two sites (`layer1_0_relu`, `layer1_0_relu_1`). Names are the traced graph's node names, so they
are stable: the same model class traces to the same names, and a GraphModule (what `linearize`
returns) is read as it is, never re-traced, so its remaining sites keep their names.

This module also holds the graph edits on sites (`instrument`), used by scoring; `linearize.py`
holds the other edit. Activation modules inside a leaf module (`leaf_modules=`) cannot be told
apart per call: each such module is one "leaf site", named by its module path.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import activations as acts
from .activations import ACTIVATION_FUNCTIONS, ACTIVATION_METHODS
from .capture import CAPTURE_KEY, capture, eval_mode, few_samples, on_few_samples, positional, record_shapes, shapes_recorded

__all__ = ["Site", "find_sites", "sites_of", "measured_sites", "propagate_shapes", "record_shapes", "select", "instrument", "remove_probes", "eval_mode", "linearized",
           "recipe", "declared_activations"]

RECIPE_KEY = "easier_kernels"


def linearized(x):
    """Marks where an activation was linearized: the identity, kept in the graph so that later
    passes (padding moves, plans, folding) see the link."""
    return x


def recipe(model: nn.Module) -> dict:
    """What `linearize` did to a module: linearized site names in order, padding changes, the
    planned fold of each chain (and, after `fold`, its decisions)."""
    meta = getattr(model, "meta", {}).get(RECIPE_KEY)
    return copy.deepcopy(meta) if meta else {"linearized": [], "padding": [], "plans": []}

_aten = torch.ops.aten
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.pooling._AvgPoolNd,
                   nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
_CHANNELS_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm, _aten.conv1d.default,
                             _aten.conv2d.default, _aten.conv3d.default, _aten.convolution.default, _aten.batch_norm.default,
                             _aten._native_batch_norm_legit_no_training.default, _aten.group_norm.default,
                             _aten.max_pool2d.default, _aten.avg_pool2d.default, _aten.adaptive_avg_pool2d.default}
_CHANNELS_LAST_FUNCTIONS = {F.linear, F.layer_norm, torch.matmul, torch.addmm, torch.bmm, torch.baddbmm, F.embedding,
                            _aten.linear.default, _aten.addmm.default, _aten.mm.default, _aten.matmul.default,
                            _aten.bmm.default, _aten.baddbmm.default, _aten.layer_norm.default, _aten.embedding.default}
# ops that only re-lay out their input's elements (shapes say where a dim goes)
_RESHAPES = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "_unsafe_view", "expand_dims"}
_TRANSPOSES = {"transpose", "swapaxes", "swapdims"}
_PERMUTES = {"permute"}

@dataclasses.dataclass(frozen=True)
class Site:
    """One activation call.

    name: stable and unique (graph node name; module path for sites inside leaf modules).
    kind / kind_args: what `ek.ops.act_count` computes there, e.g. ("gelu", {"approximate": "tanh"}).
    channels / channel_dim: the neurons: dim 1 after convolutions, the last dim after linear layers.
    module: path of the activation module called (None for functional and method calls).
    inplace: the call overwrites its input. in_leaf: inside a leaf module (one site per module).
    index: position in execution order.
    """

    name: str
    kind: str
    channels: int | None
    channel_dim: int
    kind_args: dict = dataclasses.field(default_factory=dict, hash=False)
    module: str | None = None
    inplace: bool = False
    in_leaf: bool = False
    index: int = 0


# ---- finding sites


def module_calls(gm: fx.GraphModule) -> dict:
    """Module path -> how many times the graph calls it (a module called twice shares its weights)."""
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def declared_activations(gm: fx.GraphModule) -> dict:
    """The user's activation declarations the graph was captured with (`activations.declared`)."""
    return gm.meta.get(CAPTURE_KEY, {}).get("activations", {})


def _call_spec(gm: fx.GraphModule, node: fx.Node):
    """(kind, kind_args, inplace, module path) when the node is an activation call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        spec = acts.module_kind(module, declared_activations(gm))
        if spec is None:
            return None
        return (*spec, bool(getattr(module, "inplace", False)), node.target)
    if node.op == "call_function" and node.target in ACTIVATION_FUNCTIONS:
        kind, params, always_inplace = ACTIVATION_FUNCTIONS[node.target]
        values = {name: default for name, default in params}
        values.update(zip([p for p, _ in params], node.args[1:]))
        values.update(node.kwargs)
        inplace = always_inplace or bool(values.pop("inplace", False))
        return kind, values, inplace, None
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        kind, inplace = ACTIVATION_METHODS[node.target]
        return kind, {}, inplace, None
    return None


def _channel_dim(gm: fx.GraphModule, node: fx.Node) -> int:
    """Where the neurons of a site's input `node` are: the producing layer's channel dim (1 after
    convolutions / batch norm, the last after linear layers), carried through the reshapes,
    transposes and permutes between it and the site by the shapes `propagate_shapes` recorded
    (`node.meta["ek_shape"]`); the last dim as -1 (tokens [N, ..., C] of any rank). 1 when no
    layer is found."""
    between = []
    for _ in range(64):
        dim = _produced_dim(gm, node)
        if dim is not None:
            break
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not inputs:
            return 1
        between.append(node)
        node = inputs[0]
    else:
        return 1
    shape = node.meta.get("ek_shape")
    if shape is None:  # no shapes recorded: the layer's own dim
        return dim
    channels_last, dim, channels = dim < 0, dim % len(shape), shape[dim]
    for step in reversed(between):
        dim = _carried_dim(step, dim, shape)
        if dim is None:
            break
        shape = step.meta.get("ek_shape") if isinstance(step.meta.get("ek_shape"), tuple) else shape
    final = between[0].meta.get("ek_shape") if between else shape
    if not isinstance(final, tuple):
        return 1
    dim = _checked_dim(dim, final, channels)
    return -1 if dim == len(final) - 1 and (dim > 1 or channels_last) else dim


def _produced_dim(gm: fx.GraphModule, node: fx.Node) -> int | None:
    """The channel dim of a layer's output (1 or -1), None when the node is not a layer."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, _CHANNELS_FIRST):
            return 1
        if isinstance(module, _CHANNELS_LAST):
            return -1
    elif node.op == "call_function" and node.target in _CHANNELS_FIRST_FUNCTIONS:
        return 1
    elif node.op == "call_function" and (node.target in _CHANNELS_LAST_FUNCTIONS
                                         or getattr(node.target, "__name__", "") == "matmul"):
        return -1
    return None


def _op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return node.target
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._opname
    return getattr(node.target, "__name__", "")


def _carried_dim(step: fx.Node, dim: int, before: tuple) -> int | None:
    """Where dim `dim` of a shape `before` ends up after `step` (None when it does not survive as one dim)."""
    after = step.meta.get("ek_shape")
    if not isinstance(after, tuple) or not isinstance(before, tuple):
        return dim  # not a tensor (a getitem of a tuple, ...): passed on
    name = _op_name(step)
    if name in _TRANSPOSES:
        a, b = (int(v) % len(before) for v in _op_args(step, 2))
        return b if dim == a else a if dim == b else dim
    if name in _PERMUTES:
        order = [int(v) % len(before) for v in _op_dims(step)]
        return order.index(dim) if dim in order else None
    if name in _RESHAPES or len(after) != len(before):
        return _reshaped_dim(dim, before, after)
    return dim  # elementwise (broadcasting keeps dims in place)


def _op_args(step: fx.Node, count: int) -> list:
    return list(step.args[1:1 + count])


def _op_dims(step: fx.Node) -> list:
    dims = step.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = dims[0]
    return list(dims) or list(step.kwargs.get("dims", ()))


def _reshaped_dim(dim: int, before: tuple, after: tuple) -> int | None:
    """The dim of `after` holding dim `dim` of `before` whole: the same size, the same number of
    elements before it (a row-major reshape keeps both)."""
    prefix = 1
    for d in range(dim):
        prefix *= before[d]
    running = 1
    for j, size in enumerate(after):
        if running == prefix and size == before[dim]:
            return j
        running *= size
    return None


def _checked_dim(dim: int | None, shape: tuple, channels: int) -> int:
    """The carried dim when it has the layer's channel count, else the one dim of that size."""
    if dim is None or dim >= len(shape) or shape[dim] != channels:
        matches = [d for d, size in enumerate(shape) if size == channels]
        dim = matches[0] if len(matches) == 1 else (dim if dim is not None and dim < len(shape) else len(shape) - 1)
    return dim


def _leaf_channel_dim(parent: nn.Module, child_name: str) -> int:
    """Inside a leaf there is no graph: the module registered just before the activation decides."""
    previous = None
    for name, child in parent.named_children():
        if name == child_name:
            break
        previous = child
    return -1 if isinstance(previous, _CHANNELS_LAST) else 1


def sites_of(gm: fx.GraphModule, require: bool = False) -> list[Site]:
    """Every site of a traced model, in execution order, without channel counts (those need an
    example input: `find_sites`). Site nodes carry their site's name in `node.meta["ek_site"]`.
    require: a model without sites is an error."""
    sites, seen_leaves = [], set()
    for node in gm.graph.nodes:
        spec = _call_spec(gm, node)
        if spec is not None:
            kind, kind_args, inplace, module = spec
            sites.append(Site(node.name, kind, None, _channel_dim(gm, node.args[0]), kind_args, module, inplace, False, len(sites)))
            node.meta["ek_site"] = node.name
        elif node.op == "call_module" and node.target not in seen_leaves:
            seen_leaves.add(node.target)
            leaf = gm.get_submodule(node.target)
            for path, module in leaf.named_modules():
                spec = acts.module_kind(module, declared_activations(gm)) if path else None
                if spec is not None:
                    parent_path, _, child = path.rpartition(".")
                    full = f"{node.target}.{path}"
                    cdim = _leaf_channel_dim(leaf.get_submodule(parent_path), child)
                    sites.append(Site(full, *spec[:1], None, cdim, spec[1], full, bool(getattr(module, "inplace", False)),
                                      True, len(sites)))
    if require and not sites:
        raise ValueError(
            f"{gm.__class__.__name__} has no activation sites; supported are the modules "
            f"{', '.join(t.__name__ for t in acts.ACTIVATION_MODULES)}, their torch.nn.functional forms, x.relu(), "
            "the activation modules of timm and transformers, and your own: activations={MyAct: 'gelu_tanh'}"
        )
    return sites


def propagate_shapes(gm: fx.GraphModule, example_inputs) -> dict[str, tuple]:
    """Runs `gm` once on two samples of `example_inputs` (`capture.on_few_samples`; eval mode, no
    gradients: no state changes), recording every node's output shape (`node.meta["ek_shape"]`,
    what site channel dims are read from). Returns the input shapes of the activation modules
    inside leaf modules, by path."""
    table, leaf_shapes = declared_activations(gm), {}
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    leaf_activations = [(path, m) for path, m in gm.named_modules() if path not in called and acts.module_kind(m, table) is not None]
    if not leaf_activations and _recorded(gm, example_inputs):
        return leaf_shapes  # (capture's check ran this graph on these inputs)
    handles = [m.register_forward_pre_hook(_record_shape(leaf_shapes, path)) for path, m in leaf_activations]
    try:
        on_few_samples(lambda inputs: record_shapes(gm, positional(gm, inputs)), example_inputs)
    finally:
        for h in handles:
            h.remove()
    return leaf_shapes


def _recorded(gm: fx.GraphModule, example_inputs) -> bool:
    """Whether `gm` holds its shapes on two samples of `example_inputs` already."""
    try:
        return shapes_recorded(gm, positional(gm, few_samples(example_inputs)))
    except TypeError:
        return False


def find_sites(model: nn.Module, example_inputs, *, leaf_modules: Iterable | None = None,
               activations: Mapping | None = None) -> list[Site]:
    """Every activation call of `model`, in execution order, with its channel count.

    example_inputs: a tensor, a tuple of positional inputs, a dict of keyword inputs (or
    ((args...), {kwargs})); the model runs on two samples of them (`capture.few_samples`),
    without gradients, state changes or random numbers drawn. leaf_modules: module paths or types
    not to trace into (their activation modules become one site each). activations: your own
    activation modules, {MyAct: "gelu_tanh"} (see `easier_kernels.activations`).
    """
    gm = capture(model, example_inputs, leaf_modules=leaf_modules, activations=activations)
    return measured_sites(gm, example_inputs, require=True)


def measured_sites(gm: fx.GraphModule, example_inputs, require: bool = False) -> list[Site]:
    """`sites_of(gm)` with channel dims and counts from the shapes `example_inputs` propagate.
    Sites the example never reaches have channels None."""
    leaf_shapes = propagate_shapes(gm, example_inputs)
    found = []
    for site in sites_of(gm, require=require):
        shape = leaf_shapes.get(site.name) if site.in_leaf else _site_input(gm, site).meta.get("ek_shape")
        found.append(dataclasses.replace(site, channels=_channels(site, shape) if shape else None))
    return found


def _site_input(gm: fx.GraphModule, site: Site) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.meta.get("ek_site") == site.name).args[0]


def _record_shape(shapes: dict, name: str):
    def hook(module, args):
        shapes.setdefault(name, tuple(args[0].shape))
    return hook


def _channels(site: Site, shape: tuple) -> int:
    return shape[site.channel_dim] if len(shape) > 1 else 1


def select(sites: Sequence[Site], names: Iterable[str] | None) -> list[Site]:
    """The sites named (all when names is None), in execution order; unknown names are an error
    listing the valid ones."""
    if names is None:
        return list(sites)
    if isinstance(names, str):
        names = [names]
    names = list(names)
    by_name = {s.name: s for s in sites}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise ValueError(f"unknown site name(s) {', '.join(map(repr, unknown))}; valid site names: {', '.join(by_name)}")
    wanted = set(names)
    return [s for s in sites if s.name in wanted]


# ---- the scoring edit


def _used_after(node: fx.Node, value: fx.Node) -> bool:
    """Whether `value` is read by a node that runs after `node` (an in-place call's input that
    is read again must really be overwritten)."""
    later, current = set(), node.next
    while current.op != "root":
        later.add(current)
        current = current.next
    return any(user in later for user in value.users)


def instrument(gm: fx.GraphModule, sites: Sequence[Site], make_probe: Callable[[Site, bool], nn.Module],
               prefix: str = "ek_probe_", fuse: bool = True, masked: bool = False) -> list:
    """Puts a probe module at each site, in place on `gm` (submodules `{prefix}{i}`; fuse=False:
    every probe unfused, so that `remove_probes` can take them out again).

    make_probe(site, fused): fused probes replace the activation call (they compute it and
    count in one pass); unfused ones count only and return their input, with the original call
    kept after them: in-place calls whose input is read again later, activations the kernels do
    not compute (`activations.computed`), and sites inside leaf modules (a forward pre-hook; the
    returned handles remove those). masked=True: probes of token sites (channels last) are called
    probe(x, attention_mask) where the graph has that input (`token_mask`).
    """
    nodes = {n.meta["ek_site"]: n for n in gm.graph.nodes if "ek_site" in n.meta}
    mask = token_mask(gm) if masked else None
    handles = []
    for i, site in enumerate(sites):
        if site.in_leaf:
            probe = make_probe(site, False)
            handles.append(gm.get_submodule(site.module).register_forward_pre_hook(lambda m, args, p=probe: (p(args[0]), *args[1:])))
            continue
        node = nodes[site.name]
        x = node.args[0]
        fused = fuse and acts.computed(site.kind) and not (site.inplace and _used_after(node, x))
        target = f"{prefix}{i}"
        gm.add_submodule(target, make_probe(site, fused))
        with gm.graph.inserting_before(node):  # token sites also read the padding mask: padding is not counted
            probe_node = gm.graph.call_module(target, (x, mask) if mask is not None and site.channel_dim == -1 else (x,))
        if fused:
            node.replace_all_uses_with(probe_node)
            gm.graph.erase_node(node)
        else:
            node.args = (probe_node, *node.args[1:])
    gm.recompile()
    return handles


def token_mask(gm: fx.GraphModule) -> fx.Node | None:
    """The graph's `attention_mask` input (Hugging Face's name for the padding mask), if it has one."""
    return next((n for n in gm.graph.nodes if n.op == "placeholder" and "attention_mask" in (n.name, n.target)), None)


def remove_probes(gm: fx.GraphModule, prefix: str, handles: Sequence = ()) -> None:
    """Undoes `instrument(gm, ..., prefix=prefix)` for probes that return their input (unfused):
    their nodes and submodules go, the leaf modules' hooks (`handles`) are removed."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target.startswith(prefix):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            gm.delete_submodule(node.target)
    for handle in handles:
        handle.remove()
    gm.recompile()
