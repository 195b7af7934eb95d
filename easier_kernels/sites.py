"""Activation sites: every activation CALL of a model, found in its torch.fx graph.

    sites = ek.find_sites(model, example_inputs)      # [Site(name='relu', kind='relu', channels=64, ...), ...]

A site is one call, not one module: torchvision's BasicBlock calls `self.relu` twice, which gives
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
from contextlib import contextmanager
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["Site", "find_sites", "trace", "sites_of", "select", "instrument", "as_args", "eval_mode", "linearized", "recipe"]

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

# module type -> (kind, the attributes that are the kind's arguments)
ACTIVATION_MODULES = {
    nn.ReLU: ("relu", ()),
    nn.ReLU6: ("relu6", ()),
    nn.GELU: ("gelu", ("approximate",)),
    nn.SiLU: ("silu", ()),
    nn.Hardswish: ("hardswish", ()),
    nn.LeakyReLU: ("leaky_relu", ("negative_slope",)),
    nn.ELU: ("elu", ("alpha",)),
}

# function -> (kind, its parameters after the input with their defaults, always in place)
ACTIVATION_FUNCTIONS = {
    F.relu: ("relu", (("inplace", False),), False),
    torch.relu: ("relu", (), False),
    torch.relu_: ("relu", (), True),
    F.relu6: ("relu6", (("inplace", False),), False),
    F.gelu: ("gelu", (("approximate", "none"),), False),
    F.silu: ("silu", (("inplace", False),), False),
    F.hardswish: ("hardswish", (("inplace", False),), False),
    F.leaky_relu: ("leaky_relu", (("negative_slope", 0.01), ("inplace", False)), False),
    F.leaky_relu_: ("leaky_relu", (("negative_slope", 0.01),), True),
    F.elu: ("elu", (("alpha", 1.0), ("inplace", False)), False),
    F.elu_: ("elu", (("alpha", 1.0),), True),
}

# tensor method -> (kind, in place)
ACTIVATION_METHODS = {"relu": ("relu", False), "relu_": ("relu", True)}

_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.modules.pooling._AvgPoolNd,
                   nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm, nn.Embedding, nn.MultiheadAttention)
_CHANNELS_FIRST_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.batch_norm, F.group_norm}
_CHANNELS_LAST_FUNCTIONS = {F.linear, F.layer_norm, torch.matmul, torch.addmm, torch.bmm, torch.baddbmm, F.embedding}


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


# ---- tracing


class TraceFailure(RuntimeError):
    """torch.fx could not trace the model; the message names the module and the fix."""


class _Tracer(fx.Tracer):
    """torch.fx's tracer with activation modules and user-named modules as leaves, remembering
    which module was being traced when tracing failed."""

    def __init__(self, leaf_modules: Iterable):
        super().__init__()
        leaf_modules = list(leaf_modules or ())
        self._leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self._leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed_in: tuple[str, nn.Module] | None = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (type(m) in ACTIVATION_MODULES or qualname in self._leaf_names
                or isinstance(m, self._leaf_types) or super().is_leaf_module(m, qualname))

    def call_module(self, m, forward, args, kwargs):
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:  # the innermost module: the first handler to see it
                self.failed_in = (self.path_of_module(m), m)
            raise


def trace(model: nn.Module, leaf_modules: Iterable | None = None) -> fx.GraphModule:
    """A GraphModule over `model`'s own submodules (parameters and buffers are shared, not
    copied). A GraphModule is not re-traced: its graph is copied, so its node names stay."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}")
    if isinstance(model, fx.GraphModule):
        gm = fx.GraphModule(model, copy.deepcopy(model.graph), model.__class__.__name__)
        gm.meta.update(copy.deepcopy(model.meta))
    else:
        tracer = _Tracer(leaf_modules)
        try:
            graph = tracer.trace(model)
        except Exception as exc:
            raise TraceFailure(_trace_failure_message(model, tracer.failed_in, exc)) from exc
        gm = fx.GraphModule(tracer.root, graph, model.__class__.__name__)
    gm.training = model.training  # the flag only: submodules keep their own modes
    return gm


def _trace_failure_message(model, failed_in, exc) -> str:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if failed_in is None or failed_in[0] == "":
        return (f"torch.fx cannot trace the forward of {type(model).__name__} itself ({reason}); move the "
                "untraceable part into a submodule and pass it as leaf_modules=['its.path']")
    path, module = failed_in
    return (f"torch.fx cannot trace module '{path}' ({type(module).__name__}): {reason}; mark it a leaf with "
            f"leaf_modules=['{path}'] (or leaf_modules=[{type(module).__name__}]); its activation modules are "
            "then scored as module sites")


# ---- finding sites


