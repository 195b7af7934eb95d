"""Chains: the linear stretches of a (linearized) graph that folding can act on, and the batch-norm
pass that comes first.

    fold_batch_norms(gm)          # every conv/linear -> batch norm pair as one layer (eval statistics)
    for chain in find_chains(gm): # conv -> (identity)* -> conv ..., then optionally + residual, activation
        ...
"""

from __future__ import annotations

import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .. import sites as sites_mod

__all__ = ["Chain", "find_chains", "fold_batch_norms", "drop_identities", "act_spec", "module_of", "set_module", "passthrough",
           "origin"]

_ADDS = {operator.add, operator.iadd, torch.add}
_PASSTHROUGH = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)  # identities in eval mode


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
        bn = module_of(gm, node, nn.modules.batchnorm._BatchNorm)
        layer_node = node.args[0] if bn is not None else None
        layer = module_of(gm, layer_node, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))
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
        set_module(gm, layer_node.target, fused)
        node.replace_all_uses_with(layer_node)
        gm.graph.erase_node(node)
        folded.append(node.name)
    gm.delete_all_unused_submodules()
    gm.recompile()  # the module runs what the graph now says
    return folded


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


def _family(module) -> tuple:
    return ("linear",) if isinstance(module, nn.Linear) else ("conv", module.weight.dim())


def find_chains(gm: fx.GraphModule, *, min_layers: int = 2, identities=frozenset()) -> list[Chain]:
    """The maximal linear chains of at least `min_layers` layers (after batch-norm folding). A
    layer whose module is called more than once is never part of one (its weights serve other
    calls too). `identities`: nodes taken as identities too (what linearizing them would give)."""
    calls, chains, taken = sites_mod.module_calls(gm), [], set()
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

    def layer(node):
        module = module_of(gm, node, layer_types)
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
        if nxt is not None and nxt.op == "call_function" and nxt.target in _ADDS and len(nxt.args) == 2 and not nxt.kwargs:
            path = [a for a in nxt.args if isinstance(a, fx.Node) and origin(gm, a, identities) is end]
            others = [a for a in nxt.args if isinstance(a, fx.Node) and a not in path]
            if len(path) == 1 and len(others) == 1:
                end, residual = nxt, others[0]
                nxt = after(end)
        if nxt is not None and sites_mod._call_spec(gm, nxt) is not None:
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
