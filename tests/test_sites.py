"""find_sites: one site per activation call, stable names, kinds, channels, clear trace errors."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.activations import ACTIVATION_MODULES
from easier_kernels.capture import TraceFailure
from helpers import TORCHVISION_MODELS, Gate, WithGate, torchvision_model

def module_calls(model, x):
    """Independent of fx: (module path, input shape) of every activation-module call, in order."""
    paths = {m: p for p, m in model.named_modules()}
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a: calls.append((paths[m], tuple(a[0].shape))))
             for m in model.modules() if type(m) in ACTIVATION_MODULES]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("name,count", [("resnet18", 17), ("mobilenet_v2", 35), ("vgg16_bn", 15)])
def test_paper_models_site_counts(name, count):
    model = ek.models.paper_model(name, width=0.25)
    x = torch.randn(2, 3, 32, 32)
    sites = ek.find_sites(model, x)
    assert len(sites) == count
    assert [s.index for s in sites] == list(range(count))
    calls = module_calls(model, x)
    assert [s.module for s in sites] == [path for path, _ in calls]  # execution order
    assert [s.channels for s in sites] == [shape[1] for _, shape in calls]


@pytest.mark.parametrize("name", TORCHVISION_MODELS)
def test_torchvision_models_one_site_per_call(name):
    model = torchvision_model(name)
    x = torch.randn(2, 3, 32, 32)
    sites = ek.find_sites(model, x)
    calls = module_calls(model, x)
    assert [s.module for s in sites] == [path for path, _ in calls]
    assert [s.channels for s in sites] == [shape[s.channel_dim] for s, (_, shape) in zip(sites, calls)]
    assert len({s.name for s in sites}) == len(sites)
    if name in ("swin_t", "vit_b_16", "convnext_tiny"):  # transformer MLPs: tokens [N, ..., C]
        assert {s.channel_dim for s in sites} == {-1} and {s.kind for s in sites} == {"gelu"}
    if name == "swin_t":
        assert len(sites) == 12


def test_shared_module_called_twice_is_two_sites():
    model = torchvision_model("resnet18")
    sites = {s.name: s for s in ek.find_sites(model, torch.randn(2, 3, 32, 32))}
    first, second = sites["layer1_0_relu"], sites["layer1_0_relu_1"]
    assert first.module == second.module == "layer1.0.relu"
    assert first.index < second.index and first.inplace


class EveryForm(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gelu = nn.GELU(approximate="tanh")
        self.leaky = nn.LeakyReLU(0.3)
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        x = self.leaky(self.gelu(self.conv(x)))
        x = F.relu(x)
        x = torch.relu(x)
        x = x.relu_()
        x = F.relu6(x, inplace=True)
        x = F.gelu(x)
        x = F.silu(x)
        x = F.hardswish(x)
        x = F.leaky_relu(x, 0.2)
        x = F.elu(x, alpha=0.5)
        x = F.relu_(x)
        return F.elu_(self.fc(x.mean((2, 3))), 2.0)


def test_module_functional_method_and_inplace_calls():
    sites = ek.find_sites(EveryForm(), torch.randn(2, 3, 5, 5))
    got = [(s.kind, s.kind_args, s.inplace, s.channels, s.channel_dim) for s in sites]
    assert got == [
        ("gelu", {"approximate": "tanh"}, False, 4, 1),
        ("leaky_relu", {"negative_slope": 0.3}, False, 4, 1),
        ("relu", {}, False, 4, 1),
        ("relu", {}, False, 4, 1),
        ("relu", {}, True, 4, 1),
        ("relu6", {}, True, 4, 1),
        ("gelu", {"approximate": "none"}, False, 4, 1),
        ("silu", {}, False, 4, 1),
        ("hardswish", {}, False, 4, 1),
        ("leaky_relu", {"negative_slope": 0.2}, False, 4, 1),
        ("elu", {"alpha": 0.5}, False, 4, 1),
        ("relu", {}, True, 4, 1),
        ("elu", {"alpha": 2.0}, True, 6, -1),
    ]
    assert [s.module for s in sites[:2]] == ["gelu", "leaky"] and all(s.module is None for s in sites[2:])


def test_names_are_stable_across_traces():
    x = torch.randn(2, 3, 32, 32)
    first = [s.name for s in ek.find_sites(ek.models.resnet18(width=0.25), x)]
    again = [s.name for s in ek.find_sites(ek.models.resnet18(width=0.25), x)]
    assert first == again


def test_untraceable_module_is_named_with_the_fix():
    with pytest.raises(TraceFailure, match=r"module 'blocks\.1' \(Gate\).*leaf_modules=\['blocks\.1'\]"):
        ek.find_sites(WithGate(), torch.randn(2, 3, 8, 8))


def test_untraceable_forward_of_the_model_itself():
    with pytest.raises(TraceFailure, match="forward of Gate itself"):
        ek.find_sites(Gate(), torch.randn(2, 4, 8, 8))


@pytest.mark.parametrize("leaf", ["blocks.1", Gate])
def test_sites_inside_leaf_modules_are_module_sites(leaf):
    sites = ek.find_sites(WithGate(), torch.randn(2, 3, 8, 8).abs(), leaf_modules=[leaf])
    assert [(s.name, s.in_leaf, s.channels) for s in sites] == [("relu", False, 4), ("blocks.1.act", True, 4)]


def test_no_sites_is_an_error():
    with pytest.raises(ValueError, match="no activation sites"):
        ek.find_sites(nn.Linear(3, 2), torch.randn(1, 3))


def test_find_sites_changes_no_state():
    model = ek.models.resnet18(width=0.25).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ek.find_sites(model, torch.randn(2, 3, 32, 32))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
