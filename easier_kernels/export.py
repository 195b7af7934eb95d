"""Deployable files of a folded module: `export` (ONNX or a torch.export program, its outputs
checked), and `save_folded` / `load_folded` (weights plus a JSON recipe, no pickled code).

    report = ek.export(folded, example_inputs, "model.onnx")          # checked in ONNX Runtime
    ek.save_folded(folded, "folded.pt"); folded = ek.load_folded("folded.pt", model_fn)
"""

from __future__ import annotations

import copy
import io
import json

import torch
import torch.nn as nn

from . import runtimes
from . import sites as sites_mod
from .capture import positional, tied_filled
from .files import atomic_write, load_file
from .fold import decisions, fold, lower_fused
from .fold.graph import CANNOT_FOLD, relative_error
from .linearize import from_recipe

__all__ = ["export", "FORMATS", "save_folded", "load_folded", "folded_from_recipe"]

FORMATS = ("onnx", "pt2")
_FORMAT = "easier_kernels.folded/1"


def export(model: nn.Module, example_inputs, path, format: str = "onnx", *, tolerance: float = 1e-4,
           dynamic: bool = False) -> dict:
    """Writes `model` (a folded module, or any module) as a file that runs without this package:
    "onnx" (checked in an ONNX Runtime session) or "pt2" (`torch.export`, checked by loading it
    back). Fused blocks are lowered to the equivalent standard convolutions first. The file is
    written atomically, and only when its outputs on `example_inputs` match the module's within a
    relative error of `tolerance`. dynamic=True (ONNX): any batch size, and any sequence length
    for integer [batch, sequence] inputs (a text model's token ids), checked on a second shape
    too. Returns {path, format, relative_error, lowered_blocks}."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    args = positional(model, example_inputs)
    module = copy.deepcopy(model).eval()
    lowered = lower_fused(module)
    with torch.no_grad():
        expected = model.eval()(*args)
    buffer = io.BytesIO()
    if format == "onnx":
        runtimes.check_runtime("onnxruntime")
        runtimes.export_onnx(module, args, buffer, dynamic=dynamic)
        session = runtimes.onnx_session(buffer.getvalue(), args[0].device)
        got = _onnx_outputs(session, args)
        if dynamic:  # the same file at another batch and sequence length
            other = _other_shape(args)
            with torch.no_grad():
                error = relative_error(_onnx_outputs(session, other), model(*other))
            if not error <= tolerance:
                raise RuntimeError(f"export: the dynamic {format} file's outputs differ from the module's at input "
                                   f"{[list(a.shape) for a in other]} (relative error {error:.1e}); nothing was written")
    else:
        program = torch.export.export(module, tuple(args))
        torch.export.save(program, buffer)
        buffer.seek(0)
        with torch.no_grad():
            got = torch.export.load(buffer).module()(*args)
    error = relative_error(got, expected)
    if not error <= tolerance:
        raise RuntimeError(f"export: the {format} file's outputs differ from the module's (relative error {error:.1e} > "
                           f"{tolerance:.0e}); nothing was written. Please report this model")
    atomic_write(path, lambda f: f.write(buffer.getvalue()))
    return {"path": str(path), "format": format, "relative_error": error, "lowered_blocks": lowered}


def _onnx_outputs(session, args) -> list:
    return [torch.from_numpy(g) for g in
            session.run(None, {i.name: a.detach().cpu().numpy() for i, a in zip(session.get_inputs(), args)})]


def _other_shape(args: tuple) -> tuple:
    """The inputs at one more sample, and token inputs ([batch, sequence] integers) 3 tokens longer."""
    def grown(a):
        a = torch.cat([a, a[:1]])
        if a.dim() == 2 and not a.is_floating_point():
            a = torch.cat([a, a[:, -1:].expand(-1, 3)], dim=1)
        return a
    return tuple(grown(a) for a in args)


def save_folded(folded: nn.Module, path) -> None:
    """Writes `folded`'s weights and recipe (linearized sites, paddings, plans, fold decisions)
    atomically; `load_folded(path, model_fn)` rebuilds it."""
    done = sites_mod.recipe(folded)
    if "fold" not in done:
        raise ValueError("save_folded: this module was not made by ek.fold; save a PruneResult with .save() instead")
    saved = {"format": _FORMAT, "record": json.dumps(done), "state_dict": folded.state_dict()}
    atomic_write(path, lambda f: torch.save(saved, f))


def load_folded(path, model_fn, *, leaf_modules=None) -> nn.Module:
    """A module saved by `save_folded`: `model_fn` builds the original (unpruned) architecture, or
    is that module; the recipe's sites are linearized in it, its chains folded with the saved
    decisions (no timing), then the saved weights loaded."""
    saved = load_file(path, _FORMAT, "ek.save_folded")
    done = json.loads(saved["record"])
    example = tuple(torch.zeros(shape) for shape in done["fold"]["example_shape"])
    folded = folded_from_recipe(model_fn, done, example, leaf_modules=leaf_modules, where=path)
    folded.load_state_dict(tied_filled(folded, saved["state_dict"]))
    return folded


def folded_from_recipe(model_fn, done: dict, example_inputs, *, leaf_modules=None, where="the recipe") -> nn.Module:
    """The folded module a recipe (with its "fold" record) describes, weights not loaded: `model_fn`'s
    network linearized as recorded, its chains folded with the saved decisions (no timing)."""
    record = done["fold"]
    original = model_fn if isinstance(model_fn, nn.Module) else model_fn()
    net = from_recipe(original, done, example_inputs, leaf_modules=leaf_modules) if done["linearized"] or done["padding"] else original
    replay = {row["chain"]: row["choice"] for row in record["decisions"] if row["choice"] != CANNOT_FOLD}
    folded = fold(net, example_inputs, decide=replay, device="cpu", allow_inexact=record["allow_inexact"], check=False,
                  portable=record.get("portable", False), leaf_modules=leaf_modules)
    chains = [row["chain"] for row in decisions(folded) if row["choice"] != CANNOT_FOLD]
    if chains != list(replay):
        raise ValueError(f"{where}: the model from model_fn has other linear chains than the saved one "
                         f"({chains} vs {list(replay)}); pass the architecture it was folded from")
    folded.meta[sites_mod.RECIPE_KEY] = done  # the saved decision table, with its timings
    return folded
