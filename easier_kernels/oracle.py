"""What removing one layer really costs: the oracle that training-free scores are judged against.

    costs = removal_costs(model, train_loader, val_loader, seeds=(0, 1), cache="costs.json")
    costs["layer1_0_relu1"]   # {"untrained": 4.2, "finetuned": {"0": 0.3, "1": 0.5}}: points below the model
    agreement(scores["entropy"], finetuned_cost(costs), k=3)   # {"spearman", "kendall", "top_k"}

A site's cost is the validation accuracy lost (points below the model's own) when that site alone
is linearized, before any training ("untrained") and after fine-tuning with the loop's schedule
(`train.fit` for `epochs`, as a pruning step fine-tunes), once per seed. Every site of a seed
fine-tunes from the same random state, so its data order and augmentation are the same for every
site: the costs differ by the site, not by the draw. With `cache`, each measurement is written
(atomically) as soon as it is made, and a rerun measures only what is missing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn as nn

from . import distributed
from .capture import batch_inputs, few_samples, model_device, rng_kept
from .checkpoints import seed_everything
from .files import atomic_write
from .linearize import PLAN, linearize
from .sites import find_sites, select
from .train import accuracy, fit

__all__ = ["removal_costs", "finetuned_cost", "agreement", "spearman", "kendall", "top_k_overlap"]

CACHE_FORMAT = "easier_kernels.removal_costs/1"


def removal_costs(model: nn.Module, train_loader, val_loader, *, seeds: Iterable[int] = (0,), epochs: int = 1,
                  lr: float = 0.01, weight_decay: float = 1e-4, amp: bool | None = None, sites: Iterable[str] | None = None,
                  untrained: bool = True, example_inputs=None, plan: str = "measure", runtime: str = "eager",
                  inputs_fn=None, loss_fn=None, leaf_modules: Iterable | None = None,
                  activations: Mapping | None = None, cache=None, progress: bool = False) -> dict:
    """site -> {"untrained": points lost before training (with `untrained`), "finetuned": {seed (str):
    points lost after fine-tuning}}, for every site (or the named `sites`), in execution order.

    The model is not changed; the caller's random state is kept. `example_inputs` (default: one
    sample of the first validation batch) are what each linearization's chains are planned with,
    as a pruning step plans them (`plan`, `runtime`). `cache`: a JSON file kept between runs; one
    written for other weights or options is an error, never silently mixed in. One process
    (under torch.distributed, run it on one rank)."""
    if distributed.active():
        raise RuntimeError("removal_costs runs in one process; under torch.distributed call it on one rank only")
    if plan not in PLAN:
        raise ValueError(f"plan must be one of {', '.join(PLAN)}, not {plan!r}")
    seeds = [str(int(s)) for s in seeds]
    options = {"epochs": epochs, "lr": lr, "weight_decay": weight_decay, "amp": amp, "plan": plan, "runtime": runtime,
               "train_samples": _samples(train_loader)}
    record = _Cache(cache, _weights_hash(model), options)
    device = model_device(model)
    capture_options = {"leaf_modules": leaf_modules, "activations": activations}
    with rng_kept():  # (even iterating a loader draws a random number)
        example = few_samples(example_inputs if example_inputs is not None else
                              batch_inputs(next(iter(val_loader)), device, inputs_fn), 1)
        names = [s.name for s in select(find_sites(model, example, **capture_options), sites)]
        baseline = accuracy(model, val_loader, device=device, inputs_fn=inputs_fn, progress=progress)
        if record.data.get("baseline", baseline) != baseline:
            raise ValueError(f"the cost cache {cache} was measured on other validation data (the model's accuracy was "
                             f"{record.data['baseline']}, now {baseline}); delete it or pass another cache")
        record.put(baseline)
        for name in names:
            measured = record.site(name)
            wanted = [s for s in seeds if s not in measured["finetuned"]]
            if not wanted and (not untrained or "untrained" in measured):
                continue
            net = linearize(model, [name], example, plan=plan, runtime=runtime, **capture_options)
            if untrained and "untrained" not in measured:
                record.put(baseline - accuracy(net, val_loader, device=device, inputs_fn=inputs_fn), name)
            for seed in wanted:
                seed_everything(int(seed))
                tuned = copy.deepcopy(net)
                fit(tuned, train_loader, epochs, lr=lr, weight_decay=weight_decay, amp=amp, device=device,
                    progress=progress, desc=f"{name} seed {seed}", inputs_fn=inputs_fn, loss_fn=loss_fn)
                record.put(baseline - accuracy(tuned, val_loader, device=device, inputs_fn=inputs_fn), name, seed)
    return {name: copy.deepcopy(record.site(name)) for name in names}


def finetuned_cost(costs: Mapping) -> dict:
    """site -> mean fine-tuned cost over the seeds measured (NaN where none was)."""
    return {name: (sum(c["finetuned"].values()) / len(c["finetuned"]) if c["finetuned"] else math.nan)
            for name, c in costs.items()}


class _Cache:
    """The measurements so far, in memory and (with a path) on disk after every new one."""

    def __init__(self, path, weights: str, options: dict):
        self.path = Path(path) if path is not None else None
        self.data = {"format": CACHE_FORMAT, "weights": weights, "options": options, "sites": {}}
        if self.path is None or not self.path.exists():
            return
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read the cost cache {self.path} ({exc}); delete it or pass another cache") from None
        for key, want in (("format", CACHE_FORMAT), ("weights", weights), ("options", options)):
            if saved.get(key) != want:
                raise ValueError(f"the cost cache {self.path} was written for other {key} ({saved.get(key)} != {want}); "
                                 "delete it or pass another cache")
        self.data = saved

    def site(self, name: str) -> dict:
        return self.data["sites"].setdefault(name, {"finetuned": {}})

    def put(self, value: float, site: str | None = None, seed: str | None = None) -> None:
        """The model's accuracy (no site), a site's untrained cost (no seed) or its cost after
        fine-tuning with `seed`; then saved."""
        if site is None:
            self.data["baseline"] = float(value)
        elif seed is None:
            self.site(site)["untrained"] = float(value)
        else:
            self.site(site)["finetuned"][seed] = float(value)
        if self.path is not None:
            text = json.dumps(self.data, indent=1).encode()
            atomic_write(self.path, lambda f: f.write(text))


def _samples(loader) -> int | None:
    """How many samples (else batches) a loader holds, where it says."""
    for sized in (getattr(loader, "dataset", None), loader):
        try:
            return len(sized)
        except TypeError:
            continue
    return None


def _weights_hash(model: nn.Module) -> str:
    """What the costs were measured on: every parameter and buffer, by name and bytes."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


