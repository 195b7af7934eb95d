"""The graph pass `ek.fold`: batch norms into their layers, each chain rewritten to its plan, and
the whole network checked against the original in the runtime it will run in."""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn as nn

from .. import runtimes
from .. import sites as sites_mod
from ..capture import capture, model_device, positional, to_device
from ..recipe_entry import track
from ..timing import compare, steady
from .blocks import lower_fused
from .chains import (Chain, act_spec, drop_identities, find_chains, fold_batch_norms, gated_sites, linear_views, module_of, origin,
                     passthrough, set_module, shape_of)
from .algebra import LAYERS
from .planner import best_plan, chain_values, segment_options
from .plans import Segment, build, parse_plan, plan_label, segments

__all__ = ["fold", "decisions", "format_decisions", "relative_error", "default_tolerance", "InexactFold", "DECIDE",
           "CANNOT_FOLD"]

DECIDE = ("measure", "merge", "separate")
CANNOT_FOLD = "cannot fold"  # the choice of a decision row for a linearized site no plan can fold (`gated_sites`)
# The relative error of an exact fold is rounding: composed weights, another summation order.
# Allowed per output dtype, measured against the largest output (so the scale does not matter).
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class InexactFold(RuntimeError):
    """The folded module's outputs differ from the model's by more than the tolerance; `what`
    says by how much and where from."""

    def __init__(self, what: str):
        super().__init__(f"fold: {what}; pass allow_inexact=True to accept it (the error is then recorded in "
                         "ek.recipe(folded)['fold'])")
        self.what = what


def default_tolerance(dtypes, device=None) -> float:
    """The loosest of TOLERANCE over `dtypes`; float32 on a CUDA device that runs convolutions or
    matmuls in TF32 (PyTorch's default for cuDNN) gets float16's (TF32 keeps 10 mantissa bits)."""
    dtypes = [dtypes] if isinstance(dtypes, torch.dtype) else list(dtypes)
    tf32 = (device is not None and torch.device(device).type == "cuda"
            and (torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32))
    return max((TOLERANCE[torch.float16] if tf32 and d == torch.float32 else TOLERANCE.get(d, TOLERANCE[torch.float32])
                for d in dtypes), default=TOLERANCE[torch.float32])


