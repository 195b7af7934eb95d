"""The recipe entry of a state dict: a pruned network's weights say which network they are.

    sd = pruned.state_dict()          # the original's keys, plus RECIPE_ENTRY (the recipe as JSON bytes)
    original.load_state_dict(sd)      # RuntimeError: Unexpected key(s) in state_dict: "easier_kernels.recipe:load_with_ek.load"
    net = ek.load(sd, model_fn)       # the right way: the pruned network rebuilt, its weights loaded strictly

Why: a linearized network has exactly the original's parameter names, so the original would take
its weights strictly and silently, activations and paddings back: another network, without a word.
Every GraphModule this package builds (`linearize`, `from_recipe`, `fold`) is `track`ed: its
`state_dict()` gets one more entry, a uint8 tensor of JSON (recipe, example input shapes and
dtypes, leaf module paths, declared activations: what `ek.load` rebuilds it from), written from `gm.meta` when the state
dict is taken (never stale); loading a state dict into such a module checks the entry against the
module's own recipe (another structure is an error) and takes it out. The hooks are module-level
functions: deepcopy keeps them, and they pickle.
"""

from __future__ import annotations

import json
from typing import Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from . import sites as sites_mod
from .capture import example_from_spec, example_spec, to_device

__all__ = ["RECIPE_ENTRY", "track", "read", "example_inputs", "leaf_paths"]

RECIPE_ENTRY = "easier_kernels.recipe:load_with_ek.load"  # a key that says what to do, in torch's "Unexpected key(s)"
FORMAT = "easier_kernels.recipe/1"
REBUILD_KEY = "easier_kernels.rebuild"  # gm.meta: example input specs and leaf module paths, beside the recipe


def track(gm: fx.GraphModule, model: nn.Module, example_inputs, leaf_modules: Iterable | None) -> fx.GraphModule:
    """Makes `gm`'s state dicts carry its recipe and what rebuilds it (`model`: what `gm` was made
    from, to resolve leaf module types to paths)."""
    gm.meta[REBUILD_KEY] = {"example": example_spec(example_inputs), "leaf_modules": leaf_paths(model, leaf_modules),
                            "activations": sites_mod.declared_activations(gm)}
    gm.register_state_dict_post_hook(_write_entry)
    gm.register_load_state_dict_pre_hook(_check_entry)
    return gm


def read(state_dict: Mapping, where: str = "the state dict") -> dict | None:
    """The recipe entry of a state dict: {format, recipe, example, leaf_modules, activations}; None when absent."""
    value = state_dict.get(RECIPE_ENTRY)
    if value is None:
        return None
    try:
        saved = json.loads(bytes(value.detach().cpu().numpy()).decode())
    except Exception:
        saved = None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(saved.get("recipe"), dict):
        raise ValueError(f"{where}: its {RECIPE_ENTRY!r} entry is not an easier_kernels recipe (format {FORMAT}); "
                         "take the state dict again from the pruned network")
    return saved


def example_inputs(saved: dict, device=None) -> tuple[tuple, dict]:
    """Inputs of the recorded shapes and dtypes (what a rebuild captures and checks with)."""
    return to_device(example_from_spec(saved["example"]), device)


def leaf_paths(model: nn.Module, leaf_modules) -> list:
    """Leaf modules as module paths (types resolved), so that the recipe stays plain JSON."""
    if not leaf_modules:
        return []
    leaf_modules = list(leaf_modules)
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    return [name for name, m in model.named_modules() if name and (name in leaf_modules or isinstance(m, types))]


def _encode(module: nn.Module) -> torch.Tensor:
    saved = {"format": FORMAT, "recipe": sites_mod.recipe(module), **module.meta.get(REBUILD_KEY, {})}
    return torch.frombuffer(bytearray(json.dumps(saved).encode()), dtype=torch.uint8).clone()  # (a storage of its own)


def _structure(done: dict) -> dict:
    """What the weights belong to: the linearized sites, each conv's final padding, the fold's choices."""
    padding = {c["conv"]: list(c["after"]) for c in done.get("padding", []) if "after" in c}
    fold = {row["chain"]: row["choice"] for row in (done.get("fold") or {}).get("decisions", [])}
    return {"linearized sites": sorted(done.get("linearized", [])), "paddings": padding, "fold choices": fold}


# ---- the hooks (module-level, so that modules holding them deep-copy and pickle)


def _write_entry(module, state_dict, prefix, local_metadata) -> None:
    state_dict[prefix + RECIPE_ENTRY] = _encode(module)


def _check_entry(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs) -> None:
    """Takes the entry out of the state dict being loaded (a plain one, e.g. the original's
    weights, loads as before), and records an error when it is of another structure."""
    value = state_dict.pop(prefix + RECIPE_ENTRY, None)
    if value is None:
        return
    try:
        saved = read({RECIPE_ENTRY: value})
    except ValueError as exc:
        error_msgs.append(str(exc))
        return
    theirs, ours = _structure(saved["recipe"]), _structure(sites_mod.recipe(module))
    differs = [f"{key} {theirs[key]} (this module: {ours[key]})" for key in ours if theirs[key] != ours[key]]
    if differs:
        error_msgs.append(f"this state dict is of another pruned network: {'; '.join(differs)}; rebuild the network it "
                          "was taken from with ek.load(state_dict, model_fn)")
