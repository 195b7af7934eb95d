"""Chains: the linear stretches of a (linearized) graph that folding can act on, and the batch-norm
pass that comes first.

    linear_views(gm)              # transformers' Conv1D calls -> the nn.Linear each is (weight transposed)
    fold_batch_norms(gm, args)    # every conv/linear -> batch norm pair as one layer (eval statistics)
    for chain in find_chains(gm): # conv -> (identity)* -> conv ..., then optionally + residual, activation
        ...
    gated_sites(gm, nodes)        # the sites whose output is gated (SwiGLU): nothing to fold there

Layers are matched by exact type (`algebra.LAYERS`): a subclass is an opaque module. Shapes come
from one run of the graph (`sites.record_shapes`, kept in node.meta["ek_shape"]): a batch norm folds
only where it normalizes its layer's output channels, a residual add joins a chain only where
both operands have the chain output's shape.
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .. import sites as sites_mod
from ..activations import computed
from ..capture import is_hf_conv1d
from .algebra import LAYERS, conv1d_as_linear, exactly

__all__ = ["Chain", "find_chains", "linear_views", "fold_batch_norms", "drop_identities", "act_spec", "module_of", "set_module", "passthrough",
           "origin", "op_name", "shape_of", "gated_sites", "GATED", "BATCH_NORMS"]

_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # identities in eval mode
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # exact types, as LAYERS
# The input rank a batch norm accepts, where it accepts one only (BatchNorm1d takes 2-D and 3-D,
# SyncBatchNorm any): with it, a conv -> batch norm pair folds without knowing the shapes.
_BN_RANK = {nn.BatchNorm2d: 4, nn.BatchNorm3d: 5}

# Python callables torch.fx records -> canonical op name (aten overloads and tensor methods are
# named by themselves, see `op_name`)
_FUNCTION_OPS = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", operator.imul: "mul",
                 torch.mul: "mul", operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", operator.truediv: "div",
                 operator.itruediv: "div", torch.div: "div", operator.neg: "neg", torch.neg: "neg"}


@dataclasses.dataclass
class Chain:
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

    @property
    def targets(self) -> list[str]:
        """The layers' module paths: what identifies the chain across steps and files."""
        return [n.target for n in self.layers]


def module_of(gm: fx.GraphModule, node, types):
    """The module a call_module node calls when it is exactly one of `types` (not a subclass)."""
    if isinstance(node, fx.Node) and node.op == "call_module":
        module = gm.get_submodule(node.target)
        if exactly(module, types):
            return module
    return None


def op_name(node: fx.Node) -> str | None:
    """The op a call_function / call_method node runs, by one name whatever the capture: torch.fx's
    `operator.add`, `torch.add`, `x.add(y)`, `x.add_(y)` and torch.export's `aten.add.Tensor` are
    all "add" (in-place forms too). None for other nodes and unknown Python callables."""
    if node.op == "call_method":
        name = node.target
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
        name = node.target.overloadpacket.__name__
    elif node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket):
        name = node.target.__name__
    elif node.op == "call_function":
        name = _FUNCTION_OPS.get(node.target)
    else:
        return None
    return name[:-1] if name and name.endswith("_") and not name.endswith("__") else name


def shape_of(node) -> tuple | None:
    """The node's output shape from the last `sites.record_shapes`, None where unknown."""
    return node.meta.get("ek_shape") if isinstance(node, fx.Node) else None


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def linear_views(gm: fx.GraphModule) -> list[str]:
    """Every call of transformers' `Conv1D` (GPT-2's attention and MLP projections) becomes a call
    of the equal nn.Linear, so that chains, merges and plans see the linear it is. In place, on a
    copy made for folding or planning: training keeps the Conv1D. Returns the paths replaced."""
    replaced = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and is_hf_conv1d(module := gm.get_submodule(node.target)):
            set_module(gm, node.target, conv1d_as_linear(module))
            replaced.append(node.target)
    return replaced


def fold_batch_norms(gm: fx.GraphModule, args: tuple | None = None) -> list[str]:
    """Every batch norm (eval statistics) that reads a conv/linear's output alone and normalizes
    its output channels goes into that layer's weights (torch's own fusion math). Returns the
    folded batch norms' node names. `args`: example inputs the shapes are propagated with first
    (`sites.record_shapes`); without them the shapes of the last propagation are used, and a pair
    whose layout they would decide (a linear or Conv1d before a BatchNorm1d) is left alone."""
    if args is not None:
        sites_mod.record_shapes(gm, args)
    calls, folded = sites_mod.module_calls(gm), []
    for node in list(gm.graph.nodes):
        bn = module_of(gm, node, BATCH_NORMS)
        layer_node = node.args[0] if bn is not None else None
        layer = module_of(gm, layer_node, LAYERS)
        if layer is None or len(layer_node.users) != 1 or calls[node.target] > 1 or calls[layer_node.target] > 1:
            continue
        if bn.running_mean is None or not _normalizes_channels(layer, bn, shape_of(layer_node)):
            continue
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer.eval(), bn.eval())
        else:
            fused = fuse_conv_bn_eval(layer.eval(), bn.eval())
        set_module(gm, layer_node.target, fused)
        node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(node)
        folded.append(node.name)
    gm.delete_all_unused_submodules()
    gm.recompile()  # the module runs what the graph now says
    return folded