def fold(model: nn.Module, example_inputs, *, runtime: str = "eager", portable: bool = False, decide="measure",
         original: nn.Module | None = None, check: bool = True, device=None, allow_inexact: bool = False,
         tolerance: float | None = None, leaf_modules=None) -> fx.GraphModule:
    """An inference module computing `model`'s eval outputs with its linear chains folded.

    Batch norms go into the conv/linear before them; chains of convs or linears linked only by
    linearized activations (identity skips and the next activation around them) run per a plan:
    layers separate, merged into one, or a pointwise/depthwise pair by the fused kernel (eager
    only). A chain planned by `ek.linearize` for this runtime follows its plan. Otherwise
    decide="measure" times every exact plan in `runtime` ("eager", "inductor", "onnxruntime") on
    `device` with `example_inputs` and keeps the fastest; "merge" merges every chain; "separate"
    only folds batch norms; a dict (chain -> plan label) replays a decision table. A merge whose
    later convs are padded is inexact at image borders: its error is measured and shown, and the
    plan used only with allow_inexact=True.

    The folded outputs are then compared with the model's on `example_inputs`: a relative error
    (largest difference over the largest output) above `tolerance` (default `default_tolerance`:
    1e-4 in float32, 1e-9 in float64, 1e-2 in float16, 5e-2 in bfloat16) raises InexactFold naming
    the chains that cause it, unless allow_inexact=True (the error is recorded either way).
    A linearized site whose output is gated (`gated_sites`: SwiGLU's `act(gate(x)) * up(x)`)
    leaves nothing to fold: its row's choice is "cannot fold", with the reason.

    With decide="measure", check=True then times the whole folded network against `original`
    (the unpruned model; by default `model` itself) with batch norms folded, in `runtime`, in
    paired rounds, and puts chains back to "separate" one by one (least expected gain first)
    while it is slower. A timing whose spread is too wide to trust (a busy machine) is repeated,
    longer, and recorded `noisy` (with `noisy_why`) if it stays so.
    portable=True (implied by runtime="inductor"/"onnxruntime") uses standard torch modules only,
    so the result exports (`ek.export`) and runs without this package.

    The result carries its record: `folded.meta["easier_kernels"]["fold"]` (decision table, see
    `format_decisions`; the whole-network latency; the relative error of its outputs).
    """
    if not (isinstance(decide, dict) or decide in DECIDE):
        raise ValueError(f"decide must be one of {', '.join(DECIDE)} (or a saved decision table), not {decide!r}")
    runtimes.check_runtime(runtime)
    portable = portable or runtimes.standard_only(runtime)
    device = torch.device(device) if device is not None else model_device(model)
    example = to_device(example_inputs, device)
    gm = _eval_graph(model, example, leaf_modules, device)
    args = positional(gm, example)
    planned = {tuple(r["layers"]): r for r in sites_mod.recipe(model).get("plans", []) if r.get("runtime") == runtime}
    with torch.no_grad():
        expected = sites_mod.record_shapes(gm, args)  # the shapes decide which batch norms and adds fold
        linear_views(gm)
        batch_norms = fold_batch_norms(gm)
        chains = find_chains(gm)
        values = chain_values(gm, chains, args)
        rows = [_decide(gm, chain, values, decide, planned, runtime, portable, allow_inexact) for chain in chains]
        folded = _apply(gm, rows)
        latency = None
        if check and decide == "measure" and (original is not None or any(r["choice"] != "separate" for r in rows)):
            baseline = gm if original is None else _eval_graph(original, example, leaf_modules, device)
            if original is not None:
                linear_views(baseline)
                fold_batch_norms(baseline, args)
            folded, latency = _never_slower(folded, baseline, gm, rows, args, runtime)
        if portable:  # a replayed table may name fused plans
            lower_fused(folded)
        error = relative_error(folded(*args), expected)
        if tolerance is None:
            tolerance = default_tolerance([t.dtype for t in _outputs(expected) if t.is_floating_point()], device)
        inexact = [] if error <= tolerance else _inexact_chains(gm, rows, args, expected, tolerance, portable)
    if inexact and not allow_inexact:
        raise InexactFold(f"the folded module's outputs differ from the model's by a relative error of {error:.1e} "
                          f"(tolerance {tolerance:.0e}), from {_culprits(inexact)}")
    done = sites_mod.recipe(folded)
    done["fold"] = {"decide": decide if isinstance(decide, str) else "replayed", "runtime": runtime, "portable": portable,
                    "allow_inexact": allow_inexact, "device": str(device), "batch_norms": len(batch_norms),
                    "decisions": rows + _cannot_fold(gm), "latency": latency, "relative_error": error,
                    "tolerance": tolerance, "inexact": inexact, "example_shape": [list(a.shape) for a in args]}
    folded.meta[sites_mod.RECIPE_KEY] = done
    return track(folded, model, example, leaf_modules)  # its state dicts carry the recipe (ek.load reads it)


def _eval_graph(model: nn.Module, example, leaf_modules, device) -> fx.GraphModule:
    gm = capture(copy.deepcopy(model).to(device), example, leaf_modules=leaf_modules).eval()
    gm.requires_grad_(False)
    return gm


# ---- deciding per chain


