"""The EASIER loop: score, linearize the lowest-entropy sites, fine-tune, evaluate, repeat.

    result = ek.prune(model, train_loader, val_loader, max_drop=1.0, checkpoint_dir="run/")
    result.model             # the last network that passed (trainable; activations -> identity)
    result.linearized        # the removed sites, in order
    result.save("pruned.pt"); ek.load("pruned.pt", lambda: MyNet())   # weights + a JSON recipe

Per step (DESIGN.md, "The method"): the lowest-entropy site goes (`layers_per_step` of them, and
every site scoring exactly 0), the network is fine-tuned and evaluated; the loop stops when the
validation accuracy falls below `baseline - max_drop` and returns the last network that passed.
Scores come from the last fine-tuning epoch (ride-along, as the paper counts them) or from a
separate pass over `train_loader` in train mode (`scoring="pass"`, and always for the first step).

A checkpoint is written atomically after every step; a run killed at any point and started
again with `resume=True` ends exactly as an uninterrupted run with the same seed would.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import re
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from . import payoff, runtimes, train as training
from .entropy import MODES, EntropyMeter, batch_inputs, entropy_scores, model_device
from .files import atomic_write, load_file
from .fold.gains import site_gains
from .linearize import PLAN, from_recipe, linearize, recipe
from .select import SELECT, choose, choose_by_latency, site_order
from .sites import find_sites

__all__ = ["prune", "PruneResult", "Step", "load", "read_record", "atomic_write"]

SCORING = ("ride_along", "pass")
_FORMAT = "easier_kernels.prune/1"
_CHECKPOINT = re.compile(r"step_(\d+)\.pt")


@dataclasses.dataclass
class Step:
    """One attempted step: the sites removed, the scores they were chosen by (every site active
    before the step), the validation (and test) accuracy after fine-tuning, and whether it passed;
    the payoff of the network after it (folded, in the run's runtime: latency over the original's
    with batch norms folded, MACs and parameters); under select="entropy_latency" the measured
    gains the sites were chosen by (`fold.gains.site_gains`)."""

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
    settings: dict = dataclasses.field(default_factory=dict)
    # the original (BN-folded): runtime, device, example_shape, latency_ms, macs, params; and the
    # latency_ratio of the unpruned network folded (its own linear chains may merge already)
    baseline_payoff: dict | None = None
    payoff: dict | None = None           # the result folded: latency_ratio, latency_ms, baseline_ms, macs, params

    def to_dict(self) -> dict:
        """JSON-ready: everything but the model (the schema of report.json)."""
        record = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("model", "history")}
        record["steps"] = [dataclasses.asdict(s) for s in self.history]
        record["recipe"] = recipe(self.model)
        record["example_shape"] = list(self.example_shape)
        return record

    def save(self, path) -> None:
        """Weights and a JSON recipe in one file (no pickled code): `ek.load(path, model_fn)` rebuilds it."""
        saved = {"format": _FORMAT, "record": json.dumps(self.to_dict()), "state_dict": self.model.state_dict()}
        atomic_write(path, lambda f: torch.save(saved, f))


def read_record(path) -> dict:
    """The JSON record of a saved PruneResult (sites, steps, settings, recipe), without building the model."""
    return json.loads(_load(path)["record"])


def load(path, model_fn: Callable[[], nn.Module] | nn.Module) -> PruneResult:
    """A saved PruneResult: `model_fn` builds the original (unpruned) architecture, or is that module;
    the recorded sites are linearized in it (with the same padding moves) and the weights loaded."""
    saved = _load(path)
    record = json.loads(saved["record"])  # a JSON string inside: the file holds no pickled objects
    original = model_fn() if not isinstance(model_fn, nn.Module) else model_fn
    net = _rebuild(original, record["recipe"], record["steps"], torch.zeros(record["example_shape"]), record["leaf_modules"])
    if recipe(net) != record["recipe"]:
        raise ValueError(f"{path}: the model from model_fn gives other padding moves than the saved one; pass the "
                         "architecture the result was pruned from")
    net.load_state_dict(saved["state_dict"])
    record["steps"] = [Step(**s) for s in record.pop("steps")]
    fields = {f.name for f in dataclasses.fields(PruneResult)}
    return PruneResult(model=net, history=record.pop("steps"), **{k: v for k, v in record.items() if k in fields})


def prune(model: nn.Module, train_loader, val_loader, *, max_drop: float = 1.0, epochs_per_step: int = 1,
          layers_per_step: int = 1, max_steps: int | None = None, mode: str = "pooled", scoring: str = "ride_along",
          exclude: Iterable[str] = (), finetune: Callable | None = None, evaluate: Callable | None = None,
          test_loader=None, scores=None, lr: float = 0.01, weight_decay: float = 1e-4, amp: bool | None = None,
          example_inputs=None, leaf_modules: Iterable | None = None, device=None, seed: int | None = 0,
          checkpoint_dir=None, resume: bool = False, progress: bool = True, select: str = "entropy",
          select_seed: int | None = None, runtime: str = "eager", plan: str = "measure",
          latency_target: float | None = None, on_step: Callable[["PruneResult"], None] | None = None) -> PruneResult:
    """Runs the EASIER loop on a trained `model` (never modified) and returns a PruneResult.

    max_drop: accuracy points (percent) the validation accuracy may fall below the baseline.
    finetune(model, step): your own training of `model` in place (DDP, Lightning, ...); by default
        `epochs_per_step` epochs of SGD (momentum 0.9, `lr` cosine to 0, `weight_decay`, AMP on CUDA).
        With scoring="ride_along" the model handed over counts on/off while it trains: the scores
        cover all the training it gets (the default fine-tuner counts in its last epoch only).
    evaluate(model) -> accuracy in percent; by default top-1 on `val_loader`.
    test_loader: also recorded per step (never used to decide).
    scores: the first step's scores (e.g. from an EntropyMeter during your own training);
        by default a pass over `train_loader` in train mode.
    exclude: site names never linearized. seed: seeds torch, numpy and random (None: leave them).
    select: which sites a step removes. "entropy" (the method): the `layers_per_step` lowest scores
        and every site scoring exactly 0. "entropy_latency" (ours): the latency gain of linearizing
        each remaining site (or pair that only together forms a chain) is measured first, in
        `runtime` on `example_inputs`, and sites go by least entropy per ms saved; sites that buy
        nothing go last (see `easier_kernels.select`). The baselines they are measured against remove exactly
        `layers_per_step` sites per step, scores recorded but unused: "first" / "last" in execution
        order from the input / output end, "random" in an order drawn once from `select_seed`
        (default `seed`), an RNG of its own, so training sees the same random numbers under every rule.
    runtime / plan: how each step's linearization plans its chains (see `ek.linearize`): timed in
        the runtime the pruned model will run in ("eager", "inductor", "onnxruntime"), on
        `example_inputs` (pass a batch of the size you will deploy with; by default one sample of
        the validation loader), padding moved only where a plan merges. Plans come from measurements, so two runs can differ in them;
        plan="merge" (every chain's padding moved) or "none" makes a run independent of timing.
        Every step also records its payoff: the network folded for `runtime`, timed against the
        original with batch norms folded (`latency_ratio`), its MACs and parameters.
    latency_target: also stop, successfully, once an accepted step's latency_ratio is at most this
        (e.g. 0.7: 70% of the original's latency).
    checkpoint_dir / resume: a checkpoint per step; resume=True continues the run found there.
    on_step(result): called after every step and at the end with the result so far.
    """
    _check_options(max_drop, epochs_per_step, layers_per_step, max_steps, mode, scoring, select, latency_target)
    runtimes.check_runtime(runtime)
    if plan not in PLAN:
        raise ValueError(f"plan must be one of {', '.join(PLAN)}, not {plan!r}")
    device = torch.device(device) if device is not None else model_device(model)
    if model_device(model) != device:
        model = copy.deepcopy(model).to(device)
    example = _example(example_inputs, val_loader if val_loader is not None else train_loader).to(device)
    leaf_paths = _leaf_paths(model, leaf_modules)
    site_names = [s.name for s in find_sites(model, example, leaf_modules=leaf_paths)]
    exclude = set(exclude)
    if unknown := sorted(exclude - set(site_names)):
        raise ValueError(f"exclude names unknown site(s) {', '.join(unknown)}; valid: {', '.join(site_names)}")
    if select == "random" and seed is None and select_seed is None:
        raise ValueError("select='random' needs a seed or select_seed, so that a resumed run draws the same order")
    order = site_order(site_names, select, seed if select_seed is None else select_seed)
    evaluate = evaluate or (lambda net: training.accuracy(net, val_loader, device=device, progress=progress, desc="val"))

    def default_finetune(net, step, meter):
        training.fit(net, train_loader, epochs_per_step, lr=lr, weight_decay=weight_decay, meter=meter, amp=amp,
                     device=device, progress=progress, desc=f"step {step}")

    test = (lambda net: training.accuracy(net, test_loader, device=device, progress=progress, desc="test")) \
        if test_loader is not None else (lambda net: None)

    def scoring_pass(net: nn.Module):
        was_training = net.training
        net.train()  # the paper counts in train mode; buffers are restored by entropy_scores
        try:
            return entropy_scores(net, training.progress_bar(train_loader, progress, "score"), mode=mode,
                                  leaf_modules=leaf_paths)
        finally:
            net.train(was_training)

    # the options a resumed run must share with the run it resumes
    settings = {"max_drop": max_drop, "epochs_per_step": epochs_per_step, "layers_per_step": layers_per_step,
                "mode": mode, "scoring": scoring, "exclude": sorted(exclude), "seed": seed,
                "finetune": "default" if finetune is None else "user", "lr": lr, "weight_decay": weight_decay,
                # only where not the default, so that runs checkpointed before `select` existed still resume
                **({"select": select} if select != "entropy" else {}),
                **({"select_seed": select_seed} if select == "random" else {}),
                **({"runtime": runtime} if runtime != "eager" else {}), **({"plan": plan} if plan != "measure" else {}),
                **({"latency_target": latency_target} if latency_target is not None else {})}

    def measure(net: nn.Module) -> dict:  # the step's payoff: folded for the runtime, against the original
        return payoff.measure(net, model, example, runtime=runtime, leaf_modules=leaf_paths)

    def next_gains(net: nn.Module, scores: dict) -> list | None:  # measured before the checkpoint that resumes
        if select != "entropy_latency" or not (names := list(_candidates(scores, exclude))):
            return None
        return site_gains(net, names, (example,), runtime=runtime, leaf_modules=leaf_paths)

    loaders = (train_loader, val_loader, test_loader)
    run = _Run(checkpoint_dir, _fingerprint(model, site_names), settings, loaders) if checkpoint_dir is not None else None
    state = run.start(resume) if run else None
    if state is None:  # a fresh run: baseline accuracy and the first scores
        if seed is not None:
            _seed_everything(seed)
        baseline = float(evaluate(model))
        if baseline <= 1.0:
            warnings.warn(f"baseline accuracy is {baseline}: evaluate must return percent (0-100), as max_drop is in "
                          "accuracy points", stacklevel=2)
        state = {"baseline": baseline, "baseline_test": test(model), "linearized": [], "history": [], "done": False,
                 "stopped": "", "scores": dict(scores if scores is not None else scoring_pass(model))}
        current = linearize(model, [], example, plan="none", leaf_modules=leaf_paths)
        unpruned = measure(current)
        state["baseline_payoff"] = {"runtime": runtime, "device": str(device), "example_shape": list(example.shape),
                                    "latency_ms": unpruned["baseline_ms"], **payoff.counts(model, example),
                                    "latency_ratio": unpruned["latency_ratio"]}  # the unpruned network, folded
        state["payoff"] = unpruned
        state["gains"] = next_gains(current, state["scores"])
        if run:
            run.save(state, current, 0)
    else:  # a resumed run: the network, the loop state and every RNG as checkpointed
        current = _rebuild(model, state.get("recipe"), state["history"], example, leaf_paths)
        current.load_state_dict(state["state_dict"])
        _set_rng(state["rng"], loaders)

    result = PruneResult(model=current, linearized=list(state["linearized"]), history=[Step(**s) for s in state["history"]],
                         baseline_accuracy=state["baseline"], accuracy=state["baseline"], stopped=state["stopped"],
                         sites=site_names, max_drop=max_drop, mode=mode, baseline_test_accuracy=state["baseline_test"],
                         test_accuracy=state["baseline_test"], example_shape=tuple(example.shape), leaf_modules=leaf_paths,
                         settings=dict(settings), baseline_payoff=state.get("baseline_payoff"), payoff=state.get("payoff"))
    if accepted := [s for s in result.history if s.accepted]:
        result.accuracy, result.test_accuracy = accepted[-1].val_accuracy, accepted[-1].test_accuracy
    threshold = state["baseline"] - max_drop
    scores = state["scores"]
    if progress and not state["history"]:
        _print_row(None, result)
    saved = False  # whether the last state is checkpointed and reported
    while not state["done"]:
        saved = False
        if max_steps is not None and len(result.history) >= max_steps:
            state["stopped"] = f"reached max_steps={max_steps}"  # not done: a resume with more steps goes on
            break
        candidates = _candidates(scores, exclude)
        if not candidates:
            state.update(done=True, stopped="no site left to linearize")
            break
        started = time.perf_counter()
        step = len(result.history) + 1
        if select == "entropy_latency":  # choose; linearize, fine-tune (counting), evaluate
            gains = state.get("gains") or next_gains(current, scores)
            chosen = choose_by_latency(candidates, gains, layers_per_step)
        else:
            gains, chosen = None, choose(candidates, layers_per_step, order)
        net = linearize(current, chosen, example, plan=plan, runtime=runtime, leaf_modules=leaf_paths)
        remaining = len(scores) > len(chosen)
        meter = EntropyMeter(net, example_inputs=example, mode=mode, leaf_modules=leaf_paths) \
            if scoring == "ride_along" and remaining else None
        try:
            if finetune is None:
                default_finetune(net, step, meter)
            else:
                finetune(meter.model if meter is not None else net, step)
            new_scores = _meter_scores(meter) if meter is not None else (scoring_pass(net) if remaining else {})
        finally:
            if meter is not None:
                meter.close()
        val = float(evaluate(net))  # accept or stop; then checkpoint and report
        paid = measure(net)
        record = Step(step, chosen, {n: (e if e == e else None) for n, e in scores.items()}, val, val >= threshold,
                      time.perf_counter() - started, test(net), paid["latency_ratio"], paid["latency_ms"], paid["macs"],
                      paid["params"], gains)
        result.history.append(record)
        state["history"].append(dataclasses.asdict(record))
        if record.accepted:
            current, scores = net, dict(new_scores)
            result.model, result.accuracy, result.test_accuracy = net, val, record.test_accuracy
            result.linearized += chosen
            result.payoff = paid
            state.update(linearized=list(result.linearized), scores=scores, payoff=result.payoff)
            if latency_target is not None and paid["latency_ratio"] <= latency_target:
                state.update(done=True, stopped=_reached(paid["latency_ratio"], latency_target))
                result.stopped = state["stopped"]
            else:
                state["gains"] = next_gains(current, scores)
        else:
            state.update(done=True, stopped=f"validation accuracy {val:.2f} < {threshold:.2f} "
                                            f"(baseline {state['baseline']:.2f} - max_drop {max_drop})")
            result.stopped = state["stopped"]
        if progress:
            _print_row(record, result)
        if run:
            run.save(state, current, step)
        if on_step:
            on_step(result)
        saved = True
    if not saved:
        result.stopped = state["stopped"]
        if run:
            run.save(state, current, len(result.history))
        if on_step:
            on_step(result)
    return result


# ---- the loop's pieces

def _check_options(max_drop, epochs_per_step, layers_per_step, max_steps, mode, scoring, select, latency_target) -> None:
    if not (isinstance(max_drop, (int, float)) and 0 <= max_drop <= 100):
        raise ValueError(f"max_drop must be accuracy points in [0, 100], not {max_drop}")
    for name, value in (("epochs_per_step", epochs_per_step), ("layers_per_step", layers_per_step)):
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"{name} must be an integer >= 1, not {value}")
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


def _example(example_inputs, loader) -> torch.Tensor:
    """One input sample: `example_inputs`, else the first of the loader's first batch."""
    if example_inputs is not None:
        return example_inputs[0] if isinstance(example_inputs, (tuple, list)) else example_inputs
    batch = next(iter(loader), None)
    if batch is None:
        raise ValueError("the loader yielded no batches; check the dataset is not empty")
    (inputs,) = batch_inputs(batch, "cpu")
    return inputs[:1].clone()


def _leaf_paths(model: nn.Module, leaf_modules) -> list:
    """Leaf modules as module paths (types resolved), so that the recipe stays plain JSON."""
    if not leaf_modules:
        return []
    leaf_modules = list(leaf_modules)
    types = tuple(m for m in leaf_modules if isinstance(m, type))
    return [name for name, m in model.named_modules() if name and (name in leaf_modules or isinstance(m, types))]


def _rebuild(original: nn.Module, done: dict | None, steps: list, example: torch.Tensor, leaf_paths: list) -> fx.GraphModule:
    """The network as the run left it, from its recipe (sites, paddings, plans: nothing is
    measured again). Checkpoints written before they held a recipe are replayed step by step with
    every chain's padding moved, as those runs did."""
    example = example.to(model_device(original))
    if done is not None:
        return from_recipe(original, done, example, leaf_modules=leaf_paths)
    net = linearize(original, [], example, plan="none", leaf_modules=leaf_paths)
    for step in steps:
        if step["accepted"]:
            net = linearize(net, step["removed"], example, plan="merge", leaf_modules=leaf_paths)
    return net


def _print_row(step: Step | None, result: PruneResult) -> None:
    from tqdm.auto import tqdm

    from . import report

    if step is None:
        tqdm.write(report.step_header(result.to_dict()))
        tqdm.write(f"baseline: validation accuracy {result.baseline_accuracy:.2f}, {len(result.sites)} sites")
    else:
        tqdm.write(report.step_row(result.to_dict(), dataclasses.asdict(step)))


# ---- reproducibility

def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _generators(loaders) -> list:
    """The torch.Generators a loader draws its order from (when it was given its own)."""
    found = []
    for loader in loaders:
        for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
            generator = getattr(owner, "generator", None)
            if isinstance(generator, torch.Generator) and all(generator is not g for g in found):
                found.append(generator)
    return found


def _get_rng(loaders) -> dict:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "random": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "loaders": [g.get_state() for g in _generators(loaders)],
    }


def _set_rng(rng: dict, loaders) -> None:
    torch.set_rng_state(rng["torch"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    *internal, version, gauss = rng["random"]
    random.setstate((version, tuple(internal), gauss))
    generators = _generators(loaders)
    if len(generators) != len(rng["loaders"]):
        raise ValueError("the loaders have other generators than when the run was checkpointed; pass the same loaders")
    for generator, saved in zip(generators, rng["loaders"]):
        generator.set_state(saved)


# ---- checkpoints

def _fingerprint(model: nn.Module, site_names: list) -> str:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    text = json.dumps([type(model).__name__, site_names, shapes], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load(path) -> dict:
    return load_file(path, _FORMAT, "PruneResult.save or a checkpoint_dir")


class _Run:
    """A checkpoint folder: `step_NNN.pt` after every step (NNN = steps attempted so far)."""

    def __init__(self, folder, fingerprint: str, settings: dict, loaders: tuple):
        self.folder, self.fingerprint, self.settings, self.loaders = Path(folder), fingerprint, settings, loaders

    def checkpoints(self) -> list:
        found = [(int(m.group(1)), p) for p in self.folder.glob("step_*.pt") if (m := _CHECKPOINT.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def start(self, resume: bool) -> dict | None:
        """The state to resume from, or None for a fresh run (after checking the folder may be used)."""
        if self.folder.exists() and not self.folder.is_dir():
            raise ValueError(f"checkpoint_dir {self.folder} is a file; pass a folder")
        checkpoints = self.checkpoints() if self.folder.is_dir() else []
        for stale in self.folder.glob(".step_*.tmp") if self.folder.is_dir() else ():  # left by a killed write
            stale.unlink(missing_ok=True)
        if checkpoints and not resume:
            raise ValueError(f"{self.folder} already holds a run ({checkpoints[-1].name}); pass resume=True to continue "
                             "it, or choose another folder")
        if not checkpoints:
            return None
        saved = _load(checkpoints[-1])
        if saved["fingerprint"] != self.fingerprint:
            raise ValueError(f"{self.folder} holds a run of a different model; choose another folder, or pass the model "
                             "that run was started with")
        differs = {k: (v, self.settings.get(k)) for k, v in saved["settings"].items() if self.settings.get(k) != v}
        if differs:
            shown = ", ".join(f"{k}={old!r} (now {new!r})" for k, (old, new) in differs.items())
            raise ValueError(f"{self.folder} was started with {shown}; resume with the same options or choose another folder")
        return saved["state"]

    def save(self, state: dict, model: nn.Module, step: int) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
            return
        state = dict(state, state_dict=model.state_dict(), recipe=recipe(model), rng=_get_rng(self.loaders))
        saved = {"format": _FORMAT, "fingerprint": self.fingerprint, "settings": self.settings, "state": state}
        atomic_write(self.folder / f"step_{step:03d}.pt", lambda f: torch.save(saved, f))
