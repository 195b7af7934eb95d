"""Linearize: replace chosen activation calls by the identity, in a new trainable module.

    net = ek.linearize(model, ["layer1_0_relu", "layer2_1_relu"], example_inputs)
    ek.recipe(net)             # {"linearized": [...], "padding": [{"conv": ..., "before": ..., "after": ...}]}

Only the named calls change: a module called twice keeps its activation at the other call. The
result is a GraphModule (the input model is deep-copied, never modified); its remaining sites keep
their names, so it can be scored and linearized again.

exact_fold=True prepares the network for an exact fold: a conv -> (batch norm) -> identity ->
conv chain zero-pads its intermediate map, so a merged conv would be wrong at image borders
(DESIGN.md, "Padding is the trap"). The chain's padding moves onto its first conv instead:
conv_a gets p_a + s_a * p_b, conv_b gets 0 (same output shape, now exactly foldable; it changes
the function at the borders, so do it before fine-tuning). Every change is recorded.
"""

from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx as fx
import torch.nn as nn

from . import sites as sites_mod

__all__ = ["linearize", "recipe", "linearized", "from_recipe"]

_RECIPE_KEY = "easier_kernels"


def linearized(x):
    """Marks where an activation was linearized: the identity, kept in the graph so that later
    passes (padding moves, folding) see the link."""
    return x


def recipe(model: nn.Module) -> dict:
    """What `linearize` did to a module: linearized site names in order, padding changes."""
    meta = getattr(model, "meta", {}).get(_RECIPE_KEY)
    return copy.deepcopy(meta) if meta else {"linearized": [], "padding": []}


def linearize(model: nn.Module, site_names: Iterable[str], example_inputs, exact_fold: bool = True, *,
              leaf_modules: Iterable | None = None) -> fx.GraphModule:
    """A copy of `model` with the named sites' activations replaced by the identity.

    Sites inside leaf modules become nn.Identity modules (every call of that module).
    `example_inputs` checks that the new module runs and keeps the output shape.
    """
    names = [site_names] if isinstance(site_names, str) else list(site_names)
    gm = sites_mod.trace(copy.deepcopy(model), leaf_modules)
    chosen = sites_mod.select(sites_mod.sites_of(gm), names)
    nodes = {n.meta["ek_site"]: n for n in gm.graph.nodes if "ek_site" in n.meta}
    for site in chosen:
        if site.in_leaf:
            parent, _, child = site.module.rpartition(".")
            setattr(gm.get_submodule(parent), child, nn.Identity())
        else:
            _mark_linearized(gm, nodes[site.name])
    done = recipe(gm)
    done["linearized"] += [s.name for s in chosen]
    if exact_fold:
        for change in move_padding(gm):
            if change not in done["padding"]:  # a skipped chain is noted once, not at every step
                done["padding"].append(change)
    gm.meta[_RECIPE_KEY] = done
    gm.recompile()
    _check_runs(model, gm, example_inputs)
    return gm


def from_recipe(model: nn.Module, done: dict, example_inputs, *, leaf_modules: Iterable | None = None) -> fx.GraphModule:
    """`model` linearized as a `recipe` says: the same sites, the same final paddings (however many
    steps the recipe's network took to get there). Rebuilds a saved network's structure."""
    gm = linearize(model, done["linearized"], example_inputs, exact_fold=False, leaf_modules=leaf_modules)
    for change in done["padding"]:
        if "after" in change:
            gm.get_submodule(change["conv"]).padding = tuple(change["after"])
    gm.meta[_RECIPE_KEY] = {"linearized": list(done["linearized"]), "padding": copy.deepcopy(done["padding"])}
    return gm


def _mark_linearized(gm: fx.GraphModule, node: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        marker = gm.graph.call_function(linearized, (node.args[0],))
    marker.meta["ek_linearized"] = node.name
    node.replace_all_uses_with(marker)
    gm.graph.erase_node(node)


# ---- padding moves


def _conv(gm: fx.GraphModule, node: fx.Node):
    """The node's conv module when padding can move through it (zero padding, integer padding,
    no dilation), else None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return None
    if module.padding_mode != "zeros" or isinstance(module.padding, str) or any(d != 1 for d in module.dilation):
        return None
    return module


def _links(gm: fx.GraphModule) -> list[tuple[fx.Node, fx.Node]]:
    """conv -> (batch norm | linearized identity)* -> conv paths holding at least one linearized
    site, every intermediate read only by the next step (a branch would see the moved border)."""
    links = []
    for start in gm.graph.nodes:
        if _conv(gm, start) is None:
            continue
        node, crossed = start, False
        while len(node.users) == 1:
            node = next(iter(node.users))
            if _conv(gm, node) is not None:
                if crossed:
                    links.append((start, node))
                break
            if node.op == "call_function" and node.target is linearized:
                crossed = True
            elif not (node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm)):
                break
    return links


def move_padding(gm: fx.GraphModule) -> list[dict]:
    """Moves each linked conv's padding onto the conv before it, last links first so a whole
    chain's padding ends on its first conv. Returns the changes made."""
    calls = sites_mod.module_calls(gm)
    before, changes = {}, []
    for first_node, second_node in reversed(_links(gm)):
        first, second = gm.get_submodule(first_node.target), gm.get_submodule(second_node.target)
        if not any(second.padding):
            continue
        shared = [n.target for n in (first_node, second_node) if calls[n.target] > 1]
        if shared:
            changes.append({"conv": second_node.target, "skipped": f"module {shared[0]} is called more than once"})
            continue
        for node, conv in ((first_node, first), (second_node, second)):
            before.setdefault(node.target, list(conv.padding))
        first.padding = tuple(p1 + s1 * p2 for p1, s1, p2 in zip(first.padding, first.stride, second.padding))
        second.padding = tuple(0 for _ in second.padding)
    for node in gm.graph.nodes:  # in execution order
        if node.op == "call_module" and node.target in before:
            conv = gm.get_submodule(node.target)
            changes.append({"conv": node.target, "before": before[node.target], "after": list(conv.padding)})
    return changes


def _check_runs(original: nn.Module, gm: fx.GraphModule, example_inputs) -> None:
    args = sites_mod.as_args(example_inputs)
    with torch.no_grad(), sites_mod.eval_mode(original), sites_mod.eval_mode(gm):
        expected, got = original(*args), gm(*args)
    shapes = [tuple(t.shape) for t in (expected, got) if isinstance(t, torch.Tensor)]
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise RuntimeError(f"linearize changed the output shape from {shapes[0]} to {shapes[1]}; please report this model")