def _decide(gm, chain: Chain, values: dict, decide, planned: dict, runtime: str, portable: bool,
            allow_inexact: bool) -> dict:
    layers = [gm.get_submodule(t) for t in chain.targets]
    n = len(layers)
    options = segment_options(gm, chain, layers, values, fused=not portable, move=False)
    inexact = [p for ps in options.values() for p in ps if not p.exact]
    allowed = (lambda p: True) if allow_inexact else (lambda p: p.exact)
    times, plan = {}, planned.get(tuple(chain.targets))
    if isinstance(decide, dict):
        if chain.name not in decide:
            raise ValueError(f"no decision for the chain starting at {chain.name!r}; the decisions were made for another model")
        choice, why = plan_label(parse_plan(decide[chain.name], n)), "replayed"
    elif decide == "separate":
        choice, why = "separate", "decide='separate'"
    elif decide == "merge":
        whole = [p for p in options[0] if p.size == n and p.label.startswith("merge")]
        choice = whole[0].label if whole and allowed(whole[0]) else "separate"
        why = ("decide='merge'" if choice != "separate" else "decide='merge', but these layers do not merge "
               "(dilation, padding mode, or more than twice the work)" if not whole
               else "decide='merge', but merging is not exact here (allow_inexact=False)")
    elif plan is not None and _fits(plan["plan"], options, n, allowed):
        choice, why = plan["plan"], f"planned by linearize ({runtime}{_at_batch(plan)})"
        times = {k: v / 1e3 for k, v in plan["candidates_ms"].items()}
    else:
        choice, times = best_plan(gm, chain, options, values, runtime, allowed)
        why = "fastest" + (" exact plan (allow_inexact=False)" if inexact and not allow_inexact else "")
    residual = values.get(chain.residual)
    # what an inexact merge costs at the borders, shown whichever plan wins
    errors = {f"{p.label}@{p.start}": relative_error(p.module(x), _run_layers(layers[p.start:p.start + p.size], x))
              for p in inexact if not p.takes_residual for x in [values[chain.layers[p.start].args[0]]]}
    return {
        "chain": chain.name,
        "layers": chain.targets,
        "residual": residual is not None,
        "activation": act_spec(gm, chain.act)[0] if chain.act is not None else None,
        "input": list(values[chain.input].shape),
        "candidates_ms": {label: round(t * 1e3, 4) for label, t in times.items()},
        "border_error": errors,
        "choice": choice,
        "why": why,
    }


def _cannot_fold(gm: fx.GraphModule) -> list[dict]:
    """A decision row per linearized site that leaves nothing to fold (a gated unit's activation),
    named after the layer before it: shown, never rewritten (the plans skip these rows)."""
    sites = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is sites_mod.linearized]
    rows = []
    for node, why in gated_sites(gm, sites).items():
        layer = origin(gm, node)
        known = module_of(gm, layer, LAYERS) is not None
        rows.append({"chain": layer.name if known else node.name, "site": node.meta.get("ek_linearized", node.name),
                     "layers": [layer.target] if known else [], "residual": False, "activation": None,
                     "input": list(shape_of(node) or ()), "candidates_ms": {}, "border_error": {}, "choice": CANNOT_FOLD,
                     "why": why})
    return rows


def _at_batch(plan: dict) -> str:
    """", batch N" for a plan that records the batch it was timed at (plans before that do not)."""
    return f", batch {plan['batch']}" if "batch" in plan else ""


def _fits(label: str, options: dict, n: int, allowed) -> bool:
    """Whether plan `label` is made of segments available (and allowed) here."""
    try:
        plan = parse_plan(label, n)
    except ValueError:
        return False
    available = {(p.label, p.start) for ps in options.values() for p in ps if allowed(p)}
    return all((label, start) in available for label, start, _ in segments(plan))


def _run_layers(layers: list, x):
    for layer in layers:
        x = layer(x)
    return x


def _gain(row: dict) -> float:
    """Expected ms saved by the chain's plan over keeping it separate (0 where not measured)."""
    times = row["candidates_ms"]
    return times.get("separate", 0.0) - times.get(row["choice"], 0.0) if row["choice"] in times else 0.0


# ---- rewriting the graph


def _apply(bn_folded: fx.GraphModule, rows: list[dict]) -> fx.GraphModule:
    """A copy of the batch-norm-folded graph with every chain rewritten to its row's choice."""
    gm = copy.deepcopy(bn_folded)
    replaced = {}  # a chain's old last node -> its new output, for the chains that read it as a residual
    for chain, row in zip(find_chains(gm), rows):
        chain.residual = replaced.get(chain.residual, chain.residual)
        layers = [gm.get_submodule(t) for t in chain.targets]
        old, new = _rewrite(gm, chain, build(gm, chain, layers, parse_plan(row["choice"], len(layers))))
        replaced[old] = new
    drop_identities(gm)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.requires_grad_(False)  # an inference module: its merged layers must not record autograd either
    gm.recompile()
    return gm


def segment_target(chain_name: str, start: int, parts: int) -> str:
    """Where a chain's merged or fused segment sits in the folded module."""
    return f"fold_{chain_name}" + (f"_{start}" if parts > 1 else "")


