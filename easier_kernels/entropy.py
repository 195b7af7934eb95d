"""Layer entropies from streamed on/off counts: a scoring pass, and a meter that rides along training.

    scores = ek.entropy_scores(model, loader)          # site name -> layer entropy (bits), in order
    meter = ek.EntropyMeter(model, example_inputs=x)   # or: collect while your own loop trains
    train_one_epoch(meter.model, ...)                  # meter.model shares model's parameters
    scores = meter.scores()

Every site's activation becomes `ops.act_count`, which computes it and counts `x >= 0` per
channel in the same pass, so memory is O(channels) per site and nothing waits on the device
until scores are asked for. Under torch.distributed the counts are summed over ranks first, so
every rank gets the same scores.

With `energy=True` every probe also sums, in the same pass, the energy of what linearizing its
site would change and of the activation's output (`Scores.linearization_error`: E||act(x) - x||^2
/ E||act(x)||^2, how far the layer is from the identity it would become). It is plain torch
reductions beside the fused count (one more read of the activation), so it is off by default.

Token sites ([N, T, C], channels last: transformer MLPs) count every token position as a
sample; where the model takes an `attention_mask` (0 at padding), padded positions are not counted
(except at sites inside leaf modules, whose hooks see the activation's input alone).

Modes:
- "pooled" (the default): counts pooled over every batch, then one entropy per neuron. It does
  not depend on batch size, batch order or how data is sharded over ranks, and it is the
  entropy of the best estimate of each neuron's on-probability.
- "batch_mean": the reference code's number: the layer entropy of every batch, averaged over
  batches. Binary entropy is concave, so this is at most "pooled" and shrinks with small batches.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn

from . import distributed, ops, sites as sites_mod
from .activations import computed
from .capture import batch_inputs, buffers_kept, capture, model_device, to_device
from .ops import _FLOAT_DTYPES, kinds
from .sites import Site

__all__ = ["MODES", "Scores", "EntropyMeter", "entropy_scores", "binary_entropy", "layer_entropy"]

MODES = ("pooled", "batch_mean")


def binary_entropy(p: torch.Tensor) -> torch.Tensor:
    """H(p) = -p log2 p - (1-p) log2 (1-p) in bits, with 0 log 0 = 0."""
    q = 1 - p
    return -(torch.special.xlogy(p, p) + torch.special.xlogy(q, q)) / math.log(2)


def layer_entropy(counts: torch.Tensor, valid: torch.Tensor | int) -> torch.Tensor:
    """Mean neuron entropy (bits, float64 scalar) of a layer from its on-counts and the number of
    non-NaN elements per channel; channels that saw only NaNs are left out."""
    return torch.nanmean(binary_entropy(counts.double() / valid))


class Scores(Mapping):
    """Site name -> layer entropy in bits, in execution order.

    Also per site: `probabilities` (on-probability per channel, float64), `counts` (int64 on
    counts), `totals` (elements counted per channel), `nan_counts`; `energy` (site -> (sum of
    (act(x) - x)^2, sum of act(x)^2) when counted with energy=True, else empty); and `mode`, `batches`.
    """

    def __init__(self, mode: str, entropy: dict, counts: dict, nan_counts: dict, totals: dict, batches: int,
                 energy: dict | None = None):
        self.mode, self.batches = mode, batches
        self.entropy, self.counts, self.nan_counts, self.totals = entropy, counts, nan_counts, totals
        self.probabilities = {n: counts[n].double() / (totals[n] - nan_counts[n]) for n in counts}
        self.energy = dict(energy or {})

    def __getitem__(self, name: str) -> float:
        return self.entropy[name]

    def __iter__(self):
        return iter(self.entropy)

    def __len__(self) -> int:
        return len(self.entropy)

    def neuron_entropy(self, name: str) -> torch.Tensor:
        """Per-channel entropy (bits) of one site, from the pooled counts."""
        return binary_entropy(self.probabilities[name])

    def linearization_error(self, name: str) -> float:
        """E||act(x) - x||^2 / E||act(x)||^2 of one site (needs energy=True): 0 for a site that is the
        identity on everything it saw (a ReLU always on), inf where the activation output nothing
        but linearizing would (a ReLU always off), NaN where the activation is not one the kernels
        compute (its probe cannot evaluate it)."""
        if name not in self.energy:
            raise KeyError(f"no energy for site {name!r}: count with energy=True (EntropyMeter / entropy_scores)")
        changed, kept = self.energy[name]
        if changed != changed or kept != kept:
            return math.nan
        return changed / kept if kept > 0 else (0.0 if changed == 0 else math.inf)

    def ranking(self) -> list[str]:
        """Site names from the lowest entropy (first to linearize) to the highest; ties keep
        execution order."""
        return sorted(self.entropy, key=self.entropy.__getitem__)

    def to_dict(self) -> dict:
        """JSON-ready: mode, batches and per site its entropy, channels, totals and NaN count."""
        return {
            "mode": self.mode,
            "batches": self.batches,
            "sites": {
                n: {"entropy": self.entropy[n], "channels": int(self.counts[n].numel()), "elements_per_channel": self.totals[n],
                    "nan": int(self.nan_counts[n].sum()),
                    **({"linearization_error": self.linearization_error(n)} if n in self.energy else {})}
                for n in self.entropy
            },
        }

    def __repr__(self) -> str:
        width = max([len(n) for n in self.entropy] + [4])
        lines = [f"Scores(mode={self.mode!r}, batches={self.batches})", f"  {'site':<{width}}  entropy (bits)"]
        lines += [f"  {n:<{width}}  {h:.4f}" for n, h in self.entropy.items()]
        return "\n".join(lines)


class SiteProbe(nn.Module):
    """Stands at one site: computes the activation (when fused) and adds its counts.

    Its state is tensors updated in place, so that a compiled training step (torch.compile of
    `meter.model`) traces one graph and reuses it at every step: `counts`, `nan_counts` (int64
    [C]), `entropy_sum` (float64 [1]: batch_mean adds each call's layer entropy) and `tally`
    (int64 [2]: elements per channel and calls, added by compiled calls; eager calls add to the
    plain list `_eager_tally` instead, which costs no tensor op and no Module.__setattr__). No
    Python value that a compiled graph reads changes per call.

    The tensors are allocated at construction when the meter knows the channel count (from
    `example_inputs`, on the model's device), else at the first call, on the activation's device
    (under torch.compile: a second compilation, once). Where it allocates from an activation,
    the probe checks it once (dtype, channel dim); after that a call does the shape comparison
    below and the kernel, nothing else: a channel count other than the allocated one is an
    error naming the site. `meter.model.to(device)` moves the tensors. Nothing here synchronizes
    the device; `totals()` does. They are plain attributes, not buffers: they stay out of
    state_dict and out of DDP's buffer broadcasts.
    """

    def __init__(self, site: Site, mode: str, fused: bool, channels: int | None = None, device=None,
                 energy: bool = False):
        super().__init__()
        self.site, self.mode, self.fused = site, mode, fused
        # with energy: the activation the probe evaluates itself (None: one the kernels do not compute)
        self.energy_kind = kinds.resolve(site.kind, site.kind_args) if energy and computed(site.kind) else None
        self.measures_energy = energy
        # the activation (when paused); a kind the kernels do not compute has an unfused probe
        self.kernel_kind, self.param = kinds.resolve(site.kind, site.kind_args) if fused else ("identity", 0.0)
        # what the counting call computes: unfused probes count only (their call's activation runs after them)
        self.count_kind, self.count_param = (self.kernel_kind, self.param) if fused else ("identity", 0.0)
        self.channel_dim, self.pooled = site.channel_dim, mode == "pooled"
        self.counting = True
        self.counts = self.nan_counts = self.entropy_sum = self.tally = self.energy = None
        self.channels = -1  # what the tensors are sized for; -1 before they exist
        if channels is not None:
            self._allocate(channels, torch.device("cpu" if device is None else device))
        self.reset()

    def _allocate(self, channels: int, device: torch.device) -> None:
        self.counts = torch.zeros(channels, dtype=torch.int64, device=device)
        self.nan_counts = torch.zeros(channels, dtype=torch.int64, device=device)
        self.entropy_sum = torch.zeros(1, dtype=torch.float64, device=device)  # not 0-d: dynamo would trace a float
        self.tally = torch.zeros(2, dtype=torch.int64, device=device)
        # [sum (act(x) - x)^2, sum act(x)^2]; NaN where the probe cannot evaluate the activation
        self.energy = torch.full((2,), 0.0 if self.energy_kind else math.nan, dtype=torch.float64, device=device)
        self.channels = channels

    def _apply(self, fn, recurse=True):
        """module.to(device) / .cuda() move the count tensors too (their dtypes stay)."""
        super()._apply(fn, recurse)
        if self.counts is not None:
            self.counts, self.nan_counts, self.entropy_sum, self.tally, self.energy = (
                fn(t).to(t.dtype) for t in (self.counts, self.nan_counts, self.entropy_sum, self.tally, self.energy))
        return self

    def reset(self) -> None:
        """Zeroes the counts in place: the same tensors, so a compiled step stays valid."""
        if self.counts is not None:
            for t in (self.counts, self.nan_counts, self.entropy_sum, self.tally):
                t.zero_()
            if self.energy_kind:
                self.energy.zero_()
        self._eager_tally = [0, 0]  # [elements per channel, calls], mutated in place

    def totals(self) -> tuple[int, int]:
        """(elements counted per channel, calls) since the last reset; synchronizes the device."""
        if self.counts is None:
            return 0, 0
        elements, calls = self.tally.tolist()
        return self._eager_tally[0] + elements, self._eager_tally[1] + calls

    def _allocate_for(self, x: torch.Tensor, channels: int) -> None:
        """At the first call: x checked, the tensors allocated for it. After that: x's channel
        count is not the allocated one, an error. (Traceable: under torch.compile it runs while
        tracing.)"""
        name = self.site.name
        if self.counts is not None:
            raise ValueError(
                f"site {name}: the activation has {channels} channels (dim {self.channel_dim} of shape "
                f"{tuple(x.shape)}) but the meter counts {self.channels}; a site's channel count cannot change "
                "while it is metered: make a new EntropyMeter for the changed model or input")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"site {name}: the activation is {x.dtype}; only float32/float16/bfloat16/float64 "
                            "activations can be counted")
        self._allocate(channels, x.device)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The activation of x (fused probes; else x), its counts added. `mask` ([N, T], 0 at
        padding; the model's attention_mask, for token sites): only the positions it keeps count."""
        if not self.counting:
            return kinds.forward(x, self.kernel_kind, self.param) if self.fused else x
        if mask is not None and _masks_tokens(x, mask, self.channel_dim):
            counted = x[mask.bool()]  # [tokens kept, C]: selected first, a fused in-place call overwrites x
            y = kinds.forward(x, self.kernel_kind, self.param) if self.fused else x
            if counted.shape[0]:  # (a batch of padding only counts nothing, not a 0/0 batch entropy)
                self._count(counted, "identity", 0.0)
            return y
        return self._count(x, self.count_kind, self.count_param)

    def _count(self, x: torch.Tensor, kind: str, param: float) -> torch.Tensor:
        try:
            channels = x.shape[self.channel_dim]
        except IndexError:
            raise ValueError(f"site {self.site.name}: channel_dim={self.channel_dim} is out of range for an activation "
                             f"of shape {tuple(x.shape)}") from None
        if channels != self.channels:
            self._allocate_for(x, channels)
        per_channel = x.numel() // channels if channels else 0
        if self.energy_kind:  # before the count: a fused in-place call overwrites x
            self._add_energy(x)
        if self.pooled:
            y = ops.act_count_resolved(x, self.counts, self.nan_counts, kind, self.channel_dim, param)
        else:
            counts, nans = torch.zeros_like(self.counts), torch.zeros_like(self.nan_counts)
            y = ops.act_count_resolved(x, counts, nans, kind, self.channel_dim, param)
            self.entropy_sum.add_(layer_entropy(counts, per_channel - nans))
            self.counts.add_(counts)
            self.nan_counts.add_(nans)
        if torch.compiler.is_compiling():  # a Python int would be a constant of the graph
            self.tally[0].add_(per_channel)
            self.tally[1].add_(1)
        else:
            tally = self._eager_tally
            tally[0] += per_channel
            tally[1] += 1
        return y

    def _add_energy(self, x: torch.Tensor) -> None:
        act = kinds.forward(x, *self.energy_kind).double()
        self.energy.add_(torch.stack([torch.nansum((act - x.double()).square()), torch.nansum(act.square())]))


def _masks_tokens(x: torch.Tensor, mask: torch.Tensor, channel_dim: int) -> bool:
    """Whether `mask` marks x's token positions: x [N, T, C] with channels last, mask [N, T]."""
    return x.dim() == mask.dim() + 1 and channel_dim in (-1, x.dim() - 1) and tuple(x.shape[:-1]) == tuple(mask.shape)


class EntropyMeter:
    """Collects every site's on/off counts while the model trains or runs, at the cost of one
    fused kernel per activation.

        meter = ek.EntropyMeter(model, example_inputs=x0)  # mode="pooled"|"batch_mean", sites=[names]
        opt = torch.optim.SGD(model.parameters())          # meter.model shares these parameters
        for x, y in loader:
            loss = F.cross_entropy(meter.model(x), y); ...
        scores = meter.scores()                            # collective under torch.distributed
        meter.reset()                                      # start counting afresh
        with meter.paused(): ...                           # ordinary activations, nothing counted

    `meter.model` is a GraphModule over the model's own submodules: training it trains `model`,
    and wrapping it in DistributedDataParallel works as for `model`. `close()` removes the hooks
    of sites inside leaf modules (the only change made to `model` itself).

    example_inputs (a tensor, a tuple of positional inputs or a dict of keyword inputs, any batch
    size; needed where torch.fx cannot trace the model): the model runs on two samples of them
    (`capture.few_samples`), without gradients, state changes or random numbers drawn, and every
    site's counts are allocated from the channel counts found there, on the model's device. Then
    `torch.compile(meter.model)` compiles the training step exactly once, kept across steps and
    reset() (pausing adds one graph). Without them a site's counts are allocated at its first
    call: under torch.compile that is one extra compilation at the first step, then none.
    A site whose channel count differs from the one allocated is an error naming it. Make the
    meter after moving the model to its device, or move `meter.model` (the counts move with it).
    energy=True: each site's linearization error too (see the module's docstring).
    """

    def __init__(self, model: nn.Module, *, example_inputs=None, mode: str = "pooled",
                 sites: Iterable[str] | None = None, leaf_modules: Iterable | None = None,
                 activations: Mapping | None = None, energy: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        device = model_device(model)
        example = to_device(example_inputs, device) if example_inputs is not None else None
        self.model = capture(model, example, leaf_modules=leaf_modules, activations=activations)
        found = (sites_mod.measured_sites(self.model, example, require=True) if example is not None
                 else sites_mod.sites_of(self.model, require=True))
        self.sites = sites_mod.select(found, sites)
        self.probes: dict[str, SiteProbe] = {}

        def make_probe(site: Site, fused: bool) -> SiteProbe:
            self.probes[site.name] = SiteProbe(site, mode, fused, site.channels, device, energy)
            return self.probes[site.name]

        self._handles = sites_mod.instrument(self.model, self.sites, make_probe, masked=True)

    def reset(self) -> None:
        for probe in self.probes.values():
            probe.reset()

    @contextmanager
    def paused(self):
        """Runs the plain activations inside the block: nothing is counted."""
        previous = [(p, p.counting) for p in self.probes.values()]
        for probe, _ in previous:
            probe.counting = False
        try:
            yield self
        finally:
            for probe, counting in previous:
                probe.counting = counting

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _local_counts(probes: list, group) -> tuple:
        """(channels per site, on and NaN counts of every site concatenated, [elements, calls] per
        site, entropy sums) counted here, in one device sync. A site not reached here counts zeros,
        sized under torch.distributed as the ranks that reached it, so every rank joins the same sums."""
        sizes = [max(p.channels, 0) for p in probes]
        device = next((p.counts.device for p in probes if p.counts is not None), None)
        if distributed.active():
            device = device or distributed.collective_device()
            agreed = torch.tensor(sizes, device=device)  # (every rank joins, whether or not it lacks a site)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=group)
            sizes = agreed.tolist()
        device = device or torch.device("cpu")

        def own(probe, name, shape, dtype):
            value = getattr(probe, name)
            return value if value is not None else torch.zeros(shape, dtype=dtype, device=device)

        tallies = torch.stack([own(p, "tally", 2, torch.int64) for p in probes]).tolist()
        local = [[p._eager_tally[0] + e, p._eager_tally[1] + c] for p, (e, c) in zip(probes, tallies)]
        counts = torch.cat([own(p, "counts", n, torch.int64) for p, n in zip(probes, sizes)]
                           + [own(p, "nan_counts", n, torch.int64) for p, n in zip(probes, sizes)])
        # the entropy sums, then each site's energy pair: one float64 tensor, one all-reduce
        sums = torch.cat([own(p, "entropy_sum", 1, torch.float64) for p in probes]
                         + [own(p, "energy", 2, torch.float64) for p in probes])
        return sizes, counts, torch.tensor(local, dtype=torch.int64, device=device), sums

    def scores(self, group=None) -> Scores:
        """Entropies from everything counted since the last reset. When torch.distributed is
        initialized, every rank must call this (counts are summed over `group`)."""
        probes = list(self.probes.values())
        sizes, counts, per_site, sums = self._local_counts(probes, group)
        if distributed.active():
            for t in (counts, per_site, sums):
                dist.all_reduce(t, group=group)
        # decided after the sums: a site one rank never reached is not an error where another counted it
        if missing := [p.site.name for p, (_, calls) in zip(probes, per_site.tolist()) if calls == 0]:
            raise RuntimeError(
                f"no counts for site(s) {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}: run batches "
                "through meter.model (not the original model) before asking for scores"
            )
        on, nans = counts.cpu().split([sum(sizes)] * 2)
        on, nans = on.split(sizes), nans.split(sizes)
        per_site, sums = per_site.cpu().tolist(), sums.cpu().tolist()
        entropy_sums, energy = sums[:len(probes)], sums[len(probes):]
        names = [p.site.name for p in probes]
        totals = {n: per_site[i][0] for i, n in enumerate(names)}
        if self.mode == "pooled":
            entropy = {n: float(layer_entropy(on[i], totals[n] - nans[i])) for i, n in enumerate(names)}
        else:
            entropy = {n: entropy_sums[i] / per_site[i][1] for i, n in enumerate(names)}
        batches = max(calls for _, calls in per_site)
        nan_sites = {n: int(nans[i].sum()) for i, n in enumerate(names) if nans[i].any()}
        if nan_sites:
            shown = ", ".join(f"{n} ({k} NaN)" for n, k in list(nan_sites.items())[:5])
            warnings.warn(f"NaN activations at {len(nan_sites)} site(s): {shown}; they are neither on nor off and are left "
                          "out of the on-probabilities (Scores.nan_counts has them per channel)", stacklevel=2)
        energy = {n: tuple(energy[2 * i:2 * i + 2]) for i, (n, p) in enumerate(zip(names, probes)) if p.measures_energy}
        return Scores(self.mode, entropy, dict(zip(names, on)), dict(zip(names, nans)), totals, batches, energy)


def entropy_scores(model: nn.Module, loader: Iterable, *, mode: str = "pooled", sites: Iterable[str] | None = None,
                   max_batches: int | None = None, device=None, leaf_modules: Iterable | None = None,
                   activations: Mapping | None = None, inputs_fn=None, energy: bool = False) -> Scores:
    """Streams `loader` through `model` and returns every site's layer entropy (bits).

    The model runs in the mode it is in (the paper scores in train mode, with augmentation),
    without gradients; its buffers, flags and parameters are as before afterwards. Batches are
    tensors, (inputs, targets) tuples or dicts of keyword inputs (labels dropped), or whatever
    `inputs_fn(batch) -> (args, kwargs)` reads; inputs go to `device` (default: the model's).
    The first batch is the example the model is captured with. `energy`: also each site's
    linearization error (`Scores.linearization_error`), in the same pass.
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches or None, not {max_batches}")
    device = _model_device(model, device)
    meter, batches = None, 0
    try:
        with torch.no_grad(), buffers_kept(model):
            for batch in loader:
                if max_batches is not None and batches >= max_batches:
                    break
                args, kwargs = batch_inputs(batch, device, inputs_fn)
                if meter is None:
                    meter = EntropyMeter(model, example_inputs=(args, kwargs), mode=mode, sites=sites,
                                         leaf_modules=leaf_modules, activations=activations, energy=energy)
                meter.model(*args, **kwargs)
                batches += 1
    finally:
        if meter is not None:
            meter.close()
    if batches == 0:
        raise ValueError("entropy_scores: the loader yielded no batches; check the dataset is not empty")
    return meter.scores()


def _model_device(model: nn.Module, device) -> torch.device:
    """`device`, checked against the model's; the model's own when None. A model without tensors runs anywhere."""
    own = model_device(model)
    if device is None:
        return own
    device = torch.device(device)
    has_tensors = next(iter([*model.parameters(), *model.buffers()]), None) is not None
    if has_tensors and own.type != device.type:
        raise ValueError(f"the model is on {own} but device={device}; move it first with model.to('{device}')")
    return device
