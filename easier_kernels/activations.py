"""What counts as an activation: modules, functions and methods, each with the kind it computes.

A kind is what `ek.ops.act_count` computes (`ops.KINDS`, arguments such as gelu's `approximate`).
Besides torch's own modules this knows the activation modules of timm and Hugging Face
transformers by their class names (GPT-2's tanh GELU, QuickGELU, ...; nothing is imported), and
a user declares their own: `activations={MyAct: "gelu_tanh"}` (a kind, "gelu_tanh" for
gelu(approximate="tanh"), or any other name for an activation the kernels do not compute: such a
site is counted by a separate pass and its module kept as it is).

Declarations are stored by class name ("package.module.Class"), so a recipe that names them can
be saved and read back without the classes being importable.
"""

from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import kinds as kinds_mod

__all__ = ["ACTIVATION_MODULES", "ACTIVATION_FUNCTIONS", "ACTIVATION_METHODS", "KNOWN_MODULES", "declared", "module_kind",
           "computed", "class_name"]

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

# Activation modules of other libraries, by class name -> (kind, kind_args). Each computes
# exactly that kind (checked in tests/test_activations.py where the library is installed), or
# is a kind of its own that the kernels do not compute ("quick_gelu": x * sigmoid(1.702 x)).
KNOWN_MODULES = {
    "transformers.activations.GELUActivation": ("gelu", {}),
    "transformers.activations.NewGELUActivation": ("gelu", {"approximate": "tanh"}),
    "transformers.activations.GELUTanh": ("gelu", {"approximate": "tanh"}),
    "transformers.activations.PytorchGELUTanh": ("gelu", {"approximate": "tanh"}),
    "transformers.activations.FastGELUActivation": ("gelu", {"approximate": "tanh"}),
    "transformers.activations.AccurateGELUActivation": ("gelu", {"approximate": "tanh"}),
    "transformers.activations.MishActivation": ("mish", {}),
    "transformers.activations.QuickGELUActivation": ("quick_gelu", {}),
    "transformers.activations.SiLUActivation": ("silu", {}),
    "timm.layers.activations.GELU": ("gelu", {}),
    "timm.layers.activations.GELUTanh": ("gelu", {"approximate": "tanh"}),
    "timm.layers.activations.QuickGELU": ("quick_gelu", {}),
    "timm.layers.activations.Swish": ("silu", {}),
    "timm.layers.activations.HardSwish": ("hardswish", {}),
    "timm.layers.activations.Mish": ("mish", {}),
}

_ALIASES = {"gelu_tanh": ("gelu", {"approximate": "tanh"})}


def class_name(module_or_type) -> str:
    cls = module_or_type if isinstance(module_or_type, type) else type(module_or_type)
    return f"{cls.__module__}.{cls.__qualname__}"


def declared(activations: Mapping | None) -> dict:
    """A user's `activations` ({class or class name: kind}) -> {class name: [kind, kind_args]},
    checked. A kind is one of `ops.KINDS`, "gelu_tanh", or (kind, {args})."""
    table = {}
    for key, spec in dict(activations or {}).items():
        if isinstance(key, type) and issubclass(key, nn.Module):
            name = class_name(key)
        elif isinstance(key, str):
            name = key
        else:
            raise TypeError(f"activations keys are nn.Module classes (or their 'module.Class' names), not {key!r}")
        kind, kind_args = spec if isinstance(spec, (tuple, list)) else _ALIASES.get(spec, (spec, {}))
        if not isinstance(kind, str) or not isinstance(kind_args, dict):
            raise TypeError(f"activations[{name}] must be a kind name such as 'gelu_tanh' or (kind, {{args}}), not {spec!r}")
        if kind in kinds_mod.KINDS:
            kinds_mod.resolve(kind, kind_args)  # its arguments checked now, not at the first batch
        table[name] = [kind, dict(kind_args)]
    return table


def module_kind(module: nn.Module, table: Mapping | None = None) -> tuple[str, dict] | None:
    """(kind, kind_args) when `module` is an activation (torch's, a known library's, or declared
    in `table` as `declared` returns it), else None."""
    spec = ACTIVATION_MODULES.get(type(module))
    if spec is not None:
        kind, arg_names = spec
        return kind, {a: getattr(module, a) for a in arg_names}
    name = class_name(module)
    if table and name in table:
        kind, kind_args = table[name]
        return kind, dict(kind_args)
    if name in KNOWN_MODULES:
        kind, kind_args = KNOWN_MODULES[name]
        return kind, dict(kind_args)
    return None


def computed(kind: str) -> bool:
    """Whether the kernels compute this kind (a probe can replace the activation's call)."""
    return kind in kinds_mod.KINDS
