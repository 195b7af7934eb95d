"""The EASIER loop: score, linearize the lowest-entropy sites, fine-tune, evaluate, repeat.

    result = ek.prune(model, train_loader, val_loader, max_drop=1.0, checkpoint_dir="run/")
    result.model             # the last network that passed (trainable; activations -> identity)
    result.linearized        # the removed sites, in order
    result.save("pruned.pt"); ek.load("pruned.pt", lambda: MyNet())   # weights + a JSON recipe
    net = ek.load(result.model.state_dict(), lambda: MyNet())   # its state dict carries the recipe too

Per step (DESIGN.md, "The method"): the lowest-entropy site goes (`layers_per_step` of them, and
every site scoring exactly 0), the network is fine-tuned and evaluated; the loop stops when the
validation accuracy falls below `baseline - max_drop` (with `patience`, after that many retries
of other moves) and returns the last network that passed.
Scores come from the last fine-tuning epoch (ride-along, as the paper counts them) or from a
separate pass over `train_loader` in train mode (`scoring="pass"`, and always for the first step).

A checkpoint is written atomically after every step; a run killed at any point and started
again with `resume=True` ends exactly as an uninterrupted run with the same seed would.

`Pruner` is the loop as an object (state, `step()`, `state_dict()` / `load_state_dict()`);
`prune` drives it with a checkpoint folder (`easier_kernels.checkpoints`). Under torchrun (an
initialized process group) every rank runs the same loop, data-parallel (`easier_kernels.distributed`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch
import torch.fx as fx
import torch.nn as nn

from . import checkpoints, distributed, models, payoff, recipe_entry, recovery, runtimes, sites as sites_mod, train as training
from .activations import declared
from .capture import (as_call, batch_inputs, batch_size, example_from_spec, example_spec, few_samples, model_device,
                      positional, rng_kept, tied_filled, to_device)
from .entropy import MODES, EntropyMeter, entropy_scores
from .export import folded_from_recipe
from .files import atomic_write, read_weights
from .fold.gains import site_gains
from .linearize import PLAN, anneal as anneal_sites, from_recipe, linearize, recipe, settle
from .recipe_entry import RECIPE_ENTRY, leaf_paths as _leaf_paths
from .scores import output_change
from .select import SELECT, choose, choose_by_latency, site_order
from .tasks import Classification
from .sites import find_sites

__all__ = ["prune", "Pruner", "PruneResult", "Step", "load", "read_record", "check_options"]

SCORING = ("ride_along", "pass")
OUTPUT_CHANGE_BATCHES = 4  # validation batches select="output_change" measures each step's ranking on
_SURROGATE = "ek_surrogate_"  # the entropy penalty's probes, put in for a step's fine-tuning and taken out after


@dataclasses.dataclass
class Step:
    """One attempted step: the sites removed, the scores they were chosen by (every site active
    before the step), the validation (and test) accuracy after fine-tuning, and whether it passed;
    the payoff of the network after it (folded, in the run's runtime: latency over the original's
    with batch norms folded, MACs and parameters); under select="entropy_latency" the measured
    gains the sites were chosen by (`fold.gains.site_gains`); under select="output_change" the output
    changes they were ranked by (`ranking`). The latency's timing: the original's latency in it
    (`baseline_ms`), the ratio's quartiles, and whether it is `noisy` (the machine too busy to
    trust it; `noisy_why` says how). Steps of older runs lack them: None, False, ""."""

    step: int
    removed: list
    entropy: dict
    val_accuracy: float
    accepted: bool
    seconds: float
    test_accuracy: float | None = None
    latency_ratio: float | None = None
    latency_ms: float | None = None
    macs: int | None = None
    params: int | None = None
    gains: list | None = None
    baseline_ms: float | None = None
    latency_q1: float | None = None
    latency_q3: float | None = None
    noisy: bool = False
    noisy_why: str = ""
    ranking: dict | None = None


@dataclasses.dataclass
class PruneResult:
    model: nn.Module
    linearized: list
    history: list
    baseline_accuracy: float
    accuracy: float
    stopped: str
    sites: list
    max_drop: float
    mode: str
    baseline_test_accuracy: float | None = None
    test_accuracy: float | None = None
    example_shape: tuple = ()
    leaf_modules: list = dataclasses.field(default_factory=list)
    activations: dict = dataclasses.field(default_factory=dict)  # declared activation modules, by class name
    example: dict | None = None          # the example's tensors' shapes and dtypes (`capture.example_spec`)
    deploy_batch: int = 1                # the batch the plans, gains and payoff were timed at
    settings: dict = dataclasses.field(default_factory=dict)
    # the original (BN-folded): runtime, device, example_shape, latency_ms, macs, params (at deploy_batch); and the
    # latency_ratio of the unpruned network folded (its own linear chains may merge already)
    baseline_payoff: dict | None = None
    payoff: dict | None = None           # the result folded: latency_ratio, latency_ms, baseline_ms, macs, params
    # (both also latency_q1, latency_q3, noisy, noisy_why: how far the timing can be trusted, `payoff.noise`)
    world_size: int = 1                  # processes the run (its last part, when resumed) ran on
    # causal LMs: greedy generation with the KV cache, unpruned against pruned (`payoff.generation`; the CLI measures it)
    generation: dict | None = None

    def to_dict(self) -> dict:
        """JSON-ready: everything but the model (the schema of report.json)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "history")}
        record["steps"] = [dataclasses.asdict(s) for s in self.history]
        record["recipe"] = recipe(self.model)
        record["example_shape"] = list(self.example_shape)
        return record

    def save(self, path) -> None:
        """Weights and a JSON recipe in one file (no pickled code): `ek.load(path, model_fn)` rebuilds it."""
        saved = {"format": checkpoints.FORMAT, "record": json.dumps(self.to_dict()), "state_dict": self.model.state_dict()}
        atomic_write(path, lambda f: torch.save(saved, f))


