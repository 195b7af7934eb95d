"""Recovery: what the fine-tuning after a linearization may add to plain training, so that each
removed layer costs less accuracy (DESIGN.md, "Beyond the paper: recovery").

    teacher = ek.recovery.Distillation(trained_model, weight=0.5, temperature=4.0)
    ek.train.fit(net, loader, 1, recovery=[teacher])    # the loss of every batch mixed with the teacher's
    ek.prune(model, train, val, distill=0.5)            # the loop's teacher: the unpruned network

A recovery term sees every training batch after the forward: `term.loss(task_loss, output, args,
kwargs)` returns the loss to minimize in place of `task_loss` (`train.fit` applies the terms in
order, inside autocast).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import logits_of

__all__ = ["Distillation", "check_distillation", "distillation_loss"]


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
