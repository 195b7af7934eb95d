"""What a model is trained and judged for: the loss, the validation metric and what "dropped too
far" means. The loop (`ek.prune`) is given one task object and never branches on tasks.

    ek.prune(model, train, val, task=ek.tasks.Classification(), max_drop=1.0)   # accuracy, points
    ek.prune(lm, train, val, task=ek.tasks.CausalLM(), max_drop=0.05)         # perplexity, +5% at most

A task has `name`, `metric` (what `evaluate` returns), `loss(output, batch)`, `evaluate(model,
loader, ...)`, `check_max_drop(max_drop)`, `threshold(baseline, max_drop)` (the worst value that
passes), `passes(value, baseline, max_drop)` and `drop(value, baseline)` (how far it fell, in the
units of max_drop). `TASKS` names them ("classification", "causal_lm").
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import distributed
from .capture import batch_targets, default_loss, logits_of, model_device
from .train import _on_device, accuracy, progress_bar

__all__ = ["Classification", "CausalLM", "TASKS", "task_named", "IGNORE_INDEX"]

IGNORE_INDEX = -100  # a label position that counts in no loss (Hugging Face's and F.cross_entropy's convention)


class Classification:
    """Top-1 accuracy in percent; max_drop in accuracy points (the paper's)."""

    name, metric, unit = "classification", "accuracy", "points"

    def loss(self, output, batch) -> torch.Tensor:
        return default_loss(output, batch)

    def evaluate(self, model: nn.Module, loader, *, device=None, progress: bool = False, desc: str = "eval",
                 inputs_fn=None) -> float:
        return accuracy(model, loader, device=device, progress=progress, desc=desc, inputs_fn=inputs_fn)

    def check_max_drop(self, max_drop) -> None:
        if not (_number(max_drop) and 0 <= max_drop <= 100):
            raise ValueError(f"max_drop must be accuracy points in [0, 100], not {max_drop}")

    def check_baseline(self, baseline: float) -> str | None:
        """A warning when the baseline looks like the wrong unit."""
        if baseline <= 1.0:
            return (f"baseline accuracy is {baseline}: evaluate must return percent (0-100), as max_drop is in "
                    "accuracy points")
        return None

    def threshold(self, baseline: float, max_drop: float) -> float:
        return baseline - max_drop

    def passes(self, value: float, baseline: float, max_drop: float) -> bool:
        return value >= self.threshold(baseline, max_drop)

    def drop(self, value: float, baseline: float) -> float:
        return baseline - value

    def rejection(self, value: float, baseline: float, max_drop: float) -> str:
        return (f"validation accuracy {value:.2f} < {self.threshold(baseline, max_drop):.2f} "
                f"(baseline {baseline:.2f} - max_drop {max_drop})")


class CausalLM:
    """Next-token prediction: the loss is cross-entropy of each position's logits against the next
    token (labels shifted by one inside the loss, as Hugging Face's LM heads do; positions whose
    label is IGNORE_INDEX or whose attention_mask is 0 count in nothing). The metric is validation
    perplexity, exp(mean next-token loss over every token), lower is better; max_drop is the
    relative increase allowed (0.05: 5% above the baseline's perplexity)."""

    name, metric, unit = "causal_lm", "perplexity", "relative increase"

    def loss(self, output, batch) -> torch.Tensor:
        total, tokens = self._summed_loss(output, batch)
        return total / tokens.clamp_min(1)

    def _summed_loss(self, output, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum of next-token losses, number of tokens predicted) of one batch."""
        logits = logits_of(output)
        labels = _next_token_labels(batch, logits.device)
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ValueError(f"a causal LM's logits must be [batch, sequence, vocab] matching its labels "
                             f"[batch, sequence]; got {tuple(logits.shape)} and {tuple(labels.shape)}")
        shifted, targets = logits[:, :-1].float(), labels[:, 1:]
        total = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1),
                                ignore_index=IGNORE_INDEX, reduction="sum")
        return total, (targets != IGNORE_INDEX).sum()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader, *, device=None, progress: bool = False, desc: str = "eval",
                 inputs_fn=None) -> float:
        """Perplexity over every token of `loader` (every rank's), in eval mode (the mode is restored)."""
        device = torch.device(device) if device is not None else model_device(model)
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        try:
            for batch in progress_bar(loader, progress, desc):
                batch, (args, kwargs) = _on_device(batch, device, inputs_fn)
                total, tokens = self._summed_loss(model(*args, **kwargs), batch)
                sums += torch.stack([total.double(), tokens.double()])
        finally:
            model.train(was_training)
        total, tokens = distributed.sum_over_ranks(sums).tolist()
        if tokens == 0:
            raise ValueError("the evaluation loader yielded no tokens to predict; check the dataset is not empty")
        return math.exp(total / tokens)

    def check_max_drop(self, max_drop) -> None:
        if not (_number(max_drop) and 0 <= max_drop <= 10):
            raise ValueError(f"max_drop for a causal LM is the relative perplexity increase allowed, in [0, 10] "
                             f"(0.05 = 5%), not {max_drop}")

    def check_baseline(self, baseline: float) -> str | None:
        return None

    def threshold(self, baseline: float, max_drop: float) -> float:
        return baseline * (1 + max_drop)

    def passes(self, value: float, baseline: float, max_drop: float) -> bool:
        return value <= self.threshold(baseline, max_drop)

    def drop(self, value: float, baseline: float) -> float:
        return value / baseline - 1

    def rejection(self, value: float, baseline: float, max_drop: float) -> str:
        return (f"validation perplexity {value:.3f} > {self.threshold(baseline, max_drop):.3f} "
                f"(baseline {baseline:.3f} x (1 + {max_drop}))")


TASKS = {"classification": Classification, "causal_lm": CausalLM}


def task_named(name: str):
    """The task object of a name in TASKS (what a saved run records)."""
    if name not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, not {name!r}")
    return TASKS[name]()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _next_token_labels(batch, device) -> torch.Tensor:
    """The batch's labels (its input ids where it has none) with padded positions ignored."""
    labels = batch_targets(batch)
    if labels is None and isinstance(batch, dict):
        labels = batch.get("input_ids")
    if labels is None:
        raise ValueError("a causal LM batch needs 'labels' or 'input_ids' (a dict), or (input_ids, labels)")
    labels = labels.to(device)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if mask is not None:
        labels = labels.masked_fill(mask.to(device) == 0, IGNORE_INDEX)
    return labels