# ---- how well a score ranks the sites by cost

def _ranks(values: list) -> list:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _common(score: Mapping, cost: Mapping) -> list:
    """The sites both have, where neither is NaN (inf ranks last), in the score's order."""
    return [n for n in score if n in cost and score[n] == score[n] and cost[n] == cost[n]]


def _paired(score: Mapping, cost: Mapping) -> tuple[list, list]:
    names = _common(score, cost)
    return [score[n] for n in names], [cost[n] for n in names]


def spearman(score: Mapping, cost: Mapping) -> float:
    """Spearman's rank correlation of the two (site -> value) maps over their common sites: the
    Pearson correlation of the ranks (ties averaged). NaN under 2 sites or a constant side."""
    a, b = _paired(score, cost)
    if len(a) < 2:
        return math.nan
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va, vb = sum((x - ma) ** 2 for x in ra), sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else math.nan


def kendall(score: Mapping, cost: Mapping) -> float:
    """Kendall's tau-b of the two maps over their common sites (ties on either side handled).
    NaN under 2 sites or a constant side."""
    a, b = _paired(score, cost)
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = (a[i] > a[j]) - (a[i] < a[j]), (b[i] > b[j]) - (b[i] < b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                concordant += 1
            else:
                discordant += 1
    n1, n2 = concordant + discordant + ties_a, concordant + discordant + ties_b
    return (concordant - discordant) / math.sqrt(n1 * n2) if n1 > 0 and n2 > 0 else math.nan


def top_k_overlap(score: Mapping, cost: Mapping, k: int) -> float:
    """The share of the k cheapest sites by cost that are among the k lowest by score (ties keep
    the maps' order)."""
    names = _common(score, cost)
    k = min(k, len(names))
    if k < 1:
        return math.nan
    by_score = set(sorted(names, key=score.__getitem__)[:k])
    by_cost = set(sorted(names, key=cost.__getitem__)[:k])
    return len(by_score & by_cost) / k


def agreement(score: Mapping, cost: Mapping, k: int) -> dict:
    """{"spearman", "kendall", "top_k"} of a score against the costs."""
    return {"spearman": spearman(score, cost), "kendall": kendall(score, cost), "top_k": top_k_overlap(score, cost, k)}
