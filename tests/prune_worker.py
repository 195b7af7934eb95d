"""A small EASIER run for the kill/resume test: `python prune_worker.py CHECKPOINT_DIR RESULT_PATH`.

Prints "ready" once imports and data are done, so the test kills during the pruning itself."""

import sys

import torch
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek


def loaders():
    splits = ek.data.load("fashion-mnist-mini", seed=0)  # train augments: the run consumes torch's RNG
    train = DataLoader(Subset(splits.train, range(256)), batch_size=64, shuffle=True)
    val = DataLoader(Subset(splits.val, range(128)), batch_size=128)
    return train, val


def main(checkpoint_dir: str, result_path: str) -> None:
    torch.set_num_threads(1)
    train, val = loaders()
    torch.manual_seed(0)
    model = ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)
    print("ready", flush=True)
    # plan="merge": chains planned by timing (the default) may differ between two independent
    # runs, as the measurements do; this test compares two runs, so it plans without a clock.
    result = ek.prune(model, train, val, max_drop=100.0, max_steps=4, epochs_per_step=2, layers_per_step=1,
                      checkpoint_dir=None if checkpoint_dir == "-" else checkpoint_dir, resume=True, progress=False,
                      plan="merge")
    result.save(result_path)
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
