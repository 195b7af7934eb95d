"""A fold put back into the model's own module tree, so that the model stays what it was (a
Hugging Face model keeps `generate()` with its KV cache, pipelines and `save_pretrained`).

    fast = ek.fold(result.model, example_inputs)       # a GraphModule: folded, but no longer a GPT2LMHeadModel
    model = ek.write_back(fast, original)              # a copy of `original` computing what `fast` computes

Each change is made inside the module that held it: a linearized activation module becomes
nn.Identity; a merged chain's first layer becomes the merged layer and its later layers
nn.Identity; a layer that absorbed its batch norm (or a GPT-2 Conv1D, run as the nn.Linear it
is) takes the folded layer's place and the batch norm becomes nn.Identity; every other weight
and buffer is the folded module's (the fine-tuned values). This works where every chain lies
along module calls: what cannot be written as modules (an activation called as a function in a
forward, a module called more than once with some calls linearized, a fused block that takes
the residual in) is a one-line error naming it, and the result is checked against the folded
module on the example inputs: never silently different.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx
import torch.nn as nn

from .. import sites as sites_mod
from ..capture import _no_cache, as_call, call, is_hf_conv1d, model_device, to_device
from ..recipe_entry import REBUILD_KEY, example_from_spec
from .algebra import CONVS, conv1d_as_linear, linear_as_conv1d, without_identity
from .blocks import FusedConvBlock, StandardConvBlock
from .chains import BATCH_NORMS, set_module
from .graph import CANNOT_FOLD, _outputs, default_tolerance, relative_error, segment_target
from .plans import parse_plan, segments

__all__ = ["write_back", "WriteBackError", "edits_of", "restructure", "EDITS_KEY"]

EDITS_KEY = "easier_kernels"  # where a Hugging Face config records the modules replaced


class WriteBackError(ValueError):
    """What a fold holds that the model's module tree cannot express."""


def write_back(folded: fx.GraphModule, model: nn.Module, example_inputs=None, *, tolerance: float | None = None) -> nn.Module:
    """A copy of `model` (never modified) whose modules compute what `folded` (`ek.fold`'s result
    for a network captured from this model's class) computes. `example_inputs` (default: the
    example recorded in `folded`) is what the copy is checked on: a relative error above
    `tolerance` (the fold's own) raises WriteBackError. The modules replaced are recorded
    (`edits_of(model)`; in a Hugging Face model's config as `easier_kernels`, so that its saved
    folder rebuilds with `restructure`)."""
    done = sites_mod.recipe(folded)
    if "fold" not in done:
        raise WriteBackError("write_back takes what ek.fold returned (a folded GraphModule), not a trainable network: "
                             "fold it first")
    out = copy.deepcopy(model).eval()
    example = _example(folded, example_inputs, model_device(model))
    edits: dict = {}  # path -> what replaced it, this time
    _identities(out, done.get("linearized", []), example, edits)
    _layers(out, folded, done["fold"]["decisions"], edits)
    _weights(out, folded, edits)
    _check(out, folded, example, done["fold"].get("tolerance") if tolerance is None else tolerance)
    _record(out, {**edits_of(model), **edits})  # (a model written back before keeps its earlier edits)
    return out.train(model.training)


def edits_of(model: nn.Module) -> dict:
    """The modules `write_back` replaced in `model`: path -> the constructor spec of what is there now."""
    config = getattr(model, "config", None)
    return dict(getattr(config, EDITS_KEY, None) or getattr(model, "_ek_edits", None) or {})


def restructure(model: nn.Module, edits: dict) -> nn.Module:
    """Puts modules of the shapes `edits` names (from `edits_of` of a written-back model) into
    `model` (in place, values unset), so that the written-back model's state_dict loads into it."""
    for path, spec in edits.items():
        _put(model, path, _build(spec, _current(model, path)), None)
    _record(model, edits)
    return model


def _record(model: nn.Module, edits: dict) -> None:
    if not edits:
        return
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        setattr(config, EDITS_KEY, dict(edits))  # written into config.json by save_pretrained
    else:
        model._ek_edits = dict(edits)