def _normalizes_channels(layer: nn.Module, bn: nn.Module, shape: tuple | None) -> bool:
    """Whether `bn` (channels on dim 1) normalizes the layer's output channels: a linear's are on
    its last dim, so only a 2-D output has them on dim 1 (BatchNorm1d on tokens [N, L, C]
    normalizes L); a conv's are on dim 1 when batched (an unbatched Conv1d gives [C, L])."""
    rank = len(shape) if shape is not None else _BN_RANK.get(type(bn))
    linear = isinstance(layer, nn.Linear)
    channels = layer.out_features if linear else layer.out_channels
    return rank == (2 if linear else layer.weight.dim()) and bn.num_features == channels


def set_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(gm.get_submodule(parent), child, module)


def passthrough(gm, node: fx.Node) -> bool:
    """An identity in eval mode: a linearized site, nn.Identity, dropout, an empty nn.Sequential."""
    if node.op == "call_function":
        return node.target is sites_mod.linearized
    module = module_of(gm, node, (*_PASSTHROUGH, nn.Sequential))
    return module is not None and not (isinstance(module, nn.Sequential) and len(module))


def origin(gm, node: fx.Node, identities=frozenset()) -> fx.Node:
    """The node an identity passes on (itself when it is none)."""
    while isinstance(node, fx.Node) and (node in identities or passthrough(gm, node)):
        node = node.args[0]
    return node


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    return shape_of(a) is not None and shape_of(a) == shape_of(b)


def _family(module) -> tuple:
    return ("linear",) if isinstance(module, nn.Linear) else ("conv", module.weight.dim())


def find_chains(gm: fx.GraphModule, *, min_layers: int = 2, identities=frozenset()) -> list[Chain]:
    """The maximal linear chains of at least `min_layers` layers (after batch-norm folding). A
    layer whose module is called more than once is never part of one (its weights serve other
    calls too). `identities`: nodes taken as identities too (what linearizing them would give).
    A following add is the chain's residual only where both its operands have the chain output's
    shape (propagated, see `sites.record_shapes`): a broadcast add (a bias map [1, C, 1, 1]) stays
    outside, as does any add where the shapes are unknown."""
    calls, chains, taken = sites_mod.module_calls(gm), [], set()

    def layer(node):
        module = module_of(gm, node, LAYERS)
        return module if module is not None and calls[node.target] == 1 else None

    def after(node):  # the next non-identity node on a single-user path, else None
        node = _sole_user(node)
        while node is not None and (node in identities or passthrough(gm, node)):
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
        if len(layers) < min_layers:
            continue
        taken.update(layers)
        end, residual, act = layers[-1], None, None
        nxt = after(end)
        if nxt is not None and op_name(nxt) == "add" and len(nxt.args) == 2 and not nxt.kwargs:
            path = [a for a in nxt.args if isinstance(a, fx.Node) and origin(gm, a, identities) is end]
            others = [a for a in nxt.args if isinstance(a, fx.Node) and a not in path]
            if len(path) == 1 and len(others) == 1 and _same_shape(end, others[0]) and _same_shape(end, nxt):
                end, residual = nxt, others[0]
                nxt = after(end)
        spec = sites_mod._call_spec(gm, nxt) if nxt is not None else None
        if spec is not None and computed(spec[0]):  # an activation the fused kernel can compute
            act = nxt
        chains.append(Chain(layers, end, residual, act))
    return chains


def drop_identities(gm: fx.GraphModule) -> None:
    """Removes the identities (linearized sites, nn.Identity, eval-mode dropout) from the graph."""
    for node in list(gm.graph.nodes):
        if passthrough(gm, node):
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)


def act_spec(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict]:
    """(kind, kind_args) of an activation call node."""
    kind, kind_args, _, _ = sites_mod._call_spec(gm, node)
    return kind, kind_args


# ---- gated units: what linearizing cannot make foldable

GATED = ("the site's output is multiplied by another input-dependent tensor (a gated unit such as SwiGLU/GeGLU): "
         "the product is bilinear, nothing folds through it")
# ops a site's output passes through on its way to a gate, when their other operands are constants
_ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "to", "type", "float", "half", "bfloat16", "contiguous", "clone", "_to_copy"}


def gated_sites(gm: fx.GraphModule, nodes) -> dict:
    """node -> GATED for each of `nodes` (activation calls, or linearized sites) whose output is
    gated. The rule: following the output through identities (linearized sites, nn.Identity,
    eval dropout) and elementwise ops whose other operands are constants or parameters, it reaches
    a mul whose other operand depends on the model's inputs, as `down(act(gate(x)) * up(x))` does.
    Linearizing such an activation leaves `gate(x) * up(x)`: the chain stops at the product."""
    dependent = _input_dependent(gm)
    return {node: GATED for node in nodes if _reaches_gate(gm, node, dependent)}


def _input_dependent(gm: fx.GraphModule) -> set:
    """The nodes computed from the model's inputs (not from parameters and constants alone)."""
    dependent = set()
    for node in gm.graph.nodes:  # in execution order: inputs come first
        if node.op == "placeholder" or any(a in dependent for a in node.all_input_nodes):
            dependent.add(node)
    return dependent


def _reaches_gate(gm: fx.GraphModule, node: fx.Node, dependent: set) -> bool:
    todo, seen = [node], set()
    while todo:
        value = todo.pop()
        for user in value.users:
            if user in seen:
                continue
            seen.add(user)
            operands = []
            fx.node.map_arg((user.args, user.kwargs), operands.append)
            operands.remove(value)  # one occurrence: `v * v` keeps the other
            data = [a for a in operands if a in dependent]
            name = op_name(user)
            if name == "mul" and data:
                return True
            if passthrough(gm, user) or (name in _ELEMENTWISE and not data):
                todo.append(user)
    return False
