"""End to end, once per device: ride-along counting in a training step, a scoring pass, linearize
and fold of torchvision's MobileNetV2, one step of the prune loop. The CPU variants run in the
normal suite and keep the path alive; the CUDA variants (marker `gpu`, `pytest -m gpu`,
scripts/gpu_check.sh) are the first run of the package's kernels in a real network on a GPU.

Every kernel result is compared with the same computation under the `reference` backend (plain
torch), on the same device. On CUDA float32 convolutions and matmuls run without TF32 here, so
that the comparisons measure our kernels and the fold's algebra, not TF32's rounding.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from helpers import real_batches

import easier_kernels as ek
from easier_kernels.compat import import_torchvision
from easier_kernels.fold import find_chains, fold_batch_norms
from easier_kernels.fold.plans import plan_label, plans

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu,
                                           pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def fast_backends(device: str) -> list:
    """The kernels that run on device by default or by choice (not the oracle; not the Triton
    interpreter, which tests/ops covers on small tensors)."""
    found = [b for b in ek.ops.available_backends()
             if device in ek.ops.backends.devices_for(b) and b != "reference" and not (b == "triton" and device == "cpu")]
    assert found, f"no kernel backend runs on {device}; available: {ek.ops.available_backends()}"
    return found


@pytest.fixture
def full_precision():
    """float32 convolutions and matmuls without TF32 inside the test (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def relative_error(got, expected) -> float:
    got, expected = got.detach().float(), expected.detach().float()
    return float((got - expected).abs().max() / expected.abs().max())


@pytest.mark.parametrize("device", DEVICES)
def test_ride_along_training_step_counts_what_the_reference_counts(device, full_precision):
    torch.manual_seed(0)
    initial = ek.models.resnet18(num_classes=10, width=0.25).state_dict()
    images, labels = real_batches(1, 32)[0]
    images, labels = images.to(device), labels.to(device)

    def one_step(backend):
        model = ek.models.resnet18(num_classes=10, width=0.25).to(device).train()
        model.load_state_dict(initial)
        meter = ek.EntropyMeter(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        with ek.ops.use_backend(backend):
            loss = F.cross_entropy(meter.model(images), labels)
            loss.backward()
            optimizer.step()
        scores = meter.scores()
        return scores, float(loss.detach()), {k: v.detach().cpu() for k, v in model.state_dict().items()}

    expected, expected_loss, expected_state = one_step("reference")
    assert len(expected) >= 17 and expected.batches == 1
    for backend in fast_backends(device):
        scores, loss, state = one_step(backend)
        for site in expected:
            assert torch.equal(scores.counts[site], expected.counts[site]), f"{backend}: counts differ at {site}"
            assert scores.totals[site] == expected.totals[site]
        assert dict(scores) == dict(expected)
        assert loss == pytest.approx(expected_loss, rel=1e-6), backend
        for name, value in state.items():  # the gradient is the activation's own: the step lands in the same place
            torch.testing.assert_close(value, expected_state[name], rtol=1e-5, atol=1e-6, msg=f"{backend}: {name}")


@pytest.mark.parametrize("device", DEVICES)
def test_scoring_pass_matches_the_reference(device, full_precision):
    torch.manual_seed(0)
    model = ek.models.paper_model("mobilenet_v2", width=0.25).to(device).train()
    loader = real_batches(3, 16)
    expected = {}
    with ek.ops.use_backend("reference"):
        expected = ek.entropy_scores(model, loader)
    assert len(expected) == 35 and all(0.0 <= h <= 1.0 for h in expected.values())
    for backend in fast_backends(device):
        with ek.ops.use_backend(backend):
            scores = ek.entropy_scores(model, loader)
        assert scores.batches == 3
        assert dict(scores) == dict(expected), backend


def fused_replay(net) -> dict:
    """A decision table running every chain that has a fused plan by the fused kernel."""
    gm = ek.capture.capture(copy.deepcopy(net)).eval()
    fold_batch_norms(gm)
    table = {}
    for chain in find_chains(gm):
        labels = [plan_label(p) for p in plans([gm.get_submodule(n.target) for n in chain.layers])]
        table[chain.name] = next((label for label in labels if "fused" in label), "separate")
    return table


@pytest.mark.parametrize("device", DEVICES)
def test_linearize_and_fold_torchvision_mobilenet_v2(device, full_precision):
    """The first 15 of 35 sites linearized and folded; then, with every chain prepared to merge,
    every chain that has a fused plan forced onto the fused kernel of every backend: the outputs
    equal the linearized network's to float32 rounding. On CUDA the chains are also planned by
    timing and the fold checked never slower as a whole (the timing code's first run on a GPU);
    on CPU, where tests/test_fold.py covers those and timing on a loaded 2-core machine takes
    minutes, the fold merges every chain."""
    tv = import_torchvision()
    torch.manual_seed(0)
    model = tv.models.mobilenet_v2(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # batch norms that do something, so folding them is tested
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.5)
    model = model.eval().to(device)
    x = torch.randn(1, 3, 64, 64, generator=gen).to(device)
    names = [s.name for s in ek.find_sites(model, x)]
    assert len(names) == 35
    timed = device == "cuda"
    mergeable = ek.linearize(model, names[:15], x, plan="merge").eval()
    net = ek.linearize(model, names[:15], x).eval() if timed else mergeable
    with torch.no_grad():
        expected = net(x)
        folded = ek.fold(net, x, original=model, decide="measure" if timed else "merge")
        if timed:
            assert ek.recipe(folded)["fold"]["latency"]["rounds"] >= 5
        recorded = ek.recipe(folded)["fold"]
        assert recorded["device"].startswith(device)
        assert recorded["relative_error"] <= 1e-5
        assert relative_error(folded(x), expected) <= 1e-5
        expected = mergeable(x)
        table = fused_replay(mergeable)
        assert any("fused" in label for label in table.values()), table
        for backend in fast_backends(device):
            with ek.ops.use_backend(backend):
                forced = ek.fold(mergeable, x, decide=table)
                error = relative_error(forced(x), expected)
            assert error <= 1e-5, f"{backend}: fused chains off by {error:.2e}"
            assert ek.recipe(forced)["fold"]["relative_error"] <= 1e-5, backend


@pytest.mark.parametrize("device", DEVICES)
def test_one_prune_step(device):
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    train = DataLoader(Subset(splits.train, range(128)), batch_size=64, shuffle=True)
    val = DataLoader(Subset(splits.val, range(64)), batch_size=64)
    torch.manual_seed(0)
    model = ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)
    result = ek.prune(model, train, val, max_drop=100.0, max_steps=1, epochs_per_step=1, plan="merge", device=device,
                      progress=False)
    assert len(result.history) == 1 and result.history[0].removed
    assert result.stopped == "reached max_steps=1"
    assert result.linearized == result.history[0].removed
    assert next(result.model.parameters()).device.type == device
    assert result.payoff is not None and result.payoff["latency_ratio"] > 0
    with torch.no_grad():
        assert result.model.eval()(torch.zeros(2, 1, 28, 28, device=device)).shape == (2, 10)
