"""Gains: the latency that linearizing each remaining site would buy, measured before choosing it
(DESIGN.md, "Beyond the paper: latency-aware selection").

    moves = site_gains(net, ["features_3_conv_0_2", ...], args, runtime="eager")
    # [{"sites": ["features_3_conv_0_2"], "ms_saved": 0.012, "ms_before": 0.21, "pays": True}, ...]

A move is one site, or two sites that together make one longer linear chain (both activations of a
MobileNetV2 block: the pw-dw-pw chain merges into one conv only when both are gone, so neither
alone shows the gain). Its gain is local: the network's "units" (maximal linear chains of one or
more layers, with their add and activation, after batch-norm folding) that the move changes, each
timed under the plan `ek.linearize` would give it (a recorded plan where the unit is a planned
chain), before minus after. Units away from the move cancel, and a unit's time is cached by its
modules' signature, so a step costs seconds, not a whole-network timing per candidate. An
activation that ends no unit (after a pooling, inside a leaf module) saves only its own call.
A move with a gated site (`chains.gated_sites`: SwiGLU's `act(gate(x)) * up(x)`) gets no gain: the
chain stops at the product, so its linearization folds nothing. It is kept, with "excluded" (the
reason) and pays False: selection takes it by entropy alone, after the moves that pay.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .. import ops, runtimes
from .. import sites as sites_mod
from ..capture import capture
from .chains import Chain, act_spec, find_chains, fold_batch_norms, gated_sites, linear_views, origin
from .planner import MARGIN, Capture, _seconds, best_plan, segment_options, segment_seconds
from .plans import build, parse_plan

__all__ = ["site_gains"]


def site_gains(net: nn.Module, site_names: list[str], args: tuple, *, runtime: str,
               leaf_modules=None) -> list[dict]:
    """The moves over `site_names` (sites of `net` not yet linearized), each with the ms it saves
    in `runtime` on `args`, the ms of the units it changes, and whether it pays: saves more than
    MARGIN of those units' time (less is within timing noise). A move with a gated site saves 0
    and names why in "excluded"."""
    gm = capture(copy.deepcopy(net), args, leaf_modules=leaf_modules).eval()
    gm.requires_grad_(False)
    sites_mod.sites_of(gm)  # marks the site nodes (node.meta["ek_site"])
    nodes = {n.name: n for n in gm.graph.nodes if n.meta.get("ek_site") in site_names}
    gated = gated_sites(gm, nodes.values())
    with torch.no_grad():
        linear_views(gm)
        fold_batch_norms(gm, args)
        values = _values(gm, args)
        units = _Units(gm, values, runtime, sites_mod.recipe(net).get("plans", []))
        moves = [[name] for name in site_names]
        for pair in _pairs(gm, nodes, units):
            if pair not in moves:
                moves.append(pair)
        out = []
        for move in moves:
            excluded = [gated[nodes[s]] for s in move if s in nodes and nodes[s] in gated]
            if excluded:
                out.append({"sites": move, "ms_saved": 0.0, "ms_before": 0.0, "pays": False, "excluded": excluded[0]})
                continue
            saved, before = units.gain([nodes[s] for s in move if s in nodes])
            out.append({"sites": move, "ms_saved": round(saved * 1e3, 5), "ms_before": round(before * 1e3, 5),
                        "pays": saved > MARGIN * before and saved > 0})
    return out


def _values(gm: fx.GraphModule, args: tuple) -> dict:
    """Every value a node of `gm` reads when it runs on `args` (timing needs their shapes)."""
    keep = {a for n in gm.graph.nodes if n.op != "output" for a in n.args if isinstance(a, fx.Node)}
    capture = Capture(gm, keep)
    capture.run(*args)
    return capture.values


def _pairs(gm: fx.GraphModule, nodes: dict, units: "_Units") -> list[list[str]]:
    """Two sites whose linearization makes one chain: a site that joins two units, with the
    activation ending the joined chain or the site feeding its first layer."""
    names = {node: name for name, node in nodes.items()}
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    pairs = []
    for name, node in nodes.items():
        for unit in units.changed([node])[1]:
            if not _joins(unit, node):
                continue
            for other in (unit.act, origin(gm, unit.input)):
                if other in names and other is not node:
                    pairs.append(sorted([name, names[other]], key=lambda s: order[nodes[s]]))
    return pairs


def _joins(unit: Chain, node: fx.Node) -> bool:
    """Whether `node` lies between two of the unit's layers."""
    for before, layer in zip(unit.layers, unit.layers[1:]):
        walk = layer.args[0]
        while isinstance(walk, fx.Node) and walk is not before:
            if walk is node:
                return True
            walk = walk.args[0] if walk.args else None
    return False


class _Units:
    """The units of one BN-folded graph, with and without hypothetical linearizations, and their
    times under the plan each would get."""

    def __init__(self, gm: fx.GraphModule, values: dict, runtime: str, plans: list[dict]):
        self.gm, self.values, self.runtime = gm, values, runtime
        self.plans = {tuple(r["layers"]): r["plan"] for r in plans if r.get("runtime", runtime) == runtime}
        self.fused = not runtimes.standard_only(runtime)
        self.now = {self._key(u): u for u in find_chains(gm, min_layers=1)}
        self.acts = {u.act for u in self.now.values() if u.act is not None}
        self._times: dict = {}

    @staticmethod
    def _key(unit: Chain) -> tuple:
        return tuple(unit.layers), unit.end, unit.residual, unit.act

    def changed(self, identities: list) -> tuple[list[Chain], list[Chain]]:
        """(the units that linearizing `identities` removes, the units it creates)."""
        units = {self._key(u): u for u in find_chains(self.gm, min_layers=1, identities=frozenset(identities))}
        return [u for k, u in self.now.items() if k not in units], [u for k, u in units.items() if k not in self.now]

    def gain(self, identities: list) -> tuple[float, float]:
        """(seconds saved, seconds of what changes) by linearizing `identities`: the units changed,
        and the activations that end no unit (linearizing one saves just its call)."""
        old, new = self.changed(identities)
        before = sum(map(self.seconds, old)) + sum(map(self._loose_act, identities))
        return before - sum(map(self.seconds, new)), before

    def _loose_act(self, node: fx.Node) -> float:
        """Seconds of an activation call that ends no unit (0 for one that does)."""
        if node in self.acts or node.args[0] not in self.values or sites_mod._call_spec(self.gm, node) is None:
            return 0.0
        return _seconds(_Activation(act_spec(self.gm, node)), (self.values[node.args[0]],), self.runtime)

    def seconds(self, unit: Chain) -> float:
        """A unit's seconds under its recorded plan, else the plan `ek.linearize` would choose."""
        key = self._key(unit)
        if key not in self._times:
            layers = [self.gm.get_submodule(t) for t in unit.targets]
            plan = self.plans.get(tuple(unit.targets))
            if plan is not None:
                parts = build(self.gm, unit, layers, parse_plan(plan, len(layers)))
                self._times[key] = sum(segment_seconds(self.gm, unit, p, self.values, self.runtime) for p in parts)
            else:
                options = segment_options(self.gm, unit, layers, self.values, fused=self.fused, move=True)
                choice, times = best_plan(self.gm, unit, options, self.values, self.runtime)
                self._times[key] = times[choice]
        return self._times[key]


class _Activation(nn.Module):
    """One activation call on its own, as a chain runs it."""

    def __init__(self, spec: tuple):
        super().__init__()
        self.act = ops.kinds.resolve(*spec)  # named as ChainModule's, so that `signature` tells kinds apart

    def forward(self, x):
        return ops.kinds.forward(x, *self.act)
