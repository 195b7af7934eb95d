"""Linearize: replace chosen activation calls by the identity, in a new trainable module.

    net = ek.linearize(model, ["layer1_0_relu", "layer2_1_relu"], example_inputs)
    ek.recipe(net)             # {"linearized": [...], "padding": [{"conv": ..., "before": ..., "after": ...}],
                               #  "plans": [{"layers": [...], "plan": "merge2", "runtime": "eager", ...}]}

Only the named calls change: a module called twice keeps its activation at the other call. The
result is a GraphModule (the input model is deep-copied, never modified); its remaining sites keep
their names, so it can be scored and linearized again.

Plan before fine-tuning (DESIGN.md, "Folding"): a conv -> (batch norm) -> identity -> conv chain
zero-pads its intermediate map, so a merged conv would be wrong at image borders. A merge is exact
only when the chain's padding sits on its first conv (conv_a gets p_a + s_a * p_b, conv_b 0: the
same output shape, a different function at the borders), and fine-tuning bakes that layout into
the weights. So `linearize` plans every chain it creates, as `ek.fold` would run it, measured in
the runtime the model will run in (plan="measure", the default): the padding moves only for the
chains whose plan merges; a chain that stays separate keeps the original layout and costs no more
than the original. plan="merge" moves every chain's padding (the old behaviour: every chain
exactly mergeable), plan="none" moves nothing. Every plan and padding change is recorded.
"""

from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from . import runtimes
from . import sites as sites_mod
from .capture import call, capture, logits_of, model_device, on_few_samples, positional, rng_kept
from .fold.algebra import CONVS, exactly
from .fold.chains import BATCH_NORMS
from .fold.planner import plan_chains
from .fold.plans import layout, parse_plan
from .recipe_entry import track
from .sites import RECIPE_KEY, linearized, recipe

__all__ = ["linearize", "recipe", "linearized", "from_recipe", "PLAN", "Annealed", "anneal", "settle"]

PLAN = ("measure", "merge", "none")


def linearize(model: nn.Module, site_names: Iterable[str], example_inputs, *, plan: str = "measure",
              runtime: str = "eager", leaf_modules: Iterable | None = None, activations: Mapping | None = None,
              plans: list | None = None) -> fx.GraphModule:
    """A copy of `model` with the named sites' activations replaced by the identity, its chains
    planned for `runtime` ("eager", "inductor", "onnxruntime"; see the module's docstring).
    `plans`: with plan="measure", chain plans decided already (a recipe's "plans", e.g. measured
    by another process of a distributed run): chains found there are laid out as they say, untimed.

    Sites inside leaf modules become nn.Identity modules (every call of that module).
    `example_inputs` (on the model's device) are what the plans are timed with, and check that
    the new module runs and keeps the output shape.
    """
    if plan not in PLAN:
        raise ValueError(f"plan must be one of {', '.join(PLAN)}, not {plan!r}")
    runtimes.check_runtime(runtime)
    names = [site_names] if isinstance(site_names, str) else list(site_names)
    gm = capture(copy.deepcopy(model), example_inputs, leaf_modules=leaf_modules, activations=activations)
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
    gm.recompile()
    if plan == "merge":
        changes = move_padding(gm)
    elif plan == "measure" and chosen:
        known = done.get("plans", []) + list(plans or [])
        done["plans"] = plan_chains(gm, positional(gm, example_inputs), runtime=runtime, known=known)
        changes = _lay_out(gm, done["plans"])
    else:
        changes = []
    for change in changes:
        if change not in done["padding"]:  # a skipped chain is noted once, not at every step
            done["padding"].append(change)
    gm.meta[RECIPE_KEY] = done
    _check_runs(model, gm, example_inputs)
    return track(gm, model, example_inputs, leaf_modules)  # its state dicts carry the recipe (ek.load reads it)


def from_recipe(model: nn.Module, done: dict, example_inputs, *, leaf_modules: Iterable | None = None,
                activations: Mapping | None = None) -> fx.GraphModule:
    """`model` linearized as a `recipe` says: the same sites, the same final paddings (however many
    steps the recipe's network took to get there). Rebuilds a saved network's structure."""
    gm = linearize(model, done["linearized"], example_inputs, plan="none", leaf_modules=leaf_modules,
                   activations=activations)
    for change in done["padding"]:
        if "after" in change:
            gm.get_submodule(change["conv"]).padding = tuple(change["after"])
    gm.meta[RECIPE_KEY] = {key: copy.deepcopy(done.get(key, [])) for key in ("linearized", "padding", "plans")}
    return gm


def _mark_linearized(gm: fx.GraphModule, node: fx.Node) -> None:
    with gm.graph.inserting_before(node):
        marker = gm.graph.call_function(linearized, (node.args[0],))
    marker.meta["ek_linearized"] = node.name
    node.replace_all_uses_with(marker)
    gm.graph.erase_node(node)


# ---- padding moves


def _lay_out(gm: fx.GraphModule, records: list[dict]) -> list[dict]:
    """Gives each planned chain's convs the padding its plan needs; returns the changes made."""
    changes = []
    for record in records:
        layers = [gm.get_submodule(t) for t in record["layers"]]
        for target, conv, padding in zip(record["layers"], layers, layout(layers, parse_plan(record["plan"], len(layers)))):
            if padding is not None and padding != tuple(conv.padding):
                changes.append({"conv": target, "before": list(conv.padding), "after": list(padding)})
                conv.padding = padding
    return changes


