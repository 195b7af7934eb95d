"""Data-parallel runs under torchrun: torch.distributed is the engine, this module only says how
the loop uses it. Every function is a no-op (or the single-process answer) without a process group.

    easier_kernels.distributed.init_from_env(device)   # the CLI: a process group when torchrun started us
    net = distributed.data_parallel(net, device)       # DistributedDataParallel around the model being trained
    loader = distributed.shard(loader, train=True)     # a DistributedSampler (train) / a padding-free shard (eval)
    value = distributed.from_main(fn)                  # fn() on rank 0, its result (or its error) on every rank

Decisions are made from numbers every rank holds identically: counts and accuracies are summed over
ranks, and whatever is measured with a clock (chain plans, latencies, gains) is measured on rank 0
and broadcast, so every rank takes the same branch and builds the same network.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import pickle
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["active", "rank", "world_size", "is_main", "init_from_env", "local_device", "local_main_first", "from_main",
           "all_gather", "collective_device", "sum_over_ranks", "same_on_every_rank", "sync_module", "broadcast_module", "data_parallel",
           "shard", "ShardSampler", "lost_rank", "lost_rank_message"]

# Seconds a collective waits for the other ranks before failing (a dead or hung rank).
DEFAULT_TIMEOUT = 600


def active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: torch.device, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Joins the process group torchrun describes in the environment (nccl on CUDA, gloo on CPU).
    False where it initialized nothing: a group exists already, or torchrun did not start this
    process (or started one process)."""
    if active() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; run without torchrun")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=timeout),
                            **({"device_id": device} if device.type == "cuda" else {}))
    return True


def local_device(device: torch.device) -> torch.device:
    """Under torchrun each process takes its own GPU (cuda -> cuda:LOCAL_RANK)."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


@contextlib.contextmanager
def local_main_first(enabled: bool = True):
    """The block runs on each machine's first process (LOCAL_RANK 0) before the others (a download)."""
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if enabled and active() and not first:
        dist.barrier()
    try:
        yield
    finally:
        if enabled and active() and first:
            dist.barrier()


def lost_rank(exc: BaseException) -> bool:
    """Whether `exc` is a collective that failed for want of another rank (it died, hangs, or its
    connection broke): nccl's DistError, or gloo's transport errors (plain RuntimeErrors, some of
    which name neither gloo nor the connection: "Application timeout caused pair closure")."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return active() and isinstance(exc, RuntimeError) and any(k in text for k in _TRANSPORT_ERRORS)


_TRANSPORT_ERRORS = ("gloo", "NCCL", "Connection closed", "pair closure")


def lost_rank_message(exc: BaseException, timeout: float | None = None) -> str:
    """One line for a collective that failed because another rank died or hung."""
    waited = f" (waited up to {timeout:g} s)" if timeout else ""
    return (f"rank {rank()} lost contact with the other ranks{waited}: one of them died or hangs; see its log, "
            f"then rerun the same command with --resume ({str(exc).strip().splitlines()[0][:160]})")


# ---- values every rank agrees on

def collective_device() -> torch.device:
    """Where tensors of a collective live: nccl's current GPU, else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def from_main(fn: Callable):
    """fn() run on rank 0 alone, its result on every rank; an exception it raises is raised on
    every rank (so no rank waits for a value that never comes)."""
    if not active():
        return fn()
    box = [None]
    if is_main():
        try:
            box[0] = ("ok", fn())
        except Exception as exc:  # raised below, on every rank
            box[0] = ("error", exc if _picklable(exc) else RuntimeError(f"{type(exc).__name__}: {exc}"))
    dist.broadcast_object_list(box, src=0, device=collective_device())
    status, value = box[0]
    if status == "error":
        raise value
    return value


def _picklable(value) -> bool:
    try:
        pickle.dumps(value)
    except Exception:
        return False
    return True


def all_gather(value) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank."""
    if not active():
        return [value]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over ranks, in place (returned for convenience)."""
    if active():
        dist.all_reduce(tensor)
    return tensor


def same_on_every_rank(value, what: str):
    """`value`, checked to be equal on every rank; a clear error (on every rank) where it is not."""
    values = all_gather(value)
    if any(v != values[0] for v in values[1:]):
        shown = ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(values))
        raise RuntimeError(f"{what} differs between ranks ({shown})")
    return value


# ---- models

@torch.no_grad()
def sync_module(module: nn.Module, drift: float = 1e-3) -> None:
    """Makes `module`'s parameters and buffers rank 0's on every rank. Parameters that differ by
    more than rounding (relative `drift`) mean the ranks trained apart: an error saying so.
    Buffers (batch-norm running statistics) are local to each rank's last batch: rank 0's win, as
    DistributedDataParallel itself does at every forward."""
    if not active():
        return
    params = [p for p in module.parameters()]
    if params:
        norms = torch.stack([p.detach().double().norm() for p in params]).cpu()
        spread = torch.stack(all_gather(norms))
        apart = (spread.max(0).values - spread.min(0).values) > drift * spread.abs().max(0).values.clamp_min(1e-12)
        if apart.any():
            name = [n for n, _ in module.named_parameters()][int(apart.nonzero()[0])]
            raise RuntimeError(f"after fine-tuning, the model differs between ranks (first at parameter {name}): the ranks "
                               "trained apart; wrap the model in torch.nn.parallel.DistributedDataParallel in your finetune")
    broadcast_module(module)


@torch.no_grad()
def broadcast_module(module: nn.Module) -> None:
    """`module`'s parameters and buffers made rank 0's on every rank, in place."""
    if not active():
        return
    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=0)


def data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
    """`module` wrapped in DistributedDataParallel (gradients averaged over ranks, buffers from
    rank 0 at every forward); the module itself without a process group."""
    if not active():
        return module
    one_gpu = device.type == "cuda" and device.index is not None
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if one_gpu else None)


# ---- data

class ShardSampler(torch.utils.data.Sampler):
    """Every `world_size`-th index from `rank`: each sample on exactly one rank, none repeated
    (DistributedSampler pads with repeats, which would bias an accuracy)."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self):
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))


def shard(loader, *, train: bool, seed: int = 0):
    """`loader` with this rank's part of the data: a DataLoader whose sampler is torch's own
    (random or sequential) is rebuilt with a DistributedSampler (train: shuffled when the original
    was, reshuffled per epoch by `set_epoch`) or a ShardSampler (evaluation). Loaders that already
    shard (DistributedSampler), custom samplers and other iterables are returned as they are:
    every rank then sees all of their batches."""
    from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, SequentialSampler

    if not active() or not isinstance(loader, DataLoader) or isinstance(loader.dataset, IterableDataset):
        return loader
    if type(loader.sampler) not in (RandomSampler, SequentialSampler) or loader.batch_size is None:
        return loader
    if train:
        sampler = DistributedSampler(loader.dataset, shuffle=isinstance(loader.sampler, RandomSampler), seed=seed,
                                     drop_last=loader.drop_last)
    else:
        sampler = ShardSampler(len(loader.dataset), rank(), world_size())
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                      timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
                      multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
                      persistent_workers=loader.persistent_workers,
                      **({"prefetch_factor": loader.prefetch_factor} if loader.num_workers else {}))
