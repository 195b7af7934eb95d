"""Runtimes: a module runs the same in each, and plans made for a runtime use what it can run."""

import pytest
import torch

from helpers import paper_or_torchvision

import easier_kernels as ek
from easier_kernels import runtimes
from easier_kernels.fold import FusedConvBlock, decisions

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")


@pytest.mark.parametrize("runtime", runtimes.RUNTIMES)
def test_a_module_computes_the_same_in_every_runtime(runtime):
    model = paper_or_torchvision("paper-mobilenet_v2").eval()
    x = torch.randn(2, 3, 32, 32)
    out = runtimes.runner(model, (x,), runtime)()
    out = torch.as_tensor(out[0] if isinstance(out, list) else out)
    torch.testing.assert_close(out, model(x).detach(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("runtime", ["onnxruntime", "inductor"])
def test_plans_for_a_standard_runtime_use_standard_modules(runtime):
    """Planned and folded for ONNX Runtime or inductor: no fused kernel anywhere, the plans timed
    in that runtime, the whole network checked there, the outputs exact."""
    torch.manual_seed(0)
    model = paper_or_torchvision("paper-mobilenet_v2").eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, names[:6], x, runtime=runtime).eval()
    plans = ek.recipe(net)["plans"]
    assert plans and all(p["runtime"] == runtime and "fused" not in p["plan"] for p in plans)
    folded = ek.fold(net, x, runtime=runtime, original=model)
    record = ek.recipe(folded)["fold"]
    assert record["portable"] and record["latency"]["runtime"] == runtime and record["latency"]["baseline"] == "original"
    assert all(row["why"].startswith(("planned by linearize", "fell back", "kept")) for row in decisions(folded))
    assert not any(isinstance(m, FusedConvBlock) for m in folded.modules())
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_plan_for_another_runtime_is_measured_again():
    torch.manual_seed(0)
    model = paper_or_torchvision("paper-mobilenet_v2").eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, names[:4], x, runtime="eager").eval()
    folded = ek.fold(net, x, runtime="onnxruntime")
    assert all(not row["why"].startswith("planned") for row in decisions(folded))


def test_an_unknown_runtime_is_a_clear_error():
    model = paper_or_torchvision("paper-resnet18").eval()
    x = torch.randn(1, 3, 32, 32)
    for call in (lambda: ek.linearize(model, [], x, runtime="tensorrt"), lambda: ek.fold(model, x, runtime="tensorrt")):
        with pytest.raises(ValueError, match="runtime must be one of eager, inductor, onnxruntime"):
            call()
    with pytest.raises(ValueError, match="plan must be one of measure, merge, none"):
        ek.linearize(model, [], x, plan="fast")
