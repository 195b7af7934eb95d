"""Real datasets as tensors: the CIFAR-10 subset and Fashion-MNIST from their distribution files.

    train = ek.data.cifar10_subset(root, "train")     # TensorDataset: float32 [N, 3, 32, 32] normalized, int64 labels
    test = ek.data.fashion_mnist(root, "test")        # float32 [N, 1, 28, 28]

`root` is the folder holding `cifar10-subset/` and `fashion-mnist/` (see ../shared/data/README.md).
Images are normalized per channel with the training set's statistics.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["cifar10_subset", "fashion_mnist", "find_root", "SPLITS"]

SPLITS = ("train", "test")
# per-channel mean / std of the full training sets (the usual published values)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)


def find_root(*candidates) -> Path | None:
    """The first folder holding a dataset: $EASIER_KERNELS_DATA, then the candidates; None if none does."""
    for root in (os.environ.get("EASIER_KERNELS_DATA"), *candidates):
        if root and any((Path(root) / folder).is_dir() for folder in ("cifar10-subset", "fashion-mnist")):
            return Path(root)
    return None


def _normalized(images_nhwc: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images_nhwc)).permute(0, 3, 1, 2).float().div_(255)
    return ((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)).contiguous()


def _check(root, folder: str, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    path = Path(root) / folder
    if not path.is_dir():
        raise FileNotFoundError(f"no {folder}/ folder under {root}; pass the folder that holds it (see the data README)")
    return path


def cifar10_subset(root, split: str = "train") -> TensorDataset:
    """The CIFAR-10 subset (5,085 train + 1,017 test images), from cifar10_subset.npz."""
    path = _check(root, "cifar10-subset", split) / "cifar10_subset.npz"
    with np.load(path) as arrays:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    return TensorDataset(_normalized(images, CIFAR10_MEAN, CIFAR10_STD), torch.from_numpy(labels.astype(np.int64)))


def _idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(bytearray(f.read()), dtype=np.uint8, offset=header)  # writable: torch wants that


def fashion_mnist(root, split: str = "train") -> TensorDataset:
    """Fashion-MNIST (60,000 train + 10,000 test images, 28x28 grayscale), from the IDX files."""
    path = _check(root, "fashion-mnist", split)
    prefix = "train" if split == "train" else "t10k"
    labels = _idx(path / f"{prefix}-labels-idx1-ubyte.gz", 8)
    images = _idx(path / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(len(labels), 28, 28, 1)
    return TensorDataset(_normalized(images, FASHION_MNIST_MEAN, FASHION_MNIST_STD), torch.from_numpy(labels.astype(np.int64)))