def _conv(gm: fx.GraphModule, node: fx.Node):
    """The node's conv module when padding can move through it (exactly a torch conv, zero padding,
    integer padding, no dilation), else None."""
    if node.op != "call_module":
        return None
    module = gm.get_submodule(node.target)
    if not exactly(module, CONVS):  # a subclass may pad at run time (timm's Conv2dSame) or not pad at all
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
            elif not (node.op == "call_module" and exactly(gm.get_submodule(node.target), BATCH_NORMS)):
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
    with torch.no_grad(), sites_mod.eval_mode(original), sites_mod.eval_mode(gm), rng_kept():
        expected, got = on_few_samples(lambda inputs: (call(original, inputs), call(gm, inputs)), example_inputs)
    shapes = [tuple(logits_of(t).shape) for t in (expected, got)]
    if len(shapes) == 2 and shapes[0] != shapes[1]:
        raise RuntimeError(f"linearize changed the output shape from {shapes[0]} to {shapes[1]}; please report this model")


# ---- annealing: a linearized site on its way to the identity (recovery's gradual linearization)


class Annealed(nn.Module):
    """A linearized site while it anneals: (1 - t) * act(x) + t * x, exactly x once t reaches 1.
    `t` is a buffer (a float32 scalar, set in place by the schedule): torch.compile does not
    recompile per value, DistributedDataParallel broadcasts it, a state dict holds it."""

    def __init__(self, act: Callable):
        super().__init__()
        self.act = act
        self.register_buffer("t", torch.zeros(()))

    def forward(self, x):
        a = self.act(x)
        return torch.where(self.t >= 1, x, a + self.t.to(a.dtype) * (x - a))


class _Call(nn.Module):
    """A functional or method activation call, target(x, *args, **kwargs), on a copy of x where
    the call is in place (the blend reads x after it)."""

    def __init__(self, node: fx.Node, inplace: bool):
        super().__init__()
        if any(isinstance(a, fx.Node) for a in [*node.args[1:], *node.kwargs.values()]):
            raise ValueError(f"cannot anneal site {node.name}: its activation reads other tensors than its input")
        self.op, self.target, self.args, self.kwargs, self.inplace = node.op, node.target, node.args[1:], node.kwargs, inplace

    def forward(self, x):
        x = x.clone() if self.inplace else x
        if self.op == "call_method":
            return getattr(x, self.target)(*self.args, **self.kwargs)
        return self.target(x, *self.args, **self.kwargs)


def _activation(before: fx.GraphModule, site) -> nn.Module:
    """The activation `site` computes in `before` (the network it was linearized from), out of place."""
    if site.module is not None:
        act = copy.deepcopy(before.get_submodule(site.module))
        if hasattr(act, "inplace"):
            act.inplace = False
        return act
    node = next(n for n in before.graph.nodes if n.meta.get("ek_site") == site.name)
    return _Call(node, site.inplace)


def anneal(net: fx.GraphModule, before: nn.Module, names: Iterable[str]) -> list[Annealed]:
    """Puts the named sites of `net` (linearized from `before`, e.g. by `linearize(before, names,
    ...)`) back as `Annealed` modules at t = 0, in place; returns them (a schedule raises their t to
    1; then `settle(net)`). Plans and padding moves stay as `linearize` made them."""
    names = list(names)
    graph = capture(before)  # (a copy of its graph: the site nodes' marks are set by sites_of)
    by_name = {s.name: s for s in sites_mod.sites_of(graph)}
    if unknown := [n for n in names if n not in by_name]:
        raise ValueError(f"cannot anneal {', '.join(unknown)}: not a site of the network before linearization")
    markers = {n.meta["ek_linearized"]: n for n in net.graph.nodes if "ek_linearized" in n.meta}
    modules = []
    for name in names:
        annealed = Annealed(_activation(graph, by_name[name]))
        site = by_name[name]
        if site.in_leaf:
            parent, _, child = site.module.rpartition(".")
            setattr(net.get_submodule(parent), child, annealed)
        else:
            target = f"ek_anneal_{name}"
            net.add_submodule(target, annealed)
            marker = markers[name]
            with net.graph.inserting_before(marker):
                call = net.graph.call_module(target, marker.args)
            call.meta["ek_annealed"] = name
            marker.replace_all_uses_with(call)
            net.graph.erase_node(marker)
        modules.append(annealed.to(model_device(net)))
    net.recompile()
    return modules


def settle(net: fx.GraphModule) -> None:
    """Every `Annealed` site of `net` back to the exact identity `linearize` made (the marker, or
    nn.Identity inside a leaf module), in place: the network validated and folded is the linear one."""
    for node in list(net.graph.nodes):
        if "ek_annealed" in node.meta:
            with net.graph.inserting_before(node):
                marker = net.graph.call_function(linearized, (node.args[0],))
            marker.meta["ek_linearized"] = node.meta["ek_annealed"]
            node.replace_all_uses_with(marker)
            net.graph.erase_node(node)
            net.delete_submodule(node.target)
    for name, module in list(net.named_modules()):
        if isinstance(module, Annealed):  # (inside leaf modules)
            parent, _, child = name.rpartition(".")
            setattr(net.get_submodule(parent), child, nn.Identity())
    net.recompile()