def _example(folded: fx.GraphModule, example_inputs, device) -> tuple[tuple, dict]:
    if example_inputs is not None:
        return to_device(as_call(example_inputs), device)
    spec = folded.meta.get(REBUILD_KEY, {}).get("example")
    if spec is None:
        raise WriteBackError("the folded module records no example inputs: pass example_inputs=")
    return to_device(example_from_spec(spec), device)


def _identities(out: nn.Module, linearized: list, example, edits: dict) -> None:
    """Each linearized site's activation module -> nn.Identity (every call of it must be linearized)."""
    if not linearized:
        return
    found = sites_mod.find_sites(out, example)
    by_name = {s.name: s for s in found}
    calls: dict = {}
    for site in found:
        calls.setdefault(site.module, []).append(site.name)
    for name in linearized:
        site = by_name.get(name)
        if site is None:
            raise WriteBackError(f"the fold linearized site {name!r}, which this model does not have: pass the model the "
                                 "folded network was captured from")
        if site.module is None or site.in_leaf:
            raise WriteBackError(f"site {name} is an activation called as a function (not a module), so it cannot be "
                                 "replaced in the module tree; make it a module (e.g. self.act = nn.GELU()) to write back")
        if unlinearized := [n for n in calls[site.module] if n not in linearized]:
            raise WriteBackError(f"module {site.module} is called {len(calls[site.module])} times and only some calls are "
                                 f"linearized ({', '.join(unlinearized)} is not): its module cannot become an identity")
        _put(out, site.module, nn.Identity(), edits)


def _layers(out: nn.Module, folded: fx.GraphModule, rows: list, edits: dict) -> None:
    """The folded graph's layers into `out`: each merged (or fused) segment at its chain's first
    layer, the later layers nn.Identity; layers folded alone (a batch norm in) in place, their
    batch norms nn.Identity."""
    for row in rows:
        if row.get("choice") in (None, "separate", CANNOT_FOLD):
            continue
        parts = list(segments(parse_plan(row["choice"], len(row["layers"]))))
        for label, start, size in parts:
            if label == "sep":
                continue
            module = folded.get_submodule(segment_target(row["chain"], start, len(parts)))
            first, *rest = row["layers"][start:start + size]
            _put(out, first, _standalone(module, row["chain"]), edits)
            for path in rest:
                _put(out, path, nn.Identity(), edits)
    called = {n.target for n in folded.graph.nodes if n.op == "call_module"}
    for path, module in list(out.named_modules()):
        if not path or path in edits or any(path.startswith(p + ".") for p in edits):
            continue
        if path in called and _layer_changed(module, folded.get_submodule(path)):
            _put(out, path, copy.deepcopy(folded.get_submodule(path)), edits)
        elif path not in called and type(module) in BATCH_NORMS:
            _put(out, path, nn.Identity(), edits)  # folded into the layer before it


def _standalone(module: nn.Module, chain: str) -> nn.Module:
    """A segment's module as a drop-in for the chain's first layer: x -> segment(x)."""
    if isinstance(module, FusedConvBlock):
        if module.activation != "identity":
            raise WriteBackError(f"chain {chain} runs as a fused block that takes the next activation in: fold with "
                                 "portable=True (or decide='separate' for that chain) to write it back")
        module = module.standard()
    if getattr(module, "ek_adds_input", False):  # the skip `+ x` is an add in some forward: take it out again
        module = without_identity(module)
    if isinstance(module, StandardConvBlock) and module.add_residual:
        raise WriteBackError(f"chain {chain} runs as a fused block that takes the residual add in: fold with "
                             "decide='separate' for that chain to write it back")
    return copy.deepcopy(module)


