"""The default trainer and evaluation of the prune loop."""

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek
from easier_kernels import train


@pytest.fixture(scope="module")
def loader():
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    return DataLoader(Subset(splits.train, range(256)), batch_size=64, shuffle=True)


def model():
    torch.manual_seed(0)
    return ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)


def test_fit_learns_and_restores_the_mode(loader):
    first_epoch = train.fit(model(), loader, 1, lr=0.05)
    net = model().eval()
    before = [p.clone() for p in net.parameters()]
    loss = train.fit(net, loader, 4, lr=0.05)
    assert loss < first_epoch and loss < 2.3  # 2.3 = ln 10: chance level
    assert not net.training
    assert all(not torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_ride_along_counts_the_last_epoch_only(loader):
    net = model()
    meter = ek.EntropyMeter(net)
    train.fit(net, loader, 2, meter=meter)
    scores = meter.scores()
    assert scores.batches == len(loader)
    first = next(iter(scores.totals))
    assert scores.totals[first] == len(loader.dataset) * 28 * 28  # the stem's map: every pixel of one epoch, once


def test_mixed_precision_on_cpu_when_asked(loader):
    net = model()
    loss = train.fit(net, loader, 1, amp=True)  # bf16 autocast on CPU
    assert loss == loss


def test_divergence_and_empty_loaders_are_errors(loader):
    with pytest.raises(FloatingPointError, match="lower the learning rate"):
        train.fit(model(), loader, 1, lr=1e30)
    with pytest.raises(ValueError, match="no batches"):
        train.fit(model(), [], 1)
    with pytest.raises(ValueError, match="no samples"):
        train.accuracy(model(), [])
    with pytest.raises(TypeError, match="float tensors"):
        train.fit(model(), [(torch.zeros(2, 1, 28, 28, dtype=torch.uint8), torch.zeros(2, dtype=torch.long))], 1)


@pytest.mark.parametrize("lr", [0, -5, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused_before_a_step(lr):
    model = torch.nn.Linear(3, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = [(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))]
    with pytest.raises(ValueError, match=f"lr must be a finite learning rate > 0, not {lr}"):
        ek.train.fit(model, loader, 1, lr=lr)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