def read_record(path) -> dict:
    """The JSON record of a saved PruneResult (sites, steps, settings, recipe), without building the model."""
    return json.loads(checkpoints.read(path)["record"])


def load(source, model_fn: Callable[[], nn.Module] | nn.Module | None = None):
    """A saved pruned network; `model_fn` builds the original (unpruned) architecture, or is that module.

    source: a folder (a text run's hf_model/, any save_pretrained folder, `ek.write_back`'s model
    saved) gives that Hugging Face model rebuilt (`models.load_pretrained`; no model_fn needed).

    source: a file from `PruneResult.save` gives that PruneResult (the recorded sites linearized
    in the original, with the same padding moves, and the weights loaded). A pruned network's
    state dict (`result.model.state_dict()`, `ek.linearize`'s or `ek.fold`'s output), or a file
    torch.save'd from one, gives the network itself: rebuilt from the recipe the state dict
    carries (`recipe_entry.RECIPE_ENTRY`), its weights loaded strictly.
    """
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir():
        return models.load_pretrained(source)
    if model_fn is None:
        raise ValueError("ek.load needs model_fn (building the unpruned architecture) for a file or state dict")
    saved = source if isinstance(source, Mapping) else read_weights(source)
    where = "the state dict" if isinstance(source, Mapping) else str(source)
    if isinstance(saved, Mapping) and RECIPE_ENTRY in saved:
        return _load_network(saved, model_fn, where)
    if isinstance(saved, Mapping) and saved.get("format") == checkpoints.FORMAT and "record" in saved:
        return _load_result(saved, model_fn, where)
    if isinstance(saved, Mapping) and saved and all(isinstance(v, torch.Tensor) for v in saved.values()):
        raise ValueError(f"{where} is a plain state dict: without the {RECIPE_ENTRY!r} entry nothing says which "
                         "activations were removed; pass a pruned network's state_dict() or the file of PruneResult.save")
    raise ValueError(f"{where} is neither a PruneResult file nor a pruned network's state dict; pass the file of "
                     "PruneResult.save or result.model.state_dict()")


def _load_result(saved: dict, model_fn, where: str) -> PruneResult:
    record = json.loads(saved["record"])  # a JSON string inside: the file holds no pickled objects
    original = model_fn() if not isinstance(model_fn, nn.Module) else model_fn
    example = example_from_spec(record["example"]) if record.get("example") else torch.zeros(record["example_shape"])
    net = _rebuild(original, record["recipe"], record["steps"], example, record["leaf_modules"], record.get("activations"))
    if recipe(net) != record["recipe"]:
        raise ValueError(f"{where}: the model from model_fn gives other padding moves than the saved one; pass the "
                         "architecture the result was pruned from")
    net.load_state_dict(tied_filled(net, saved["state_dict"]))
    record["steps"] = [Step(**s) for s in record.pop("steps")]
    fields = {f.name for f in dataclasses.fields(PruneResult)}
    return PruneResult(model=net, history=record.pop("steps"), **{k: v for k, v in record.items() if k in fields})


def _load_network(state_dict: Mapping, model_fn, where: str) -> fx.GraphModule:
    """The network a state dict's recipe entry describes (linearized, or also folded), its weights loaded strictly."""
    saved = recipe_entry.read(state_dict, where)
    done = saved["recipe"]
    original = model_fn() if not isinstance(model_fn, nn.Module) else model_fn
    example = recipe_entry.example_inputs(saved, model_device(original))
    if "fold" in done:
        net = folded_from_recipe(original, done, example, leaf_modules=saved["leaf_modules"], where=where)
    else:
        net = from_recipe(original, done, example, leaf_modules=saved["leaf_modules"], activations=saved["activations"])
    net.load_state_dict(tied_filled(net, state_dict))  # strict; the entry is checked against the rebuilt network's recipe
    return net


