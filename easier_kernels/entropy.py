"""Layer entropies from streamed on/off counts: a scoring pass, and a meter that rides along training.

    scores = ek.entropy_scores(model, loader)          # site name -> layer entropy (bits), in order
    meter = ek.EntropyMeter(model)                     # or: collect while your own loop trains
    train_one_epoch(meter.model, ...)                  # meter.model shares model's parameters
    scores = meter.scores()

Every site's activation becomes `ops.act_count`, which computes it and counts `x >= 0` per
channel in the same pass, so memory is O(channels) per site and nothing waits on the device
until scores are asked for. Under torch.distributed the counts are summed over ranks first, so
every rank gets the same scores.

Modes:
- "pooled" (the default): counts pooled over every batch, then one entropy per neuron. It does
  not depend on batch size, batch order or how data is sharded over ranks, and it is the
  entropy of the best estimate of each neuron's on-probability.
- "batch_mean": the reference code's number: the layer entropy of every batch, averaged over
  batches. Binary entropy is concave, so this is at most "pooled" and shrinks with small batches.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Iterable

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import ops, sites as sites_mod
from .ops import kinds
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
    counts), `totals` (elements counted per channel), `nan_counts`; and `mode`, `batches`.
    """

    def __init__(self, mode: str, entropy: dict, counts: dict, nan_counts: dict, totals: dict, batches: int):
        self.mode, self.batches = mode, batches
        self.entropy, self.counts, self.nan_counts, self.totals = entropy, counts, nan_counts, totals
        self.probabilities = {n: counts[n].double() / (totals[n] - nan_counts[n]) for n in counts}

    def __getitem__(self, name: str) -> float:
        return self.entropy[name]

    def __iter__(self):
        return iter(self.entropy)

    def __len__(self) -> int:
        return len(self.entropy)

    def neuron_entropy(self, name: str) -> torch.Tensor:
        """Per-channel entropy (bits) of one site, from the pooled counts."""
        return binary_entropy(self.probabilities[name])

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
                    "nan": int(self.nan_counts[n].sum())}
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

    Its state is tensors updated in place on the activation's device, so that a compiled
    training step (torch.compile of `meter.model`) traces one graph and reuses it at every step:
    `counts`, `nan_counts` (int64 [C]), `entropy_sum` (float64 [1]: batch_mean adds each call's
    layer entropy) and `tally` (int64 [2]: elements per channel and calls, added by compiled
    calls; eager calls add the plain ints `_elements` and `_calls` instead, which costs no tensor
    op). Python values that a compiled graph would bake in never change per call.

    The tensors are allocated at construction when the meter read the channel count from the
    graph (`channels`, checked at every call), else at the first call (under torch.compile: a
    second compilation, once), and follow the activations to another device. Nothing here
    synchronizes the device; `totals()` does, when scores are asked. They are plain attributes,
    not buffers: they stay out of state_dict and out of DDP's buffer broadcasts.
    """

    def __init__(self, site: Site, mode: str, fused: bool, channels: int | None = None, device=None):
        super().__init__()
        self.site, self.mode, self.fused = site, mode, fused
        self.kernel_kind, self.param = kinds.resolve(site.kind, site.kind_args)
        # unfused probes count only; their call's own activation runs after them
        self.count_kind, self.count_args = (site.kind, site.kind_args) if fused else ("identity", {})
        self.channel_dim, self.pooled = site.channel_dim, mode == "pooled"
        self.counting = True
        self.counts = self.nan_counts = self.entropy_sum = self.tally = None
        self._channels, self._device = -1, None  # what the tensors are sized and placed for
        if channels is not None:
            self._allocate(channels, torch.device("cpu" if device is None else device))
        self.reset()

    def _allocate(self, channels: int, device: torch.device) -> None:
        self.counts = torch.zeros(channels, dtype=torch.int64, device=device)
        self.nan_counts = torch.zeros(channels, dtype=torch.int64, device=device)
        self.entropy_sum = torch.zeros(1, dtype=torch.float64, device=device)  # not 0-d: dynamo would trace a float
        self.tally = torch.zeros(2, dtype=torch.int64, device=device)
        self._channels, self._device = channels, device

    def reset(self) -> None:
        """Zeroes the counts in place: the same tensors, so a compiled step stays valid."""
        if self.counts is not None:
            for t in (self.counts, self.nan_counts, self.entropy_sum, self.tally):
                t.zero_()
        self._elements = self._calls = 0

    def totals(self) -> tuple[int, int]:
        """(elements counted per channel, calls) since the last reset; synchronizes the device."""
        if self.counts is None:
            return 0, 0
        elements, calls = self.tally.tolist()
        return self._elements + elements, self._calls + calls

    def _fit(self, x: torch.Tensor, channels: int) -> None:
        """Tensors sized and placed for x: allocated at the first call when the channel count
        was not known, moved when the activations moved (both traceable), resized when the
        meter's reading of the graph was wrong."""
        if self.counts is None:
            self._allocate(channels, x.device)
            return
        if x.device != self._device:
            self.counts, self.nan_counts, self.entropy_sum, self.tally = (
                t.to(x.device) for t in (self.counts, self.nan_counts, self.entropy_sum, self.tally))
            self._device = x.device
        if channels != self._channels:
            self._resize(channels)

    @torch.compiler.disable  # it reads the calls back from the device (a graph break, where it ever runs compiled)
    def _resize(self, channels: int) -> None:
        if self.totals()[1] == 0:  # else act_count reports that the channel count changed
            self._allocate(channels, self._device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.counting:
            return kinds.forward(x, self.kernel_kind, self.param) if self.fused else x
        cdim = self.channel_dim
        try:
            channels = x.shape[cdim]
        except IndexError:
            raise ValueError(f"site {self.site.name}: channel_dim={cdim} is out of range for an activation of shape "
                             f"{tuple(x.shape)}") from None
        if channels != self._channels or x.device != self._device:
            self._fit(x, channels)
        per_channel = x.numel() // max(channels, 1)
        if self.pooled:
            y = ops.act_count(x, self.counts, self.count_kind, cdim, nan_counts=self.nan_counts, **self.count_args)
        else:
            counts, nans = torch.zeros_like(self.counts), torch.zeros_like(self.nan_counts)
            y = ops.act_count(x, counts, self.count_kind, cdim, nan_counts=nans, **self.count_args)
            self.entropy_sum.add_(layer_entropy(counts, per_channel - nans))
            self.counts.add_(counts)
            self.nan_counts.add_(nans)
        if torch.compiler.is_compiling():  # a Python int would be a constant of the graph
            self.tally[0].add_(per_channel)
            self.tally[1].add_(1)
        else:
            self._elements += per_channel
            self._calls += 1
        return y


class EntropyMeter:
    """Collects every site's on/off counts while the model trains or runs, at the cost of one
    fused kernel per activation.

        meter = ek.EntropyMeter(model)               # mode="pooled"|"batch_mean", sites=[names]
        opt = torch.optim.SGD(model.parameters())    # meter.model shares these parameters
        for x, y in loader:
            loss = F.cross_entropy(meter.model(x), y); ...
        scores = meter.scores()                      # collective under torch.distributed
        meter.reset()                                # start counting afresh
        with meter.paused(): ...                     # ordinary activations, nothing counted

    `meter.model` is a GraphModule over the model's own submodules: training it trains `model`,
    and wrapping it in DistributedDataParallel works as for `model`. `close()` removes the hooks
    of sites inside leaf modules (the only change made to `model` itself). `torch.compile(meter.model)`
    compiles one graph for the training step, kept across steps and reset() (pausing adds one).
    """

    def __init__(self, model: nn.Module, *, mode: str = "pooled", sites: Iterable[str] | None = None,
                 leaf_modules: Iterable | None = None):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode = mode
        self.model = sites_mod.trace(model, leaf_modules)
        self.sites = sites_mod.select(sites_mod.sites_of(self.model, require=True), sites)
        self.probes: dict[str, SiteProbe] = {}
        channels, device = _site_channels(self.model, self.sites), model_device(model)

        def make_probe(site: Site, fused: bool) -> SiteProbe:
            self.probes[site.name] = SiteProbe(site, mode, fused, channels.get(site.name), device)
            return self.probes[site.name]

        self._handles = sites_mod.instrument(self.model, self.sites, make_probe)

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

    def scores(self, group=None) -> Scores:
        """Entropies from everything counted since the last reset. When torch.distributed is
        initialized, every rank must call this (counts are summed over `group`)."""
        probes = list(self.probes.values())
        missing = [p.site.name for p in probes if p.counts is None]
        if not missing:  # (elements, calls) per site, in one device sync
            tallies = torch.stack([p.tally for p in probes]).tolist()
            local = [[p._elements + e, p._calls + c] for p, (e, c) in zip(probes, tallies)]
            missing = [p.site.name for p, (_, calls) in zip(probes, local) if calls == 0]
        if missing:
            raise RuntimeError(
                f"no counts for site(s) {', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}: run batches "
                "through meter.model (not the original model) before asking for scores"
            )
        counts = torch.cat([p.counts for p in probes] + [p.nan_counts for p in probes])
        device = counts.device
        per_site = torch.tensor(local, dtype=torch.int64, device=device)
        entropy_sums = torch.cat([p.entropy_sum for p in probes])
        if dist.is_available() and dist.is_initialized():
            for t in (counts, per_site, entropy_sums):
                dist.all_reduce(t, group=group)
        sizes = [p.counts.numel() for p in probes]
        on, nans = counts.cpu().split([sum(sizes)] * 2)
        on, nans = on.split(sizes), nans.split(sizes)
        per_site, entropy_sums = per_site.cpu().tolist(), entropy_sums.cpu().tolist()
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
        return Scores(self.mode, entropy, dict(zip(names, on)), dict(zip(names, nans)), totals, batches)


def _out_channels(module: nn.Module) -> int | None:
    """How many channels a layer's output has, where its type says."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    if isinstance(module, nn.modules.batchnorm._NormBase):
        return module.num_features
    if isinstance(module, nn.GroupNorm):
        return module.num_channels
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape):
        return module.normalized_shape[-1]
    if isinstance(module, nn.Embedding):
        return module.embedding_dim
    return None


_WEIGHTED_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, F.linear}  # out channels: the weight's first dim
# between a layer and its activation, what keeps the channel count (anything else ends the walk)
_KEEPING_MODULES = (nn.Identity, nn.modules.dropout._DropoutNd, nn.modules.pooling._AvgPoolNd,
                    nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                    nn.modules.pooling._AdaptiveMaxPoolNd, nn.Sigmoid, nn.Tanh, nn.Hardsigmoid,
                    *sites_mod.ACTIVATION_MODULES)
_KEEPING_FUNCTIONS = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.iadd, operator.isub,
    operator.imul, torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.sigmoid, torch.tanh, F.dropout,
    F.hardsigmoid, F.batch_norm, F.group_norm, F.instance_norm, F.layer_norm, F.max_pool1d, F.max_pool2d,
    F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d, sites_mod.linearized, *sites_mod.ACTIVATION_FUNCTIONS,
}
_KEEPING_METHODS = {"add", "sub", "mul", "div", "add_", "sub_", "mul_", "div_", "neg", "contiguous", "clone",
                    "float", "half", "bfloat16", "double", "to", "type_as", "sigmoid", "tanh",
                    *sites_mod.ACTIVATION_METHODS}


def _site_channels(gm: fx.GraphModule, sites: Iterable[Site]) -> dict:
    """Site name -> its channel count, where the graph tells it without running the model: the
    layer that produces the activation's input, through ops that keep the channel count (for a
    site inside a leaf module, the module registered just before it). The probes' counts then
    exist before the first call, and a compiled step does not trace their allocation. The probe
    checks the number at every call."""
    nodes = {n.meta["ek_site"]: n for n in gm.graph.nodes if "ek_site" in n.meta}
    found = {}
    for site in sites:
        if site.in_leaf:
            parent_path, _, child = site.module.rpartition(".")
            previous = None
            for name, module in gm.get_submodule(parent_path).named_children():
                if name == child:
                    break
                previous = module
            channels = _out_channels(previous) if previous is not None else None
        else:
            channels = _channels_before(gm, nodes[site.name].args[0])
        if channels is not None:
            found[site.name] = channels
    return found


def _channels_before(gm: fx.GraphModule, node) -> int | None:
    for _ in range(64):
        if not isinstance(node, fx.Node):
            return None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            channels = _out_channels(module)
            if channels is not None or not isinstance(module, _KEEPING_MODULES):
                return channels
        elif node.op == "call_function" and node.target in _WEIGHTED_FUNCTIONS:
            weight = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
            if not (isinstance(weight, fx.Node) and weight.op == "get_attr"):
                return None
            try:
                return gm.get_parameter(weight.target).shape[0]
            except AttributeError:
                return None
        elif not ((node.op == "call_function" and node.target in _KEEPING_FUNCTIONS)
                  or (node.op == "call_method" and node.target in _KEEPING_METHODS)):
            return None
        inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
        if not inputs:
            return None
        node = inputs[0]
    return None


@contextmanager
def _buffers_kept(model: nn.Module):
    """Buffers (batch-norm running statistics, ...) exactly as they were after the block."""
    saved = [(b, b.clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def batch_inputs(batch, device) -> tuple:
    """A loader batch -> the model's positional inputs: a tensor, or (inputs, targets, ...)."""
    if isinstance(batch, torch.Tensor):
        inputs = batch
    elif isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        inputs = batch[0]
    else:
        raise TypeError(f"a batch must be a tensor or an (inputs, targets) tuple, got {type(batch).__name__}")
    if not inputs.is_floating_point():
        raise TypeError(f"batch inputs are {inputs.dtype}; make the loader yield float tensors (e.g. images.float() / 255)")
    return (inputs.to(device, non_blocking=True),)


