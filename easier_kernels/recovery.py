"""Recovery: what the fine-tuning after a linearization may add to plain training, so that each
removed layer costs less accuracy (DESIGN.md, "Beyond the paper: recovery").

    teacher = ek.recovery.Distillation(trained_model, weight=0.5, temperature=4.0)
    ek.train.fit(net, loader, 1, recovery=[teacher])    # the loss of every batch mixed with the teacher's
    ek.prune(model, train, val, distill=0.5)            # the loop's teacher: the unpruned network

    from easier_kernels.linearize import anneal, settle
    sites = anneal(net, before, names)                  # net = ek.linearize(before, names, ...)
    ek.train.fit(net, loader, 1, recovery=[Anneal(sites, fraction=0.5)]); settle(net)
    ek.prune(model, train, val, anneal=0.5)             # each step's sites annealed over half its batches

`train.fit` calls each recovery term around every training batch: `term.before_batch(index,
total)` (index counts the batches of the whole fit from 0; total = epochs x batches per epoch, None
for a loader without a length) before the forward, and `term.loss(task_loss, output, args, kwargs)`
after it, which returns the loss to minimize in place of `task_loss` (terms applied in order,
inside autocast). A term may have either.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import logits_of
from .entropy import binary_entropy

__all__ = ["Distillation", "Anneal", "EntropyPenalty", "SoftOn", "soft_on_probability", "surrogate", "SIDES",
           "check_distillation", "check_anneal", "check_entropy_weight", "distillation_loss"]

SIDES = ("on", "both")


def check_distillation(weight, temperature) -> None:
    """`weight` in (0, 1] (the teacher's share of the loss) and `temperature` finite > 0; a ValueError
    whose message starts with the option's name."""
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 < weight <= 1):
        raise ValueError(f"distill must be the teacher's share of the loss in (0, 1], not {weight}")
    if isinstance(temperature, bool) or not (isinstance(temperature, (int, float)) and 0 < temperature < math.inf):
        raise ValueError(f"distill_temperature must be a finite number > 0, not {temperature}")


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton et al.'s soft-target term: T^2 KL(softmax(teacher / T) || softmax(student / T)), the mean
    over predictions (every row of the last dim: one per sample, or per token). T^2 keeps its gradient
    on the scale of the task loss's as T changes. In float32 whatever autocast computed the logits in."""
    classes = student.shape[-1]
    log_student = F.log_softmax(student.float().reshape(-1, classes) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher.float().reshape(-1, classes) / temperature, dim=-1)
    return F.kl_div(log_student, log_teacher, log_target=True, reduction="batchmean") * temperature ** 2


class Distillation:
    """Knowledge distillation from a frozen teacher: the loss of a batch becomes
    `(1 - weight) * task_loss + weight * distillation_loss(student, teacher, temperature)`, the
    teacher run on the same (augmented) inputs in eval mode without gradients. The teacher is a copy
    of `teacher` taken now (later changes to the module given do not reach it); its outputs are
    read as `capture.logits_of` reads them (a tensor, `.logits`, a dict's "logits")."""

    def __init__(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0):
        check_distillation(weight, temperature)
        self.teacher = copy.deepcopy(teacher).eval().requires_grad_(False)
        self.weight, self.temperature = weight, temperature

    def loss(self, task_loss: torch.Tensor, output, args: tuple, kwargs: dict) -> torch.Tensor:
        with torch.no_grad():
            target = logits_of(self.teacher(*args, **kwargs))
        soft = distillation_loss(logits_of(output), target, self.temperature)
        return (1 - self.weight) * task_loss + self.weight * soft


def check_anneal(fraction) -> None:
    if isinstance(fraction, bool) or not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
        raise ValueError(f"anneal must be the fraction of a step's batches to anneal over, in (0, 1], not {fraction}")


class Anneal:
    """Gradual linearization (Layer Folding moves activations to linear gradually): the `Annealed`
    sites' t goes from 0 (the activation) to 1 (the identity) over the first `fraction` of the
    fit's batches, t = index / n at batch `index` (n = that many batches), 1 from batch n on."""

    def __init__(self, sites, fraction: float):
        check_anneal(fraction)
        self.sites, self.fraction = list(sites), fraction

    def before_batch(self, index: int, total: int | None) -> None:
        if total is None:
            raise ValueError("anneal needs a training loader with a length (its schedule is a fraction of the batches)")
        span = max(1, round(self.fraction * total))
        for site in self.sites:
            site.t.fill_(min(1.0, index / span))


# ---- entropy in the loss: the next sites in line pushed towards the identity before they go


def check_entropy_weight(weight, side) -> None:
    if isinstance(weight, bool) or not (isinstance(weight, (int, float)) and 0 < weight < math.inf):
        raise ValueError(f"entropy_weight must be a finite number > 0, not {weight}")
    if side not in SIDES:
        raise ValueError(f"entropy_side must be one of {', '.join(SIDES)}, not {side!r}")


def soft_on_probability(x: torch.Tensor, channel_dim: int, temperature: float = 0.1) -> torch.Tensor:
    """Per channel, the mean of sigmoid(x / (temperature * rms)), rms the channel's root mean square
    (no gradient): a differentiable on-fraction (the hard one counts x >= 0), scale-free, which
    tends to the hard fraction as the temperature goes to 0."""
    dims = [d for d in range(x.dim()) if d != channel_dim % x.dim()]
    x = x.float()
    rms = x.detach().square().mean(dims, keepdim=True).sqrt().clamp_min(1e-12)
    return torch.sigmoid(x / (temperature * rms)).mean(dims)


def surrogate(p: torch.Tensor, side: str = "on") -> torch.Tensor:
    """The layer's entropy from soft on-probabilities (mean over channels, bits), as the paper's
    pooled score averages the hard one. side="both": H(p), lowest at either end. side="on": H(p)
    where p >= 1/2 and 2 - H(p) below, which falls monotonically from 2 bits (always off) to 0
    (always on): only the always-on end is the identity a linearized ReLU becomes (an always-off
    unit outputs 0, and linearizing it turns 0 into x)."""
    h = binary_entropy(p)
    return (h if side == "both" else torch.where(p >= 0.5, h, 2 - h)).mean()


class SoftOn(nn.Module):
    """A probe at a site (`sites.instrument`, unfused): keeps the soft on-probability of the site's
    input from the last forward with gradients, returns the input unchanged."""

    def __init__(self, channel_dim: int, temperature: float = 0.1):
        super().__init__()
        self.channel_dim, self.temperature = channel_dim, temperature
        self.p = None

    def forward(self, x):
        if torch.is_grad_enabled():
            self.p = soft_on_probability(x, self.channel_dim, self.temperature)
        return x


class EntropyPenalty:
    """The seed's "entropy in the loss": loss + weight * the mean `surrogate` over the probed sites
    (those of the last forward), so that they arrive nearly linear when their turn comes."""

    def __init__(self, probes, weight: float, side: str = "on"):
        check_entropy_weight(weight, side)
        self.probes, self.weight, self.side = list(probes), weight, side

    def loss(self, task_loss: torch.Tensor, output, args: tuple, kwargs: dict) -> torch.Tensor:
        seen = [probe.p for probe in self.probes if probe.p is not None]
        for probe in self.probes:
            probe.p = None  # (not kept past the step: the graph it holds is freed)
        if not seen:
            return task_loss
        return task_loss + self.weight * torch.stack([surrogate(p, self.side) for p in seen]).mean()
