"""The training and evaluation `ek.prune` runs unless given its own: SGD with momentum, a cosine
learning rate, mixed precision on CUDA.

    ek.train.fit(model, loader, epochs=3, lr=0.1)         # trains in place, returns the last epoch's mean loss
    ek.train.accuracy(model, loader)                      # top-1 in percent, in eval mode

Batches are `(inputs, targets)` pairs or dicts of keyword inputs with "labels" (`capture.batch_inputs`);
the loss is the output's own `.loss`, else cross-entropy of its logits (`.logits` of a Hugging Face
output). `inputs_fn(batch) -> (args, kwargs)` and `loss_fn(output, batch)` replace either. `meter=` makes the last epoch
ride along: forwards go through `meter.model` (which shares the model's parameters), paused in the
earlier epochs, so the scores come from the last epoch only, as the paper counts them.

Under a torch.distributed process group (torchrun) both are data-parallel: `fit` trains through
DistributedDataParallel (gradients averaged, so every rank keeps the same weights) and calls the
sampler's `set_epoch`; `accuracy` sums correct and total over ranks, so every rank returns the
accuracy over all of the data. Give each rank its part with `easier_kernels.distributed.shard`.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn

from . import distributed
from .capture import batch_inputs, batch_targets, default_loss, logits_of, model_device, to_device

__all__ = ["fit", "accuracy", "progress_bar", "check_rate"]


def progress_bar(iterable, progress: bool, desc: str):
    """`iterable` with a tqdm bar that disappears when done (or as is, without progress)."""
    if not progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True)


def _on_device(batch, device, inputs_fn):
    """The batch on `device`, and the model's (args, kwargs) from it."""
    batch = to_device(batch, device, non_blocking=True)
    return batch, batch_inputs(batch, None, inputs_fn)


def _autocast(device: torch.device, amp: bool | None):
    """bf16 autocast where it is native (CUDA with bf16, else fp16 with a grad scaler); off on CPU
    unless asked for, as CPUs without AMX run bf16 convolutions slower than float32."""
    if amp is None:
        amp = device.type == "cuda"
    if not amp:
        return contextlib.nullcontext, None
    dtype = torch.bfloat16
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        dtype = torch.float16
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def check_rate(name: str, lr) -> None:
    """A learning rate is a finite number > 0 (SGD would refuse a negative one only once it starts)."""
    if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and 0 < lr < float("inf")):
        raise ValueError(f"{name} must be a finite learning rate > 0, not {lr}")


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(name: str, params, *, lr: float, momentum: float = 0.9, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {name!r}")


def fit(model: nn.Module, loader, epochs: int, *, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-4,
        meter=None, amp: bool | None = None, device=None, progress: bool = False, desc: str = "train",
        first_epoch: int = 0, inputs_fn=None, loss_fn=None, recovery=(), optimizer: str = "sgd") -> float:
    """Trains `model` in place for `epochs` epochs with SGD and a cosine learning rate (per batch,
    from `lr` to 0). Returns the mean loss of the last epoch (over every rank's batches); a
    non-finite loss raises. `first_epoch`: the number the loader's sampler gets from `set_epoch`
    for the first epoch (a DistributedSampler draws each epoch's order from it). `recovery`:
    terms that change each batch's loss (`easier_kernels.recovery`, e.g. distillation).
    optimizer: "sgd" (with `momentum`; the paper's) or "adamw" (betas (0.9, 0.999), decoupled
    `weight_decay`: what transformers are trained with)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, not {epochs}")
    check_rate("lr", lr)
    device = torch.device(device) if device is not None else model_device(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    per_epoch = len(loader) if hasattr(loader, "__len__") else None
    if per_epoch == 0:
        raise ValueError("the training loader yielded no batches; check the dataset is not empty")
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * per_epoch if per_epoch else epochs)
    autocast, scaler = _autocast(device, amp)
    forward = distributed.data_parallel(meter.model if meter is not None else model, device)
    sampler = getattr(loader, "sampler", None)
    was_training = model.training
    forward.train()
    done = 0  # batches so far, over every epoch (what recovery terms are scheduled by)
    try:
        for epoch in range(epochs):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(first_epoch + epoch)
            paused = meter.paused() if meter is not None and epoch < epochs - 1 else contextlib.nullcontext()
            loss_sum, batches = torch.zeros((), device=device), 0
            with paused:
                for batch in progress_bar(loader, progress, f"{desc} {epoch + 1}/{epochs}"):
                    for term in recovery:
                        if hasattr(term, "before_batch"):
                            term.before_batch(done, epochs * per_epoch if per_epoch else None)
                    done += 1
                    batch, (args, kwargs) = _on_device(batch, device, inputs_fn)
                    with autocast():
                        output = forward(*args, **kwargs)
                        loss = (loss_fn or default_loss)(output, batch)
                        for term in recovery:
                            if hasattr(term, "loss"):
                                loss = term.loss(loss, output, args, kwargs)
                    optimizer.zero_grad(set_to_none=True)
                    if scaler is None:
                        loss.backward()
                        optimizer.step()
                    else:
                        scaler.scale(loss).backward()
                        scaler.step(optimizer)
                        scaler.update()
                    if per_epoch:
                        schedule.step()
                    loss_sum += loss.detach().float()
                    batches += 1
            if not per_epoch:
                schedule.step()
            if batches == 0:
                raise ValueError("the training loader yielded no batches; check the dataset is not empty")
            every_rank = torch.stack([loss_sum, torch.tensor(float(batches), device=device)])
            loss_total, batch_total = distributed.sum_over_ranks(every_rank).tolist()  # one sync per epoch
            mean_loss = loss_total / batch_total
            if not math.isfinite(mean_loss):
                raise FloatingPointError(f"training diverged (mean loss {mean_loss}) in epoch {epoch + 1}; lower the learning rate")
    finally:
        model.train(was_training)
    return mean_loss


@torch.no_grad()
def accuracy(model: nn.Module, loader, *, device=None, progress: bool = False, desc: str = "eval",
             inputs_fn=None) -> float:
    """Top-1 accuracy in percent of the output's logits against the batch's targets (per token
    where targets are per token), in eval mode (the model's mode is restored); under a process
    group, over every rank's samples."""
    device = torch.device(device) if device is not None else model_device(model)
    was_training = model.training
    model.eval()
    correct, total = torch.zeros((), dtype=torch.int64, device=device), 0
    try:
        for batch in progress_bar(loader, progress, desc):
            batch, (args, kwargs) = _on_device(batch, device, inputs_fn)
            targets = batch_targets(batch)
            if targets is None:
                raise TypeError("accuracy needs batches with targets ((inputs, targets) or a dict with 'labels'); "
                                "pass evaluate=... to score the model another way")
            correct += (logits_of(model(*args, **kwargs)).argmax(-1) == targets).sum()
            total += targets.numel()
    finally:
        model.train(was_training)
    correct, total = distributed.sum_over_ranks(torch.stack([correct, torch.tensor(total, device=device)])).tolist()
    if total == 0:
        raise ValueError("the evaluation loader yielded no samples; check the dataset is not empty")
    return 100.0 * correct / total
