"""linearize: the named calls become the identity, nothing else changes, padding moves make
conv chains exactly foldable; and every listed model goes through sites -> scores -> linearize."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import easier_kernels as ek
from helpers import TORCHVISION_MODELS, real_batches, paper_or_torchvision, torchvision_model


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_input_model_untouched_and_result_trainable():
    model = ek.models.vgg16_bn(width=0.25)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    expected = outputs(model, x)
    net = ek.linearize(model, ["features_2", "features_9"], x)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [m.padding for m in model.modules() if isinstance(m, nn.Conv2d)] == [(1, 1)] * 13
    torch.testing.assert_close(outputs(model, x), expected, rtol=0, atol=0)
    assert all(p.requires_grad for p in net.parameters())
    # the same weights' names, and the recipe (a plain load into the original fails on it: tests/test_recipe_state.py)
    assert list(net.state_dict()) == [*model.state_dict(), "easier_kernels.recipe:load_with_ek.load"]
    net.train()
    F.cross_entropy(net(x), torch.tensor([0, 1])).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_linearized_sites_compute_the_identity():
    model = ek.models.resnet18(width=0.25)
    x = torch.randn(2, 3, 32, 32)
    net = ek.linearize(model, ["layer1_0_relu1", "layer3_1_relu2"], x, plan="none")
    by_hand = copy.deepcopy(model)
    by_hand.layer1[0].relu1 = nn.Identity()
    by_hand.layer3[1].relu2 = nn.Identity()
    torch.testing.assert_close(outputs(net, x), outputs(by_hand, x), rtol=0, atol=0)
    remaining = [s.name for s in ek.find_sites(net, x)]
    assert len(remaining) == 15 and "layer1_0_relu1" not in remaining and "layer1_0_relu2" in remaining
    assert ek.recipe(net) == {"linearized": ["layer1_0_relu1", "layer3_1_relu2"], "padding": [], "plans": []}


def test_shared_module_keeps_its_other_call():
    model = torchvision_model("resnet18")
    x = torch.randn(2, 3, 32, 32)
    net = ek.linearize(model, ["layer1_0_relu"], x, plan="none")
    names = [s.name for s in ek.find_sites(net, x)]
    assert "layer1_0_relu" not in names and "layer1_0_relu_1" in names and len(names) == 16
    model.eval()
    with torch.no_grad():  # by hand: the block's first relu call gone, its second kept
        stem = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        block = model.layer1[0]
        h = F.relu(block.bn2(block.conv2(block.bn1(block.conv1(stem)))) + stem)
        h = model.layer4(model.layer3(model.layer2(model.layer1[1](h))))
        expected = model.fc(torch.flatten(model.avgpool(h), 1))
    torch.testing.assert_close(outputs(net, x), expected, rtol=1e-5, atol=1e-5)


def test_unknown_site_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown site name.*'relu9'.*valid site names: relu, layer1_0_relu1, "):
        ek.linearize(ek.models.resnet18(width=0.25), ["relu9"], torch.randn(1, 3, 32, 32))


class Chain(nn.Module):
    """conv(stride s) -> BN -> ReLU -> conv -> BN -> ReLU -> conv: two links to linearize."""

    def __init__(self, stride=1):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(3, 5, 3, stride, padding=1), nn.BatchNorm2d(5), nn.ReLU()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(5, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU()
        self.conv3 = nn.Conv2d(6, 4, 5, padding=2)
        for bn in (self.bn1, self.bn2):  # non-trivial statistics: the border values are not zero
            nn.init.uniform_(bn.running_mean, -1, 1), nn.init.uniform_(bn.bias, -1, 1)

    def forward(self, x):
        return self.conv3(self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))))


def unpadded(net):
    net = copy.deepcopy(net)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            m.padding = (0, 0)
    return net


@pytest.mark.parametrize("stride", [1, 2])
def test_moved_padding_makes_the_chain_one_valid_convolution(stride):
    """After the move, the chain equals its unpadded version on the input padded once: one
    valid convolution, so a merged conv with the total padding is exact at every border."""
    model = Chain(stride).eval()
    x = torch.randn(2, 3, 13, 11)
    net = ek.linearize(model, ["act1", "act2"], x, plan="merge")
    total = 1 + stride * (1 + 2)
    assert ek.recipe(net)["padding"] == [
        {"conv": "conv1", "before": [1, 1], "after": [total, total]},
        {"conv": "conv2", "before": [1, 1], "after": [0, 0]},
        {"conv": "conv3", "before": [2, 2], "after": [0, 0]},
    ]
    assert outputs(net, x).shape == outputs(model, x).shape
    once = outputs(unpadded(net), F.pad(x, [total] * 4))
    torch.testing.assert_close(outputs(net, x), once, rtol=1e-5, atol=1e-5)
    # without the move, the zero padding of the intermediate maps breaks that at the borders
    plain = ek.linearize(model, ["act1", "act2"], x, plan="none")
    assert not torch.allclose(outputs(plain, x), once, atol=1e-3)


def test_linearizing_step_by_step_equals_at_once():
    model = Chain().eval()
    x = torch.randn(2, 3, 9, 9)
    at_once = ek.linearize(model, ["act1", "act2"], x, plan="merge")
    stepwise = ek.linearize(ek.linearize(model, ["act2"], x, plan="merge"), ["act1"], x, plan="merge")
    assert ek.recipe(stepwise)["linearized"] == ["act2", "act1"]
    pads = lambda net: [m.padding for m in net.modules() if isinstance(m, nn.Conv2d)]  # noqa: E731
    assert pads(stepwise) == pads(at_once)
    torch.testing.assert_close(outputs(stepwise, x), outputs(at_once, x), rtol=0, atol=0)


def test_no_move_across_a_branch():
    """ResNet's block output feeds the next block and the skip: its padding must stay put."""
    model = ek.models.resnet18(width=0.25)
    net = ek.linearize(model, ["layer1_0_relu2", "layer1_0_relu1"], torch.randn(1, 3, 32, 32), plan="merge")
    assert ek.recipe(net)["padding"] == [
        {"conv": "layer1.0.conv1", "before": [1, 1], "after": [2, 2]},
        {"conv": "layer1.0.conv2", "before": [1, 1], "after": [0, 0]},
    ]