def module_calls(gm: fx.GraphModule) -> dict:
    """Module path -> how many times the graph calls it (a module called twice shares its weights)."""
    calls: dict = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def _call_spec(gm: fx.GraphModule, node: fx.Node):
    """(kind, kind_args, inplace, module path) when the node is an activation call, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if type(module) not in ACTIVATION_MODULES:
            return None
        kind, arg_names = ACTIVATION_MODULES[type(module)]
        return kind, {a: getattr(module, a) for a in arg_names}, bool(getattr(module, "inplace", False)), node.target
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
    """Where the neurons are: dim 1 after convolutions / batch norm, the last dim after linear
    layers (tokens [N, ..., C], also 4-D in Swin and ConvNeXt). Walks back through elementwise
    ops to the producing layer; 1 when none is found."""
    for _ in range(32):
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            if isinstance(module, _CHANNELS_FIRST):
                return 1
            if isinstance(module, _CHANNELS_LAST):
                return -1
        elif node.op == "call_function" and node.target in _CHANNELS_FIRST_FUNCTIONS:
            return 1
        elif node.op == "call_function" and node.target in _CHANNELS_LAST_FUNCTIONS:
            return -1
        elif node.op == "call_function" and getattr(node.target, "__name__", "") == "matmul":
            return -1
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not inputs:
            return 1
        node = inputs[0]
    return 1


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
                if path and type(module) in ACTIVATION_MODULES:
                    kind, arg_names = ACTIVATION_MODULES[type(module)]
                    parent_path, _, child = path.rpartition(".")
                    full = f"{node.target}.{path}"
                    cdim = _leaf_channel_dim(leaf.get_submodule(parent_path), child)
                    sites.append(Site(full, kind, None, cdim, {a: getattr(module, a) for a in arg_names}, full,
                                      bool(getattr(module, "inplace", False)), True, len(sites)))
    if require and not sites:
        raise ValueError(
            f"{gm.__class__.__name__} has no activation sites; supported are the modules "
            f"{', '.join(t.__name__ for t in ACTIVATION_MODULES)}, their torch.nn.functional forms and x.relu()"
        )
    return sites


def as_args(example_inputs) -> tuple:
    """A model's positional inputs: a tensor, or a tuple/list of them."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


@contextmanager
def eval_mode(model: nn.Module):
    """Every module in eval mode inside the block; each module's own flag restored after."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


class _InputShapes(fx.Interpreter):
    """Runs the graph once, recording the input shape of every site node."""

    def __init__(self, gm):
        super().__init__(gm)
        self.shapes = {}

    def run_node(self, n):
        if "ek_site" in n.meta:
            x = self.env[n.args[0]]
            if isinstance(x, torch.Tensor):
                self.shapes[n.meta["ek_site"]] = tuple(x.shape)
        return super().run_node(n)


def find_sites(model: nn.Module, example_inputs, *, leaf_modules: Iterable | None = None) -> list[Site]:
    """Every activation call of `model`, in execution order, with its channel count.

    example_inputs: a tensor or a tuple of positional inputs; the model runs once on them, in eval
    mode and without gradients (no state changes). leaf_modules: module paths or types that
    torch.fx must not trace into (their activation modules become one site each).
    """
    gm = trace(model, leaf_modules)
    sites = sites_of(gm, require=True)
    channels = channels_of(gm, sites, example_inputs)
    return [dataclasses.replace(s, channels=channels.get(s.name)) for s in sites]


def channels_of(gm: fx.GraphModule, sites: Sequence[Site], example_inputs) -> dict[str, int]:
    """Site name -> its channel count, from the shapes the graph propagates: `gm` (as `trace`
    made it, sites marked by `sites_of`) runs once on `example_inputs`, in eval mode and without
    gradients (no state changes), and each site's input shape is read where it is called. Sites
    the example never reaches are left out."""
    shapes = _InputShapes(gm)
    handles = [gm.get_submodule(s.module).register_forward_pre_hook(_record_shape(shapes.shapes, s.name))
               for s in sites if s.in_leaf]
    try:
        with torch.no_grad(), eval_mode(gm):
            shapes.run(*as_args(example_inputs))
    finally:
        for h in handles:
            h.remove()
    return {s.name: _channels(s, shapes.shapes[s.name]) for s in sites if s.name in shapes.shapes}


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


def instrument(gm: fx.GraphModule, sites: Sequence[Site], make_probe: Callable[[Site, bool], nn.Module]) -> list:
    """Puts a probe module at each site, in place on `gm`.

    make_probe(site, fused): fused probes replace the activation call (they compute it and
    count in one pass); unfused ones count only and return their input, with the original call
    kept after them: in-place calls whose input is read again later, and sites inside leaf
    modules (a forward pre-hook; the returned handles remove those).
    """
    nodes = {n.meta["ek_site"]: n for n in gm.graph.nodes if "ek_site" in n.meta}
    handles = []
    for i, site in enumerate(sites):
        if site.in_leaf:
            probe = make_probe(site, False)
            handles.append(gm.get_submodule(site.module).register_forward_pre_hook(lambda m, args, p=probe: (p(args[0]), *args[1:])))
            continue
        node = nodes[site.name]
        x = node.args[0]
        fused = not (site.inplace and _used_after(node, x))
        target = f"ek_probe_{i}"
        gm.add_submodule(target, make_probe(site, fused))
        with gm.graph.inserting_before(node):
            probe_node = gm.graph.call_module(target, (x,))
        if fused:
            node.replace_all_uses_with(probe_node)
            gm.graph.erase_node(node)
        else:
            node.args = (probe_node, *node.args[1:])
    gm.recompile()
    return handles
