"""Training-free removability scores beside the paper's entropy: each says, without training, how
cheap a site's linearization should be (lower: removed first, as the entropy).

    counted = ek.entropy_scores(model, loader, energy=True)    # one streaming pass
    change = output_change(model, loader, max_batches=4)       # one forward per site and batch
    table = training_free(counted, change, seed=0)             # score name -> site -> value

The scores (`SCORES`):
- "entropy": the paper's (mean binary entropy of each channel's on-probability). Zero at both
  ends: an always-on unit is already the identity, an always-off one outputs 0 and would output x.
- "off_fraction": the mean off-probability over channels (1 - p): how often the activation
  differs from the identity at all. `on_split` gives the two ends of zero entropy apart.
- "linearization_error": E||act(x) - x||^2 / E||act(x)||^2 (`Scores.linearization_error`): how far
  the layer's output moves when it becomes the identity, relative to what it outputs.
- "output_change": how far the network's logits move when that site alone is linearized,
  ||f_site(x) - f(x)|| / ||f(x)|| over a few batches, in eval mode (no training).
- "random": a seeded uniform draw per site, the floor every score must beat.
"""

from __future__ import annotations

import math
import random as random_mod
from itertools import islice
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from .capture import batch_inputs, capture, eval_mode, logits_of, model_device
from .entropy import Scores
from .linearize import anneal, linearize
from .sites import select, sites_of

__all__ = ["SCORES", "on_split", "off_fraction", "output_change", "random_scores", "training_free"]

SCORES = ("entropy", "off_fraction", "linearization_error", "output_change", "random")


def on_split(probabilities: torch.Tensor, tol: float = 0.0) -> tuple[float, float]:
    """(share of channels always on, share always off): on-probability >= 1 - tol, <= tol. The
    two halves of zero entropy; channels that saw only NaNs are left out."""
    p = probabilities[~torch.isnan(probabilities)]
    if p.numel() == 0:
        return math.nan, math.nan
    return float((p >= 1 - tol).double().mean()), float((p <= tol).double().mean())


def off_fraction(probabilities: torch.Tensor) -> float:
    """Mean over channels of the off-probability 1 - p (NaN-only channels left out)."""
    return float(torch.nanmean(1 - probabilities.double()))


def random_scores(names: Iterable[str], seed: int) -> dict:
    """site -> a uniform draw in [0, 1), a function of the names and the seed only."""
    draw = random_mod.Random(seed)
    return {name: draw.random() for name in names}


@torch.no_grad()
def output_change(model: nn.Module, loader, *, sites: Iterable[str] | None = None, max_batches: int = 4,
                  inputs_fn=None, leaf_modules: Iterable | None = None, activations: Mapping | None = None) -> dict:
    """site -> ||f_site(x) - f(x)|| / ||f(x)|| over the first `max_batches` batches (Frobenius norms
    of the logits, summed over batches before the ratio), f_site being the model with that site
    alone linearized; in eval mode, on the model's device. One forward per site and batch, and
    one for the reference. The model is not changed."""
    if max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches, not {max_batches}")
    device = model_device(model)
    batches = [batch_inputs(b, device, inputs_fn) for b in islice(loader, max_batches)]
    if not batches:
        raise ValueError("output_change: the loader yielded no batches; check the dataset is not empty")
    with eval_mode(model):
        graph = capture(model, batches[0], leaf_modules=leaf_modules, activations=activations)
        names = [s.name for s in select(sites_of(graph), sites)]
        net = linearize(graph, names, batches[0], plan="none", leaf_modules=leaf_modules, activations=activations)
        switches = dict(zip(names, anneal(net, graph, names)))  # every site its activation (t = 0) ...
        net.eval()
        reference = [logits_of(net(*args, **kwargs)).double() for args, kwargs in batches]
        scale = sum(float(r.square().sum()) for r in reference)
        change = {}
        for name, switch in switches.items():  # ... but the one linearized (t = 1)
            switch.t.fill_(1.0)
            moved = sum(float((logits_of(net(*args, **kwargs)).double() - r).square().sum())
                        for (args, kwargs), r in zip(batches, reference))
            switch.t.fill_(0.0)
            change[name] = math.sqrt(moved / scale) if scale > 0 else (0.0 if moved == 0 else math.inf)
    return change


def training_free(counted: Scores, change: Mapping | None = None, seed: int = 0) -> dict:
    """Score name -> site -> value, for every score of `SCORES` that the inputs allow:
    linearization_error where `counted` was counted with energy=True, output_change where
    `change` is given."""
    names = list(counted)
    table = {"entropy": dict(counted.entropy),
             "off_fraction": {n: off_fraction(counted.probabilities[n]) for n in names}}
    if counted.energy:
        table["linearization_error"] = {n: counted.linearization_error(n) for n in names}
    if change is not None:
        table["output_change"] = {n: change[n] for n in names}
    table["random"] = random_scores(names, seed)
    return table