@pytest.mark.parametrize("name", [f"paper-{n}" for n in ("resnet18", "vgg16_bn", "mobilenet_v2")] + TORCHVISION_MODELS)
def test_every_model_sites_scores_linearize(name):
    """Done means: sites found, scored on real images, half the sites linearized, still runs."""
    model = paper_or_torchvision(name).train()
    batches = real_batches(2, 8)
    sites = ek.find_sites(model, batches[0][0])
    scores = ek.entropy_scores(model, batches)
    assert list(scores) == [s.name for s in sites]
    assert all(0.0 <= h <= 1.0 for h in scores.values())
    half = scores.ranking()[: len(sites) // 2]
    net = ek.linearize(model, half, batches[0][0])
    assert len(ek.find_sites(net, batches[0][0])) == len(sites) - len(half)
    out = net.train()(batches[0][0])
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    again = ek.entropy_scores(net, batches)  # the linearized model scores again, same names
    assert list(again) == [s.name for s in sites if s.name not in half]


class SharedConv(nn.Module):
    """conv2 runs twice: moving its padding would change its other call too."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act, self.relu = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.relu(self.conv2(self.act(self.bn(self.conv1(x))))))


def test_no_move_through_a_shared_conv():
    model = SharedConv().eval()
    x = torch.randn(1, 3, 8, 8)
    net = ek.linearize(ek.linearize(model, ["act"], x, plan="merge"), ["relu"], x, plan="merge")
    skip = {"conv": "conv2", "skipped": "module conv2 is called more than once"}
    assert ek.recipe(net)["padding"] == [skip]  # noted once, nothing moved
    assert [m.padding for m in net.modules() if isinstance(m, nn.Conv2d)] == [(1, 1), (1, 1)]
