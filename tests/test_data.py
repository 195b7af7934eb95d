"""The real datasets: shapes, labels, normalization, and clear errors."""

import pytest
import torch

from easier_kernels import data
from helpers import data_root


@pytest.fixture(scope="module")
def root():
    found = data_root()
    if found is None:
        pytest.skip("the real datasets are not here: set EASIER_KERNELS_DATA to the folder holding them")
    return found


def test_cifar10_subset(root):
    if not (root / "cifar10-subset").is_dir():
        pytest.skip("the CIFAR-10 subset is not here")
    train, test = data.cifar10_subset(root, "train"), data.cifar10_subset(root, "test")
    assert len(train) == 5085 and len(test) == 1017
    images, labels = train.tensors
    assert images.shape == (5085, 3, 32, 32) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert set(labels.unique().tolist()) == set(range(10))
    assert images.mean((0, 2, 3)).abs().max() < 0.1 and (images.std((0, 2, 3)) - 1).abs().max() < 0.1


def test_fashion_mnist(root):
    if not (root / "fashion-mnist").is_dir():
        pytest.skip("Fashion-MNIST is not here")
    test = data.fashion_mnist(root, "test")
    images, labels = test.tensors
    assert images.shape == (10000, 1, 28, 28) and labels.bincount().tolist() == [1000] * 10
    assert abs(images.mean().item()) < 0.1


def test_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no cifar10-subset/ folder under"):
        data.cifar10_subset(tmp_path)
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        data.fashion_mnist(tmp_path, "val")
    monkeypatch.delenv("EASIER_KERNELS_DATA", raising=False)
    assert data.find_root(tmp_path) is None
    (tmp_path / "fashion-mnist").mkdir()
    assert data.find_root(tmp_path / "elsewhere", tmp_path) == tmp_path