def _layer_changed(old: nn.Module, new: nn.Module) -> bool:
    """Whether the folded graph's module at a path is another module than the model's, not only other values."""
    if is_hf_conv1d(old) and type(new) is nn.Linear:
        old = conv1d_as_linear(old)  # (GPT-2's Conv1D, folded as the Linear it is: the same layer)
    if type(old) is not type(new):
        return True
    shapes = lambda m: [(k, tuple(t.shape)) for k, t in m.state_dict().items()]  # noqa: E731
    settings = lambda m: [getattr(m, k, None) for k in ("stride", "padding", "groups")]  # noqa: E731
    return shapes(old) != shapes(new) or settings(old) != settings(new)


def _weights(out: nn.Module, folded: fx.GraphModule, edits: dict) -> None:
    """Every other parameter and buffer takes the folded module's value, in place (tied weights
    stay tied); a Conv1D's from the Linear it was folded as."""
    values = folded.state_dict()
    with torch.no_grad():
        for path, module in out.named_modules():
            if path in edits or any(path.startswith(p + ".") for p in edits):
                continue
            transposed = is_hf_conv1d(module) and type(_current(folded, path)) is nn.Linear
            for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                value = values.get(f"{path}.{name}" if path else name)
                if transposed and name == "weight" and value is not None:
                    value = value.t()
                if value is not None and value.shape == tensor.shape:
                    tensor.copy_(value)


def _put(out: nn.Module, path: str, module: nn.Module, edits: dict | None) -> None:
    """`module` at `path`, as the class the model had there where that is a GPT-2 Conv1D; recorded in `edits`."""
    old = _current(out, path)
    if old is not None and is_hf_conv1d(old) and type(module) is nn.Linear:
        module = linear_as_conv1d(module, type(old))
    set_module(out, path, module)
    if edits is not None:
        edits[path] = _spec(module)


def _current(model: nn.Module, path: str):
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _spec(module: nn.Module) -> dict:
    """What rebuilds `module`'s shape (its values come from a state_dict)."""
    if type(module) is nn.Identity:
        return {"type": "Identity"}
    if type(module) is nn.Linear:
        return {"type": "Linear", "in_features": module.in_features, "out_features": module.out_features,
                "bias": module.bias is not None}
    if is_hf_conv1d(module):
        return {"type": "Conv1D", "nf": module.nf, "nx": module.weight.shape[0]}
    if type(module) in CONVS:
        return {"type": type(module).__name__, "in_channels": module.in_channels, "out_channels": module.out_channels,
                "kernel_size": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
                "groups": module.groups, "bias": module.bias is not None}
    return {"type": type(module).__name__}  # (rebuilt only where the model has that module there already)


def _build(spec: dict, current: nn.Module | None) -> nn.Module:
    kind = spec["type"]
    if kind == "Identity":
        return nn.Identity()
    if kind == "Linear":
        return nn.Linear(spec["in_features"], spec["out_features"], bias=spec["bias"])
    if kind == "Conv1D" and current is not None and is_hf_conv1d(current):
        return type(current)(spec["nf"], spec["nx"])
    if kind in ("Conv1d", "Conv2d", "Conv3d"):
        args = {k: v if not isinstance(v, list) else tuple(v) for k, v in spec.items() if k != "type"}
        return getattr(nn, kind)(**args)
    if current is not None and type(current).__name__ == kind:
        return current
    raise WriteBackError(f"cannot rebuild a {kind} module: write_back records Identity, Linear, Conv1D and ConvNd layers")


def _check(out: nn.Module, folded: fx.GraphModule, example, tolerance: float | None) -> None:
    with torch.no_grad(), _no_cache(out):  # (a KV cache in the output is not what the fold computes)
        expected = call(folded, example)
        got = call(out, example)
    if tolerance is None:
        tolerance = default_tolerance([t.dtype for t in _outputs(expected) if t.is_floating_point()])
    error = relative_error(got, expected)
    if not error <= tolerance:
        raise WriteBackError(f"the model with the fold written back differs from the folded module by a relative error of "
                             f"{error:.1e} (tolerance {tolerance:.0e}): its forward computes something the graph "
                             "does not show (a weight read outside its module's call?)")