class Pruner:
    """The EASIER loop as an object: what `prune` runs, step by step.

        loop = Pruner(model, train_loader, val_loader, max_drop=1.0)   # the options of `prune`
        loop.begin()                       # baseline accuracy, first scores, the unpruned payoff
        while (step := loop.step()) is not None:
            torch.save(loop.state_dict(), "state.pt")   # (prune's checkpoint_dir does this atomically)
        result = loop.result()

    `state_dict()` holds everything a resumed run needs (the loop state, the current network's
    weights and recipe, every rank's random states); `load_state_dict(state)` on a Pruner built
    with the same model and options continues exactly where it was taken.

    Under an initialized torch.distributed process group every rank runs the same loop: the
    default loaders are sharded (`distributed.shard`), the default fine-tuner trains through
    DistributedDataParallel, counts and accuracies are summed over ranks, what is timed (plans,
    payoff, gains) is measured on rank 0 and broadcast, and after fine-tuning every rank holds
    rank 0's weights and buffers. Every method is then called on every rank.
    """

    def __init__(self, model: nn.Module, train_loader, val_loader, *, max_drop: float = 1.0, epochs_per_step: int = 1,
                 layers_per_step: int = 1, max_steps: int | None = None, mode: str = "pooled", scoring: str = "ride_along",
                 exclude: Iterable[str] = (), finetune: Callable | None = None, evaluate: Callable | None = None,
                 test_loader=None, lr: float = 0.01, weight_decay: float = 1e-4, amp: bool | None = None,
                 example_inputs=None, leaf_modules: Iterable | None = None, activations=None, inputs_fn=None,
                 loss_fn=None, device=None, seed: int | None = 0, progress: bool = True, select: str = "entropy",
                 select_seed: int | None = None, runtime: str = "eager", plan: str = "measure",
                 latency_target: float | None = None, deploy_batch: int = 1, distill: float | None = None,
                 distill_temperature: float = 4.0, patience: int = 0, anneal: float | None = None,
                 entropy_weight: float | None = None, entropy_side: str = "on", task=None, optimizer: str = "sgd"):
        self.task = task if task is not None else Classification()
        check_options(task=self.task, optimizer=optimizer, max_drop=max_drop, epochs_per_step=epochs_per_step, layers_per_step=layers_per_step,
                      max_steps=max_steps, mode=mode, scoring=scoring, select=select, latency_target=latency_target,
                      deploy_batch=deploy_batch, lr=lr, weight_decay=weight_decay, distill=distill,
                      distill_temperature=distill_temperature, patience=patience, anneal=anneal,
                      entropy_weight=entropy_weight, entropy_side=entropy_side)
        if (distill, anneal, entropy_weight) != (None, None, None) and finetune is not None:
            raise ValueError("distill, anneal and entropy_weight apply to the default fine-tuner; with your own "
                             "finetune, use easier_kernels.recovery's Distillation / Anneal / EntropyPenalty in it")
        runtimes.check_runtime(runtime)
        if plan not in PLAN:
            raise ValueError(f"plan must be one of {', '.join(PLAN)}, not {plan!r}")
        if select == "random" and seed is None and select_seed is None:
            raise ValueError("select='random' needs a seed or select_seed, so that a resumed run draws the same order")
        self.device = torch.device(device) if device is not None else model_device(model)
        if model_device(model) != self.device or distributed.active():
            model = copy.deepcopy(model).to(self.device)  # (never the caller's model)
            distributed.broadcast_module(model)  # rank 0's weights, as DistributedDataParallel starts from
        self.model = model
        self.inputs_fn, self.loss_fn = inputs_fn, loss_fn if loss_fn is not None else self.task.loss
        self.deploy_batch = deploy_batch
        deployed = _samples(example_inputs, val_loader if val_loader is not None else train_loader, inputs_fn,
                            deploy_batch)
        # what is timed (plans, gains, payoff) runs at the deploy batch; capture and scoring need one sample
        self.deploy_example = to_device(deployed, self.device)
        self.example = to_device(as_call(example_inputs) if example_inputs is not None else _one_sample(deployed),
                                 self.device)
        self.leaf_paths = _leaf_paths(model, leaf_modules)
        self.activations = declared(activations)
        self.capture = {"leaf_modules": self.leaf_paths, "activations": self.activations}
        self.site_names = [s.name for s in find_sites(model, self.example, **self.capture)]
        self.exclude = set(exclude)
        if unknown := sorted(self.exclude - set(self.site_names)):
            raise ValueError(f"exclude names unknown site(s) {', '.join(unknown)}; valid: {', '.join(self.site_names)}")
        self.order = site_order(self.site_names, select, seed if select_seed is None else select_seed)
        self.train_loader = distributed.shard(train_loader, train=True, seed=seed or 0)
        self.val_loader = distributed.shard(val_loader, train=False)
        self.test_loader = distributed.shard(test_loader, train=False)
        self.max_drop, self.epochs_per_step, self.layers_per_step = max_drop, epochs_per_step, layers_per_step
        self.max_steps, self.patience = max_steps, patience
        self.mode, self.scoring, self.select, self.runtime, self.plan = mode, scoring, select, runtime, plan
        self.lr, self.weight_decay, self.amp, self.seed, self.latency_target = lr, weight_decay, amp, seed, latency_target
        self.finetune, self.evaluate = finetune, evaluate
        self.progress = progress and distributed.is_main()
        self.settings = _settings(max_drop=max_drop, epochs_per_step=epochs_per_step, layers_per_step=layers_per_step,
                                  mode=mode, scoring=scoring, exclude=sorted(self.exclude), seed=seed,
                                  finetune="default" if finetune is None else "user", lr=lr, weight_decay=weight_decay,
                                  select=select, select_seed=select_seed, runtime=runtime, plan=plan,
                                  latency_target=latency_target, deploy_batch=deploy_batch, distill=distill,
                                  distill_temperature=distill_temperature, patience=patience, anneal=anneal,
                                  entropy_weight=entropy_weight, entropy_side=entropy_side, task=self.task.name,
                                  optimizer=optimizer)
        self.optimizer = optimizer
        self.distill, self.distill_temperature, self.anneal = distill, distill_temperature, anneal
        self.entropy_weight, self.entropy_side = entropy_weight, entropy_side
        self._teacher = None  # built from the unpruned network when first needed (`_recovery`)
        self.fingerprint = checkpoints.fingerprint(model, self.site_names)
        self.state: dict | None = None
        self.current: nn.Module | None = None

    # ---- the loop

    def begin(self, scores=None) -> None:
        """A fresh run: seeds, the baseline's accuracy and payoff, the first step's scores (`scores`,
        else a pass over the training data) and, for entropy_latency, gains."""
        if self.seed is not None:
            checkpoints.seed_everything(self.seed)
        baseline = self._accuracy(self.model, self.val_loader, "val")
        if warning := self.task.check_baseline(baseline):
            warnings.warn(warning, stacklevel=3)
        self.state = {"baseline": baseline, "baseline_test": self._accuracy(self.model, self.test_loader, "test"),
                      "linearized": [], "history": [], "done": False, "stopped": "",
                      "scores": dict(scores if scores is not None else self._scoring_pass(self.model))}
        self.current = linearize(self.model, [], self.deploy_example, plan="none", **self.capture)
        unpruned = self._measure(self.current)
        self.state["baseline_payoff"] = {"runtime": self.runtime, "device": str(self.device),
                                         "example_shape": _first_shape(self.deploy_example), "latency_ms": unpruned["baseline_ms"],
                                         **payoff.counts(self.model, self.deploy_example),
                                         "latency_ratio": unpruned["latency_ratio"],  # the unpruned network, folded
                                         **payoff.noise(unpruned)}
        self.state["payoff"] = unpruned
        self.state["gains"] = self._gains(self.current, self.state["scores"])
        self.state["ranking"] = self._ranking(self.current)

    @property
    def done(self) -> bool:
        return self.state["done"]

    def step(self) -> Step | None:
        """One step: choose, linearize, fine-tune (counting), evaluate, accept, or reject (and stop,
        or with `patience` left try again: `_reject`). None when there is nothing to do: the loop is
        done, or max_steps steps were attempted (rejected tries count)."""
        state = self.state
        if state["done"]:
            return None
        if self.max_steps is not None and len(state["history"]) >= self.max_steps:
            state["stopped"] = f"reached max_steps={self.max_steps}"  # not done: a resume with more steps goes on
            return None
        scores = state["scores"]
        ranking = state.get("ranking") or scores  # what the rule ranks by: the entropy, or the output change
        candidates = self._open(ranking)
        if not candidates:
            rejected = len(state.get("rejected", []))
            left = "no site left to linearize" + (f" ({rejected} rejected)" if rejected else "")
            state.update(done=True, stopped=left)
            return None
        started = time.perf_counter()
        step = len(state["history"]) + 1
        if self.select == "entropy_latency":
            gains = state.get("gains") or self._gains(self.current, scores)
            chosen = choose_by_latency(candidates, gains, state.get("width", self.layers_per_step))
        else:
            gains, chosen = None, choose(candidates, state.get("width", self.layers_per_step), self.order)
        net = self._linearize(chosen)
        new_scores = self._finetune(net, step, chosen, counting=len(scores) > len(chosen))
        val = self._accuracy(net, self.val_loader, "val")
        paid = self._measure(net)
        passed = self.task.passes(val, state["baseline"], self.max_drop)
        record = Step(step, chosen, {n: (e if e == e else None) for n, e in scores.items()}, val, passed,
                      time.perf_counter() - started, self._accuracy(net, self.test_loader, "test"), paid["latency_ratio"],
                      paid["latency_ms"], paid["macs"], paid["params"], gains, baseline_ms=paid.get("baseline_ms"),
                      **payoff.noise(paid), ranking=state.get("ranking"))
        state["history"].append(dataclasses.asdict(record))
        if record.accepted:
            self.current = net
            state.update(linearized=state["linearized"] + chosen, scores=dict(new_scores), payoff=paid,
                         ranking=self._ranking(net) if len(new_scores) else None)
            if self.patience:
                state.update(tries=0, width=self.layers_per_step)
            if self.latency_target is not None and paid["latency_ratio"] <= self.latency_target:
                state.update(done=True, stopped=_reached(paid["latency_ratio"], self.latency_target))
            else:
                state["gains"] = self._gains(net, state["scores"])
        else:
            self._reject(chosen, self.task.rejection(val, state["baseline"], self.max_drop))
        return record

    # ---- retry on rejection (patience)

    def _open(self, scores: dict) -> dict:
        """The sites the next step may remove: scored, not excluded, not rejected earlier in the run."""
        return _candidates(scores, self.exclude | set(self.state.get("rejected", [])))

    def _reject(self, chosen: list, why: str) -> None:
        """After a rejected step (its network dropped: the current network, scores, gains and
        payoff stay the last accepted step's): the loop ends, or, while at most `patience` steps
        in a row were rejected, the next step tries again. A rejected step of several sites
        at a width above 1 is retried at half the width (the normal rule on the same candidates);
        one of a single site, or at width 1, has its sites marked rejected: never candidates again."""
        state = self.state
        tries = state.get("tries", 0) + 1
        if tries > self.patience:
            state.update(done=True, stopped=why + (f" in {tries} tries in a row (patience {self.patience})"
                                                   if self.patience else ""))
            return
        width = state.get("width", self.layers_per_step)
        if width > 1 and len(chosen) > 1:
            state["width"] = max(1, width // 2)
        else:
            state["rejected"] = state.get("rejected", []) + list(chosen)
        state["tries"] = tries

    def result(self) -> PruneResult:
        """The run so far: the last network that passed, its accuracy and payoff, every step."""
        state = self.state
        history = [Step(**s) for s in state["history"]]
        last = next((s for s in reversed(history) if s.accepted), None)
        return PruneResult(
            model=self.current, linearized=list(state["linearized"]), history=history,
            baseline_accuracy=state["baseline"], accuracy=last.val_accuracy if last else state["baseline"],
            stopped=state["stopped"], sites=self.site_names, max_drop=self.max_drop, mode=self.mode,
            baseline_test_accuracy=state["baseline_test"],
            test_accuracy=last.test_accuracy if last else state["baseline_test"], example_shape=tuple(_first_shape(self.example)),
            leaf_modules=self.leaf_paths, activations=self.activations, example=example_spec(self.example),
            deploy_batch=self.deploy_batch, settings=dict(self.settings), baseline_payoff=state.get("baseline_payoff"),
            payoff=state.get("payoff"), world_size=distributed.world_size())

    # ---- checkpoints

    def state_dict(self) -> dict:
        """The loop state, the current network (weights and recipe) and every rank's random states
        (gathered: under torch.distributed, a collective)."""
        return dict(self.state, state_dict=self.current.state_dict(), recipe=recipe(self.current),
                    rng=distributed.all_gather(checkpoints.rng_state(self._loaders())), world_size=distributed.world_size())

    def load_state_dict(self, state: dict) -> None:
        """Continues the run `state` was taken from: the network rebuilt from its recipe (nothing is
        measured again), its weights, and this rank's random states. With another number of
        processes than it was saved with, the weights and every decision so far carry over, and
        each rank's random streams are seeded afresh (data order and augmentation then differ from
        what an uninterrupted run would have drawn)."""
        state = dict(state)
        weights, done, rng = state.pop("state_dict"), state.pop("recipe", None), state.pop("rng")
        saved_world = state.pop("world_size", 1)
        self.current = _rebuild(self.model, done, state["history"], self.deploy_example, self.leaf_paths, self.activations)
        self.current.load_state_dict(tied_filled(self.current, weights))
        self.state = state
        rngs = rng if isinstance(rng, list) else [rng]  # (one dict: checkpoints of single-process runs)
        if len(rngs) == distributed.world_size():
            checkpoints.set_rng_state(rngs[distributed.rank()], self._loaders())
            return
        if distributed.is_main():
            warnings.warn(f"resuming a run checkpointed with {saved_world} process(es) on {distributed.world_size()}: "
                          "weights and decisions carry over, random streams are seeded afresh", stacklevel=2)
        checkpoints.seed_everything(((self.seed or 0) * 1_000_003 + len(state["history"])) * 1009 + distributed.rank())

    # ---- the pieces of a step

    def _loaders(self) -> tuple:
        return self.train_loader, self.val_loader, self.test_loader

    def _linearize(self, chosen: list) -> nn.Module:
        """The current network with `chosen` linearized; under torch.distributed its chains are
        planned (timed) on rank 0 alone and every other rank lays them out as rank 0 planned."""
        shared = distributed.active() and self.plan == "measure"
        net = None
        if not shared or distributed.is_main():
            net = linearize(self.current, chosen, self.deploy_example, plan=self.plan, runtime=self.runtime, **self.capture)
        if shared:
            plans = distributed.from_main(lambda: recipe(net).get("plans", []))
            if net is None:
                net = linearize(self.current, chosen, self.deploy_example, plan=self.plan, runtime=self.runtime,
                                plans=plans, **self.capture)
        return net

    def _finetune(self, net: nn.Module, step: int, chosen: list, counting: bool) -> dict:
        """Fine-tunes `net` in place (every rank ends with rank 0's weights and buffers); returns
        the next step's scores (ride-along counts, or a pass) when sites remain. With `anneal`,
        the `chosen` sites anneal from their activation to the identity while it trains."""
        annealed = anneal_sites(net, self.current, chosen) if self.anneal is not None else []
        probes, handles = self._probe(net, chosen)
        counted = [n for n in self.site_names if n not in self.state["linearized"] + chosen] if annealed else None
        meter = EntropyMeter(net, example_inputs=self.example, mode=self.mode, sites=counted, **self.capture) \
            if self.scoring == "ride_along" and counting else None
        try:
            if self.finetune is None:
                training.fit(net, self.train_loader, self.epochs_per_step, lr=self.lr, weight_decay=self.weight_decay,
                             meter=meter, amp=self.amp, device=self.device, progress=self.progress, desc=f"step {step}",
                             first_epoch=(step - 1) * self.epochs_per_step, inputs_fn=self.inputs_fn,
                             loss_fn=self.loss_fn, recovery=self._recovery(annealed, probes), optimizer=self.optimizer)
                settle(net)  # (exactly the linear network from here: validated, counted, folded)
                sites_mod.remove_probes(net, _SURROGATE, handles)
            else:
                self.finetune(meter.model if meter is not None else net, step)
            distributed.sync_module(net)
            if meter is not None:
                return dict(_meter_scores(meter))
            return dict(self._scoring_pass(net)) if counting else {}
        finally:
            if meter is not None:
                meter.close()

    def _probe(self, net: nn.Module, chosen: list) -> tuple[list, list]:
        """With entropy_weight: soft on-probability probes (and leaf hooks) at the sites next in
        line: those the rule would remove after `chosen` (for entropy_latency, the lowest entropy:
        its gains are measured only after the step)."""
        if self.entropy_weight is None:
            return [], []
        rest = {n: e for n, e in self._open(self.state["scores"]).items() if n not in chosen}
        names = choose(rest, self.state.get("width", self.layers_per_step), self.order)
        targets = sites_mod.select(sites_mod.sites_of(net), names)
        probes = [recovery.SoftOn(site.channel_dim) for site in targets]
        made = iter(probes)
        handles = sites_mod.instrument(net, targets, lambda site, fused: next(made), prefix=_SURROGATE, fuse=False)
        return probes, handles

    def _recovery(self, annealed: list = (), probes: list = ()) -> list:
        """The recovery terms of the default fine-tuner: the teacher, a frozen copy of the unpruned
        network this Pruner was built with (on resume too: never the network being pruned); the
        schedule of the `annealed` sites; the entropy penalty of the `probes`."""
        terms = [recovery.Anneal(annealed, self.anneal)] if annealed else []
        if probes:
            terms.append(recovery.EntropyPenalty(probes, self.entropy_weight, self.entropy_side))
        if self.distill is None:
            return terms
        if self._teacher is None:
            self._teacher = recovery.Distillation(self.model, self.distill, self.distill_temperature)
        return [self._teacher, *terms]

    def _accuracy(self, net: nn.Module, loader, split: str) -> float | None:
        """Validation (or test) accuracy in percent, the same on every rank (checked for a user's
        `evaluate`); None for a test split not given."""
        if split == "test" and loader is None:
            return None
        if split == "val" and self.evaluate is not None:
            return distributed.same_on_every_rank(float(self.evaluate(net)), "the accuracy evaluate returned")
        return self.task.evaluate(net, loader, device=self.device, progress=self.progress, desc=split,
                                  inputs_fn=self.inputs_fn)

    def _scoring_pass(self, net: nn.Module):
        was_training = net.training
        net.train()  # the paper counts in train mode; buffers are restored by entropy_scores
        try:
            return entropy_scores(net, training.progress_bar(self.train_loader, self.progress, "score"), mode=self.mode,
                                  inputs_fn=self.inputs_fn, **self.capture)
        finally:
            net.train(was_training)

    def _measure(self, net: nn.Module) -> dict:
        """The payoff of `net`: folded for the runtime and timed against the original (on rank 0);
        noisy too where the original's latency in it is far from the run's start's."""
        paid = distributed.from_main(lambda: payoff.measure(net, self.model, self.deploy_example, runtime=self.runtime,
                                                            leaf_modules=self.leaf_paths))
        start = (self.state or {}).get("baseline_payoff") or {}  # (none while begin measures the start)
        return payoff.against_start(paid, start.get("latency_ms"))

    def _ranking(self, net: nn.Module) -> dict | None:
        """select="output_change": each remaining site's output change on the first validation
        batches (`scores.output_change`, eval mode as validation; fixed batches, so the ranking is a
        function of the network alone), measured on rank 0, its random draws kept out of the run's
        streams; None for the other rules."""
        if self.select != "output_change":
            return None

        def measure():
            with rng_kept():
                return output_change(net, self.val_loader, max_batches=OUTPUT_CHANGE_BATCHES, inputs_fn=self.inputs_fn,
                                     **self.capture)
        return distributed.from_main(measure)

    def _gains(self, net: nn.Module, scores: dict) -> list | None:
        """entropy_latency's measured gains for the next step (on rank 0), before the checkpoint that resumes it."""
        if self.select != "entropy_latency" or not (names := list(self._open(scores))):
            return None
        return distributed.from_main(lambda: site_gains(net, names, positional(net, self.deploy_example),
                                                        runtime=self.runtime, leaf_modules=self.leaf_paths))


def prune(model: nn.Module, train_loader, val_loader, *, max_drop: float = 1.0, epochs_per_step: int = 1,
          layers_per_step: int = 1, max_steps: int | None = None, mode: str = "pooled", scoring: str = "ride_along",
          exclude: Iterable[str] = (), finetune: Callable | None = None, evaluate: Callable | None = None,
          test_loader=None, scores=None, lr: float = 0.01, weight_decay: float = 1e-4, amp: bool | None = None,
          example_inputs=None, leaf_modules: Iterable | None = None, activations=None, inputs_fn=None, loss_fn=None,
          device=None, seed: int | None = 0, checkpoint_dir=None, resume: bool = False, progress: bool = True, select: str = "entropy",
          select_seed: int | None = None, runtime: str = "eager", plan: str = "measure",
          latency_target: float | None = None, deploy_batch: int = 1, distill: float | None = None,
          distill_temperature: float = 4.0, patience: int = 0, anneal: float | None = None,
          entropy_weight: float | None = None, entropy_side: str = "on", task=None, optimizer: str = "sgd",
          on_step: Callable[["PruneResult"], None] | None = None) -> PruneResult:
    """Runs the EASIER loop on a trained `model` (never modified) and returns a PruneResult.

    task: what the model is for (`easier_kernels.tasks`): Classification() (default; accuracy in
        percent) or CausalLM() (perplexity). It gives the loss, the validation metric and what
        max_drop means; a Step's val_accuracy / test_accuracy hold its metric.
    max_drop: how far the validation metric may fall from the baseline: accuracy points (percent)
        for classification, the relative perplexity increase for a causal LM (0.05: +5%).
    finetune(model, step): your own training of `model` in place (DDP, Lightning, ...); by default
        `epochs_per_step` epochs of SGD (momentum 0.9, `lr` cosine to 0, `weight_decay`, AMP on CUDA),
        or of AdamW with optimizer="adamw".
        With scoring="ride_along" the model handed over counts on/off while it trains: the scores
        cover all the training it gets (the default fine-tuner counts in its last epoch only).
    evaluate(model) -> the task's metric (accuracy in percent); by default the task's on `val_loader`.
    test_loader: also recorded per step (never used to decide).
    scores: the first step's scores (e.g. from an EntropyMeter during your own training);
        by default a pass over `train_loader` in train mode.
    exclude: site names never linearized. seed: seeds torch, numpy and random (None: leave them).
    Batches: (inputs, targets) tuples or dicts of keyword inputs with "labels" (Hugging Face
        style); inputs_fn(batch) -> (args, kwargs) and loss_fn(output, batch) read any other kind
        (`easier_kernels.capture.batch_inputs` / `default_loss`: the output's .loss, else
        cross-entropy of its logits). example_inputs: a tensor, a tuple of positional inputs or a
        dict of keyword inputs, what the network is captured with (default: the first sample of the
        validation loader, every input); when given, also what the deploy batch is drawn from.
    leaf_modules / activations: see `ek.find_sites` (module paths or types not traced into; your
        own activation modules, {MyAct: "gelu_tanh"}).
    select: which sites a step removes. "entropy" (the method): the `layers_per_step` lowest scores
        and every site scoring exactly 0. "entropy_latency" (ours): the latency gain of linearizing
        each remaining site (or pair that only together forms a chain) is measured first, in
        `runtime` on `example_inputs`, and sites go by least entropy per ms saved; sites that buy
        nothing go last (see `easier_kernels.select`). The baselines they are measured against remove exactly
        `layers_per_step` sites per step, scores recorded but unused: "first" / "last" in execution
        order from the input / output end, "random" in an order drawn once from `select_seed`
        (default `seed`), an RNG of its own, so training sees the same random numbers under every rule.
    runtime / plan: how each step's linearization plans its chains (see `ek.linearize`): timed in
        the runtime the pruned model will run in ("eager", "inductor", "onnxruntime"), at
        `deploy_batch`, padding moved only where a plan merges. Plans come from measurements, so two
        runs can differ in them; plan="merge" (every chain's padding moved) or "none" makes a run
        independent of timing. Every step also records its payoff: the network folded for
        `runtime`, timed against the original with batch norms folded (`latency_ratio`), its MACs
        and parameters.
    deploy_batch: the batch size the pruned model will serve at (1: per-request latency). Plans,
        gains and payoff are timed on that many samples: the first `deploy_batch` of the validation
        loader (the training loader's without one; of `example_inputs` when given), repeated
        cyclically where it holds fewer (timings depend on shapes, not values). A plan is only as
        good as the batch it was timed at: a merge that pays at batch 1 can be slower at 16.
    latency_target: also stop, successfully, once an accepted step's latency_ratio is at most this
        (e.g. 0.7: 70% of the original's latency).
    distill / distill_temperature: recovery by knowledge distillation (Hinton et al.; DepthShrinker
        fine-tunes so): the default fine-tuner's loss becomes (1 - distill) * task loss + distill *
        T^2 KL(teacher || student) at temperature T, the teacher a frozen copy of `model` (the
        unpruned network) in eval mode, run on the same batch (`easier_kernels.recovery`). It adds a
        teacher forward to every training batch. None: plain fine-tuning, as the paper.
    anneal: gradual linearization (Layer Folding's idea; ours with a training-free importance): a
        fraction in (0, 1]. While a step fine-tunes, its chosen sites compute (1 - t) * act(x) + t * x,
        t going from 0 to 1 over that fraction of the step's batches (a buffer: no recompile under
        torch.compile), exactly the identity from then on; after fine-tuning they are the identity
        `linearize` made, so the network validated and folded is the linear one, exactly.
        None: switched at once, as the paper.
    entropy_weight / entropy_side: the entropy in the loss (the seed's suggestion): while a step
        fine-tunes, the sites next in line (those the rule would remove after this step's; for
        entropy_latency the lowest entropy) add entropy_weight x their soft layer entropy
        (`recovery.surrogate`: sigmoid on-probabilities per channel) to the loss, so that they
        arrive nearly linear. side "on" (default) pushes every unit towards always-on, the only end
        that is the identity (an always-off ReLU outputs 0; linearizing it gives x); "both" lowers
        the plain entropy, towards either end, as the paper's score counts them.
    patience: retry on rejection (ours, DESIGN.md "Beyond the paper: recovery"). 0, the paper: the
        loop ends at the first rejected step. N: a rejected step is undone (the run goes on from the
        last accepted network, its scores and gains) and the next move is tried; the loop ends when
        N + 1 steps in a row were rejected (an accepted step starts the count again). With
        layers_per_step > 1 a rejected step of several sites is first retried with half as many
        (chosen by the same rule from the same candidates), halving again on each further rejection,
        back to layers_per_step after an accepted step. A rejected step of one site (or at width 1)
        marks its sites rejected: never candidates again in the run, since a site that failed once
        is the likeliest to fail again, and it bounds the compute (each site is tried alone at most
        once). Every try is a step of the history (accepted=False) and counts against max_steps.
    checkpoint_dir / resume: a checkpoint per step; resume=True continues the run found there
        (from the newest readable checkpoint: an unreadable one is skipped with a warning).
    on_step(result): called after every step and at the end with the result so far.

    Under torch.distributed (torchrun; an initialized process group), call it on every rank: see
    `Pruner` for what is shared. Your `finetune` then runs on every rank and must keep the ranks'
    weights together (wrap the model in DistributedDataParallel; weights that drift apart are an
    error); your `evaluate` runs on every rank and must return the same accuracy on each (over
    the whole validation set: sum correct and total over ranks, as `ek.train.accuracy` does).
    Rank 0 alone prints and writes checkpoints.
    """
    options = {k: v for k, v in locals().items() if k not in ("model", "train_loader", "val_loader", "scores",
                                                               "checkpoint_dir", "resume", "on_step")}
    loop = Pruner(model, train_loader, val_loader, **options)
    folder = checkpoints.CheckpointFolder(checkpoint_dir, loop.fingerprint, loop.settings) if checkpoint_dir is not None else None
    state = folder.start(resume) if folder else None
    if state is None:
        loop.begin(scores)
        if folder:
            folder.save(loop.state_dict(), 0)
    else:
        loop.load_state_dict(state)
    if loop.progress and not loop.state["history"]:
        _print_row(None, loop.result())

    def report(result: PruneResult) -> None:  # checkpoint, then tell the caller
        if folder:
            folder.save(loop.state_dict(), len(result.history))
        if on_step:
            on_step(result)

    reported = False  # whether the state the loop is in has been checkpointed and reported
    while not (reported and loop.done):
        reported = False
        if (record := loop.step()) is None:
            break
        result = loop.result()
        if loop.progress:
            _print_row(record, result)
        report(result)
        reported = True
    result = loop.result()
    if not reported:  # the loop ended without a step (max_steps, nothing left): its state still counts
        report(result)
    return result

# ---- the loop's pieces

def check_options(*, task=None, optimizer="sgd", max_drop=1.0, epochs_per_step=1, layers_per_step=1, max_steps=None, mode="pooled",
                  scoring="ride_along", select="entropy", latency_target=None, deploy_batch=1, lr=0.01,
                  weight_decay=1e-4, distill=None, distill_temperature=4.0, patience=0, anneal=None,
                  entropy_weight=None, entropy_side="on") -> None:
    """`prune`'s options checked (the CLI checks its flags with it before anything is written or
    trained); a ValueError whose message starts with the option's name."""
    (task if task is not None else Classification()).check_max_drop(max_drop)
    if optimizer not in training.OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(training.OPTIMIZERS)}, not {optimizer!r}")
    training.check_rate("lr", lr)
    if not (isinstance(weight_decay, (int, float)) and 0 <= weight_decay < float("inf")):
        raise ValueError(f"weight_decay must be a finite number >= 0, not {weight_decay}")
    if distill is not None:
        recovery.check_distillation(distill, distill_temperature)
    if anneal is not None:
        recovery.check_anneal(anneal)
    if entropy_weight is not None:
        recovery.check_entropy_weight(entropy_weight, entropy_side)
    for name, value in (("epochs_per_step", epochs_per_step), ("layers_per_step", layers_per_step),
                        ("deploy_batch", deploy_batch)):
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, not {value!r}")
    if max_steps is not None and not (isinstance(max_steps, int) and max_steps >= 0):
        raise ValueError(f"max_steps must be an integer >= 0 or None, not {max_steps}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if scoring not in SCORING:
        raise ValueError(f"scoring must be one of {', '.join(SCORING)}, not {scoring!r}")
    if select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, not {select!r}")
    if latency_target is not None and not (isinstance(latency_target, (int, float)) and 0 < latency_target <= 1):
        raise ValueError(f"latency_target must be a fraction of the original's latency in (0, 1], not {latency_target}")
    if not (isinstance(patience, int) and not isinstance(patience, bool) and patience >= 0):
        raise ValueError(f"patience must be an integer >= 0, not {patience!r}")


def _settings(select: str, select_seed, runtime: str, plan: str, latency_target, deploy_batch: int, distill,
              distill_temperature, patience: int = 0, anneal=None, entropy_weight=None, entropy_side="on",
              task: str = "classification", optimizer: str = "sgd", **always) -> dict:
    """The options a resumed run must share with the run it resumes. Later options only where not
    their default, so that runs checkpointed before they existed still resume."""
    return {**always, **({"select": select} if select != "entropy" else {}),
            **({"select_seed": select_seed} if select == "random" else {}),
            **({"runtime": runtime} if runtime != "eager" else {}), **({"plan": plan} if plan != "measure" else {}),
            **({"latency_target": latency_target} if latency_target is not None else {}),
            **({"deploy_batch": deploy_batch} if deploy_batch != 1 else {}),
            **({"distill": distill, "distill_temperature": distill_temperature} if distill is not None else {}),
            **({"patience": patience} if patience else {}), **({"anneal": anneal} if anneal is not None else {}),
            **({"entropy_weight": entropy_weight, "entropy_side": entropy_side} if entropy_weight is not None else {}),
            **({"task": task} if task != "classification" else {}),
            **({"optimizer": optimizer} if optimizer != "sgd" else {})}


def _candidates(scores: dict, exclude: set) -> dict:
    """The sites a step may remove: scored (not NaN) and not excluded."""
    return {n: e for n, e in scores.items() if n not in exclude and e == e}  # e == e: not NaN


def _reached(ratio: float, target: float) -> str:
    return f"latency ratio {ratio:.3f} <= latency_target {target}"


def _meter_scores(meter: EntropyMeter):
    try:
        return meter.scores()
    except RuntimeError as exc:
        raise ValueError("finetune did not run the model it was given, so nothing was counted; train that module "
                         "in place, or pass scoring='pass'") from exc


def _samples(example_inputs, loader, inputs_fn, count: int) -> tuple[tuple, dict]:
    """The model's inputs for `count` samples, as (args, kwargs): the first `count` samples of
    `example_inputs` when given, else of the loader (as many batches as it takes), repeated
    cyclically where there are fewer (what is timed depends on their shapes, not their values)."""
    batches = [as_call(example_inputs)] if example_inputs is not None else _first_batches(loader, inputs_fn, count)
    return _copied(few_samples(_concatenated(batches), count))


def _first_batches(loader, inputs_fn, count: int) -> list:
    """The loader's first batches, as (args, kwargs) on the CPU, until they hold `count` samples or it ends."""
    batches, held = [], 0
    for batch in loader:
        batches.append(batch_inputs(batch, "cpu", inputs_fn))
        held += batch_size(batches[-1])
        if held >= count:
            break
    if not batches:
        raise ValueError("the loader yielded no batches; check the dataset is not empty")
    return batches


def _batched(value) -> bool:
    """Whether an input has a batch dimension (dim 0); anything else is passed as it is."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _concatenated(batches: list) -> tuple[tuple, dict]:
    """The batches' inputs as one batch (every batched input concatenated along dim 0)."""
    def cat(first, *rest):
        if not _batched(first) or not rest:
            return first
        other = next((t for t in rest if t.shape[1:] != first.shape[1:]), None)
        if other is not None:  # (batches padded to their longest sequence)
            raise ValueError(f"deploy_batch needs samples of one shape, but the loader's batches hold "
                             f"{list(first.shape[1:])} and {list(other.shape[1:])}; use a validation loader whose "
                             "first batch holds deploy_batch samples")
        return torch.cat([first, *rest])
    return torch.utils._pytree.tree_map(cat, batches[0], *batches[1:])


def _copied(inputs: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The tensors of `inputs` copied out of the batch they view (which is then freed)."""
    return torch.utils._pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, inputs)


def _one_sample(inputs) -> tuple[tuple, dict]:
    return _copied(few_samples(inputs, 1))


def _first_shape(example) -> list:
    """The shape of the example's first tensor (what reports show)."""
    tensor = next((t for t in torch.utils._pytree.tree_leaves(example) if isinstance(t, torch.Tensor)), None)
    return list(tensor.shape) if tensor is not None else []


def _rebuild(original: nn.Module, done: dict | None, steps: list, example, leaf_paths: list,
             activations: dict | None = None) -> fx.GraphModule:
    """The network as the run left it, from its recipe (sites, paddings, plans: nothing is
    measured again). Checkpoints written before they held a recipe are replayed step by step with
    every chain's padding moved, as those runs did."""
    example = to_device(example, model_device(original))
    options = {"leaf_modules": leaf_paths, "activations": activations}
    if done is not None:
        return from_recipe(original, done, example, **options)
    net = linearize(original, [], example, plan="none", **options)
    for step in steps:
        if step["accepted"]:
            net = linearize(net, step["removed"], example, plan="merge", **options)
    return net


def _print_row(step: Step | None, result: PruneResult) -> None:
    from tqdm.auto import tqdm

    from . import report

    if step is None:
        tqdm.write(report.step_header(result.to_dict()))
        tqdm.write(f"baseline: validation accuracy {result.baseline_accuracy:.2f}, {len(result.sites)} sites")
    else:
        tqdm.write(report.step_row(result.to_dict(), dataclasses.asdict(step)))