def _rewrite(gm: fx.GraphModule, chain: Chain, parts: list[Segment]) -> tuple[fx.Node, fx.Node]:
    """Replaces the chain's nodes by the plan's segments: (old last node, its replacement)."""
    last = chain.act if parts[-1].takes_act else chain.end
    graph = gm.graph
    with graph.inserting_before(last.next):
        out = chain.input
        for part in parts:
            if part.label == "sep":
                target = chain.targets[part.start]
                if part.module is not gm.get_submodule(target):  # a pointwise layer run unpadded
                    set_module(gm, target, part.module)
            else:
                target = segment_target(chain.name, part.start, len(parts))
                gm.add_submodule(target, part.module)
                part.module.ek_adds_input = part.takes_residual and part.label != "fused"  # (write_back reads it)
            fused_residual = part.takes_residual and part.label == "fused"
            out = graph.call_module(target, (out, chain.residual) if fused_residual else (out,))
        if chain.residual is not None and not parts[-1].takes_residual:
            out = graph.call_function(operator.add, (out, chain.residual))
    last.replace_all_uses_with(out)
    nodes = list(graph.nodes)
    for node in reversed(nodes[nodes.index(chain.layers[0]):nodes.index(last) + 1]):  # the old chain, last first
        if not node.users and (node in chain.layers or node in (chain.end, chain.act) or passthrough(gm, node)):
            graph.erase_node(node)
    return last, out


def _inexact_chains(bn_folded, rows: list[dict], args: tuple, expected, tolerance: float, portable: bool) -> list[dict]:
    """Where the error comes from: each chain folded as planned on its own (the others separate)
    whose error exceeds `tolerance`; else the batch norms (every chain separate) when they do;
    else every chain that is not separate (the error is theirs together). Entries: chain (None
    for the batch norms), choice, relative_error (None where only the chains together exceed it)."""

    def error(choices: dict) -> float:
        folded = _apply(bn_folded, [{**r, "choice": choices.get(r["chain"], "separate")} for r in rows])
        if portable:
            lower_fused(folded)
        return relative_error(folded(*args), expected)

    planned = {r["chain"]: r["choice"] for r in rows if r["choice"] != "separate"}
    alone = [{"chain": name, "choice": choice, "relative_error": error({name: choice})} for name, choice in planned.items()]
    culprits = [c for c in alone if not c["relative_error"] <= tolerance]
    if culprits:
        return culprits
    separate = error({})
    if not separate <= tolerance or not alone:
        return [{"chain": None, "choice": "batch norms folded", "relative_error": separate}]
    return [{**c, "relative_error": None} for c in alone]


def _culprits(inexact: list[dict]) -> str:
    if inexact[0]["chain"] is None:
        return (f"folding batch norms into their layers (every chain separate: {inexact[0]['relative_error']:.1e}); "
                "please report this model")
    if inexact[0]["relative_error"] is None:
        return "the chains together (each alone is within it): " + ", ".join(f"{c['chain']} ({c['choice']})" for c in inexact)
    return "chain " + ", chain ".join(f"{c['chain']} ({c['choice']}: {c['relative_error']:.1e})" for c in inexact)


# ---- the whole network, never slower


