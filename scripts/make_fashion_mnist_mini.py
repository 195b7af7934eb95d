"""Build easier_kernels/datasets/fashion_mnist_mini.npz, the Fashion-MNIST subset shipped in the package.

    python scripts/make_fashion_mnist_mini.py /work/shared/data/fashion-mnist

It keeps the first 600 training and the first 100 test images of each class, in their original
order, with unchanged pixels and labels.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np

OUTPUT = Path(__file__).resolve().parents[1] / "easier_kernels" / "datasets" / "fashion_mnist_mini.npz"


def read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        return np.frombuffer(f.read(), dtype=np.uint8, offset=header)


def first_per_class(images: np.ndarray, labels: np.ndarray, per_class: int):
    """The first `per_class` examples of each class, kept in their original order."""
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:per_class]] = True
    return images[keep], labels[keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder holding the four Fashion-MNIST *-idx?-ubyte.gz files")
    parser.add_argument("--output", type=Path, default=OUTPUT)
    args = parser.parse_args()
    arrays = {}
    for split, prefix, per_class in (("train", "train", 600), ("test", "t10k", 100)):
        labels = read_idx(args.folder / f"{prefix}-labels-idx1-ubyte.gz", 8)
        images = read_idx(args.folder / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(len(labels), 28, 28)
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = first_per_class(images, labels, per_class)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output, **arrays)
    print(f"wrote {args.output} ({args.output.stat().st_size:,} bytes):",
          ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
