"""One rank of tests/test_distributed.py's API test (run with torch.distributed.run): ek.prune and
EntropyMeter under a gloo process group; what each scenario gave goes to OUT/rank<r>.json."""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek


def loaders():
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    return (DataLoader(Subset(splits.train, range(128)), batch_size=32, shuffle=True),
            DataLoader(Subset(splits.val, range(65)), batch_size=32))


def small_model():
    torch.manual_seed(dist.get_rank())  # different on each rank: the loop starts from rank 0's weights
    return ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)


def error_of(run) -> str:
    try:
        run()
    except RuntimeError as exc:
        return str(exc)
    return "no error"


def default_loop() -> dict:
    train, val = loaders()
    # select="first": the second site (layer1_0_relu1) makes a conv chain, whose plan is timed on rank 0
    # (at a deploy batch of 4, which every rank's network is then built with)
    result = ek.prune(small_model(), train, val, max_drop=100.0, max_steps=2, select="first", progress=False,
                      deploy_batch=4)
    checksum = sum(float(p.detach().double().sum()) for p in result.model.parameters())
    return {"removed": result.linearized, "world_size": result.world_size, "accuracy": result.accuracy,
            "checksum": checksum, "recipe": ek.recipe(result.model)}


def recovered() -> dict:
    """Two steps with every recovery option: every rank's teacher is rank 0's unpruned network, the
    annealed and penalized sites train alike on every rank."""
    train, val = loaders()
    loop = ek.Pruner(small_model(), train, val, max_drop=100.0, max_steps=2, plan="merge", progress=False, distill=0.5,
                     anneal=0.5, entropy_weight=0.1, patience=1)
    loop.begin()
    loop.step()
    loop.step()
    checksum = lambda module: sum(float(t.double().sum()) for t in module.state_dict().values())  # noqa: E731
    return {"teacher": checksum(loop._recovery()[0].teacher), "unpruned": checksum(loop.model),
            "student": checksum(loop.result().model)}


def user_evaluate() -> str:
    train, val = loaders()
    return error_of(lambda: ek.prune(small_model(), train, val, max_steps=1, plan="merge", progress=False,
                                     evaluate=lambda net: 50.0 + dist.get_rank()))


def user_finetune_without_ddp() -> str:
    train, val = loaders()

    def finetune(net, step):  # each rank changes its own copy: no DistributedDataParallel
        with torch.no_grad():
            next(net.parameters()).add_(float(dist.get_rank()))

    return error_of(lambda: ek.prune(small_model(), train, val, max_drop=100.0, max_steps=1, plan="merge",
                                     progress=False, finetune=finetune))


class Gate(nn.Module):
    """A leaf module whose activation runs only where it is enabled (here: on rank 0)."""

    def __init__(self):
        super().__init__()
        self.act, self.enabled = nn.ReLU(), dist.get_rank() == 0

    def forward(self, x):
        return self.act(x) if self.enabled else x


def site_one_rank_reaches() -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), Gate())
    meter = ek.EntropyMeter(model, leaf_modules=[Gate])
    meter.model(torch.randn(2, 1, 8, 8))
    scores = meter.scores()
    meter.close()
    gated, conv = [n for n in scores if "act" in n][0], [n for n in scores if "act" not in n][0]
    return {"entropy": scores[gated], "gated_per_channel": scores.totals[gated], "conv_per_channel": scores.totals[conv]}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    result = {"default": default_loop(), "evaluate": user_evaluate(), "finetune": user_finetune_without_ddp(),
              "one_rank_site": site_one_rank_reaches(), "recovered": recovered()}
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()
