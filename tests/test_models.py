"""The paper's models: shapes, activation-site counts (17/15/35), fx tracing, argument checks."""

from collections import Counter

import pytest
import torch
from torch import nn

from easier_kernels.models import PAPER_MODELS, mobilenet_v2, paper_model, resnet18, vgg16_bn

SITES = {"resnet18": 17, "vgg16_bn": 15, "mobilenet_v2": 35}
NAMES = list(PAPER_MODELS)


def _forward(model, size=32, in_channels=3, n=2):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(n, in_channels, size, size))


def _activation_calls(model, x):
    """Counter of activation module objects called during one forward."""
    calls = Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.update([id(mod)]))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_registry_lists_the_three_models():
    assert PAPER_MODELS == {"resnet18": resnet18, "vgg16_bn": vgg16_bn, "mobilenet_v2": mobilenet_v2}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_small_width(name, in_channels):
    model = paper_model(name, num_classes=7, in_channels=in_channels, width=0.25).eval()
    assert _forward(model, in_channels=in_channels).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_full_width(name):
    model = paper_model(name, num_classes=10, in_channels=1, width=1.0).eval()
    assert _forward(model, in_channels=1, n=1).shape == (1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_28px_input_works(name):
    model = paper_model(name, num_classes=10, in_channels=1, width=0.25).eval()
    assert _forward(model, size=28, in_channels=1).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_activation_sites_counted_once_each(name):
    model = paper_model(name, width=0.25).eval()
    calls = _activation_calls(model, torch.randn(2, 3, 32, 32))
    assert sum(calls.values()) == SITES[name]
    assert len(calls) == SITES[name]
    assert max(calls.values()) == 1, "an activation module was called twice in one forward"
    # Non-inplace everywhere, so hooks see the pre-activation input intact.
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager(name):
    model = paper_model(name, width=0.25).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # The traced graph keeps every activation as its own call_module site.
    acts = [n for n in traced.graph.nodes if n.op == "call_module"
            and isinstance(traced.get_submodule(n.target), (nn.ReLU, nn.ReLU6))]
    assert len(acts) == len({n.target for n in acts}) == SITES[name]


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_parameter_count(name):
    def params(width):
        return sum(p.numel() for p in paper_model(name, width=width).parameters())
    assert params(0.5) < params(1.0)


def test_vgg_attribute_names():
    model = vgg16_bn(width=0.25)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Sequential)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs", [
    {"num_classes": 0}, {"num_classes": 2.5}, {"in_channels": 0}, {"in_channels": True},
    {"width": 0}, {"width": -1.0}, {"width": float("nan")}, {"width": "1"},
])
def test_bad_arguments_raise(name, kwargs):
    with pytest.raises(ValueError):
        paper_model(name, **kwargs)


def test_tiny_width_keeps_at_least_one_channel():
    for name in NAMES:
        assert _forward(paper_model(name, width=1e-3).eval()).shape == (2, 10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        paper_model("resnet50")
    msg = str(err.value)
    assert "\n" not in msg
    assert all(name in msg for name in NAMES)