def _never_slower(folded, baseline, bn_folded, rows: list[dict], args: tuple, runtime: str):
    """Times `folded` against `baseline` in `runtime` (paired rounds); while it is slower, puts the
    chain with the least expected gain back to "separate". Keeps the fastest network tried."""
    base_run = runtimes.runner(baseline, args, runtime)
    tried, fallbacks = [], []
    while True:
        timed = _timed({"baseline": base_run, "folded": runtimes.runner(folded, args, runtime)}, args[0].device)
        tried.append((timed["folded"]["ratio"], folded, [r["choice"] for r in rows], list(fallbacks), timed))
        changed = [r for r in rows if r["choice"] != "separate"]
        if timed["folded"]["ratio"] <= 1.0 or not changed:
            break
        row = min(changed, key=_gain)
        row["choice"], row["why"] = "separate", f"fell back: the whole network ran {timed['folded']['ratio']:.3f}x"
        fallbacks.append(row["chain"])
        folded = _apply(bn_folded, rows)
    ratio, folded, choices, fallbacks, timed = min(tried, key=lambda t: t[0])
    for row, choice in zip(rows, choices):
        if row["choice"] != choice:
            row["choice"], row["why"] = choice, "kept: no fallback made the whole network faster"
    latency = {"runtime": runtime, "baseline": "original" if baseline is not bn_folded else "input",
               "baseline_ms": round(timed["baseline"]["ms"], 4), "ratio": round(ratio, 4), "rounds": timed["folded"]["rounds"],
               "q1": round(timed["folded"]["q1"], 4), "q3": round(timed["folded"]["q3"], 4), "fallbacks": fallbacks,
               "tries": timed["folded"]["tries"], "noisy": timed["folded"]["noisy"], "noisy_why": timed["folded"]["noisy_why"]}
    latency["ms"] = round(latency["baseline_ms"] * ratio, 4)
    return folded, latency


def _timed(calls: dict, device) -> dict:
    """`compare` in paired rounds for 1 s, timed again for 2 s, then 4 s (with as many more rounds)
    while the machine is too busy for the spread to be trusted (`timing.steady`)."""
    return steady(lambda k: compare(calls, "baseline", device, seconds=2.0 ** k, max_rounds=60 * 2 ** k), "folded",
                  "baseline")


def _outputs(out) -> list:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def relative_error(got, expected) -> float:
    """Largest |got - expected| / max |expected| over the outputs' tensors (inf when they differ
    in number): what fold records and checks, and export checks. Equal values (the same inf, NaN
    against NaN) differ by 0 and the scale is over the finite values; any other NaN gives NaN."""
    got, expected = _outputs(got), _outputs(expected)
    if len(got) != len(expected):
        return float("inf")
    errors = [_relative_error(g.cpu().double(), e.cpu().double()) for g, e in zip(got, expected) if e.numel()]
    return float("nan") if any(e != e for e in errors) else max(errors, default=0.0)  # max() would skip a NaN


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    same = (got == expected) | (got.isnan() & expected.isnan())
    finite = expected[expected.isfinite()].abs()
    scale = finite.max().clamp_min(1e-30) if finite.numel() else expected.new_tensor(1.0)
    return float((got - expected).abs().masked_fill(same, 0).max() / scale)


# ---- the record


def decisions(folded: nn.Module) -> list[dict]:
    """The decision table of a folded module: one row per chain."""
    return sites_mod.recipe(folded).get("fold", {}).get("decisions", [])


def format_decisions(rows: list[dict], latency: dict | None = None) -> str:
    """The decision table as aligned text (what `easier-kernels fold` prints), and the whole
    network's latency ratio where it was measured."""
    lines = [f"{'chain':<28} {'layers':>6} {'input':<18} {'choice':<16} candidates (ms)"] if rows else \
        ["no linear chains to fold (batch norms folded only)"]
    for row in rows:
        cands = ", ".join(f"{k} {v:.3f}" for k, v in sorted(row["candidates_ms"].items(), key=lambda kv: kv[1]))
        if row["border_error"]:
            cands += "; inexact at borders: " + ", ".join(f"{k} {v:.1e}" for k, v in row["border_error"].items())
        lines.append(f"{row['chain']:<28} {len(row['layers']):>6} {'x'.join(map(str, row['input'])):<18} "
                     f"{row['choice']:<16} {cands or row['why']}")
    if latency:
        fell = f"; fell back to separate: {', '.join(latency['fallbacks'])}" if latency["fallbacks"] else ""
        noisy = f"; noisy: {latency['noisy_why']}" if latency.get("noisy") else ""  # (records before it was judged: not)
        lines.append(f"whole network ({latency['runtime']}): {latency['ms']:.3f} ms vs {latency['baseline_ms']:.3f} ms for the "
                     f"{'original' if latency['baseline'] == 'original' else 'unfolded network'} with batch norms folded = "
                     f"{latency['ratio']:.3f}x{'?' if noisy else ''} (quartiles {latency['q1']:.3f}-{latency['q3']:.3f})"
                     f"{fell}{noisy}")
    return "\n".join(lines)
