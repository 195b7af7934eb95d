"""One rank of tests/test_entropy.py's two-process test (run with torch.distributed.run):
scores its own shard of real images (helpers.real_images), writes what it got to OUT/rank<r>.json."""

import json
import sys

import torch
import torch.distributed as dist

from helpers import real_images

import easier_kernels as ek


def shard_batches(rank: int, batch_size: int = 32, per_rank: int = 96):
    images = real_images()[0]
    return list(images[rank * per_rank:(rank + 1) * per_rank].split(batch_size))


def score(batches) -> dict:
    torch.manual_seed(0)
    model = ek.models.resnet18(width=0.25).train()
    out = {}
    for mode in ("pooled", "batch_mean"):
        scores = ek.entropy_scores(model, batches, mode=mode, energy=True)
        out[mode] = {"entropy": dict(scores), "counts": {n: c.tolist() for n, c in scores.counts.items()},
                     "batches": scores.batches, "energy": {n: list(e) for n, e in scores.energy.items()}}
    return out


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    result = score(shard_batches(rank))
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