def entropy_scores(model: nn.Module, loader: Iterable, *, mode: str = "pooled", sites: Iterable[str] | None = None,
                   max_batches: int | None = None, device=None, leaf_modules: Iterable | None = None) -> Scores:
    """Streams `loader` through `model` and returns every site's layer entropy (bits).

    The model runs in the mode it is in (the paper scores in train mode, with augmentation),
    without gradients; its buffers, flags and parameters are as before afterwards. Batches are
    tensors or (inputs, targets) tuples; inputs go to `device` (default: the model's).
    """
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be a positive number of batches or None, not {max_batches}")
    device = _model_device(model, device)
    meter = EntropyMeter(model, mode=mode, sites=sites, leaf_modules=leaf_modules)
    batches = 0
    try:
        with torch.no_grad(), _buffers_kept(model):
            for batch in loader:
                if max_batches is not None and batches >= max_batches:
                    break
                meter.model(*batch_inputs(batch, device))
                batches += 1
    finally:
        meter.close()
    if batches == 0:
        raise ValueError("entropy_scores: the loader yielded no batches; check the dataset is not empty")
    return meter.scores()


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (else buffers) live; CPU for a model without either."""
    tensor = next(iter([*model.parameters(), *model.buffers()]), None)
    return tensor.device if tensor is not None else torch.device("cpu")


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
