"""Folding: the weight algebra against the layers it replaces (float64, random weights), then
`ek.fold` on whole models against their eval outputs (float32)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from helpers import TORCHVISION_MODELS, fused_everywhere, paper_or_torchvision, randomize_batch_norms

import easier_kernels as ek
from easier_kernels.fold import add_identity, compose_conv, compose_linear, decisions, dense_weight
from easier_kernels.fold.planner import choose

CONV = {1: F.conv1d, 2: F.conv2d}


def weights(out_channels, in_per_group, kernel, dims, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_channels, in_per_group, *(kernel,) * dims, dtype=torch.float64, generator=g)
    return w, torch.randn(out_channels, dtype=torch.float64, generator=g) if bias else None


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("k1, k2", [(1, 3), (3, 1), (3, 3), (5, 3)])
@pytest.mark.parametrize("s1, s2", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False)])
def test_composed_dense_convs_equal_the_two_convs(dims, k1, k2, s1, s2, bias1, bias2):
    w1, b1 = weights(6, 4, k1, dims, bias1, seed=1)
    w2, b2 = weights(5, 6, k2, dims, bias2, seed=2)
    x = torch.randn(2, 4, *(17,) * dims, dtype=torch.float64)
    expected = CONV[dims](CONV[dims](x, w1, b1, stride=s1), w2, b2, stride=s2)
    w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1)
    assert groups == 1 and w.shape[2:] == (k1 + s1 * (k2 - 1),) * dims
    torch.testing.assert_close(CONV[dims](x, w, b, stride=s1 * s2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("s1", [1, 2])
def test_depthwise_then_depthwise_stays_depthwise(mult, s1):
    channels = 8
    w1, b1 = weights(channels * mult, 1, 3, 2, seed=3)      # depthwise, channel multiplier `mult`
    w2, b2 = weights(channels * mult, 1, 3, 2, seed=4)      # depthwise on conv1's channels
    x = torch.randn(2, channels, 15, 15, dtype=torch.float64)
    expected = F.conv2d(F.conv2d(x, w1, b1, stride=s1, groups=channels), w2, b2, groups=channels * mult)
    if mult == 1:
        w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1, groups1=channels, groups2=channels)
        assert groups == channels and w.shape[1] == 1
    else:  # conv2's groups differ from conv1's: the merge is dense
        w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1, groups1=channels, groups2=channels * mult)
        assert groups == 1
    torch.testing.assert_close(F.conv2d(x, w, b, stride=s1, groups=groups), expected, rtol=1e-12, atol=1e-12)


def test_grouped_convs_and_pointwise_then_depthwise():
    w1, b1 = weights(8, 2, 3, 2, seed=5)                   # groups 2: 4 -> 8
    w2, b2 = weights(6, 4, 3, 2, seed=6)                   # groups 2: 8 -> 6
    x = torch.randn(1, 4, 12, 12, dtype=torch.float64)
    w, b, groups = compose_conv(w1, b1, w2, b2, groups1=2, groups2=2)
    assert groups == 2
    torch.testing.assert_close(F.conv2d(x, w, b, groups=2), F.conv2d(F.conv2d(x, w1, b1, groups=2), w2, b2, groups=2),
                               rtol=1e-12, atol=1e-12)
    # MobileNetV2's expansion: pointwise 1x1 (dense) then depthwise 3x3 becomes a dense 3x3
    pw, pw_b = weights(24, 4, 1, 2, seed=7)
    dw, dw_b = weights(24, 1, 3, 2, seed=8)
    w, b, groups = compose_conv(pw, pw_b, dw, dw_b, groups2=24)
    assert groups == 1 and w.shape == (24, 4, 3, 3)
    torch.testing.assert_close(F.conv2d(x, w, b), F.conv2d(F.conv2d(x, pw, pw_b), dw, dw_b, groups=24),
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("k1, k2", [(1, 3), (3, 1), (3, 3), (5, 3)])
@pytest.mark.parametrize("s1", [1, 2])
@pytest.mark.parametrize("depthwise_first", [True, False])
def test_depthwise_with_dense_composes_per_channel(dims, k1, k2, s1, depthwise_first):
    """Xception's separable convs: a depthwise kernel with a dense one, composed without making
    the depthwise one dense first, equals the two convs."""
    channels = 6
    conv = CONV[dims]
    if depthwise_first:
        w1, b1 = weights(channels, 1, k1, dims, seed=11)
        w2, b2 = weights(5, channels, k2, dims, seed=12)
        groups1, groups2, in_channels = channels, 1, channels
    else:
        w1, b1 = weights(channels, 4, k1, dims, seed=13)
        w2, b2 = weights(channels, 1, k2, dims, seed=14)
        groups1, groups2, in_channels = 1, channels, 4
    x = torch.randn(2, in_channels, *(17,) * dims, dtype=torch.float64)
    expected = conv(conv(x, w1, b1, stride=s1, groups=groups1), w2, b2, groups=groups2)
    w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1, groups1=groups1, groups2=groups2)
    assert groups == 1 and w.shape[2:] == (k1 + s1 * (k2 - 1),) * dims
    torch.testing.assert_close(conv(x, w, b, stride=s1), expected, rtol=1e-12, atol=1e-12)


def test_dense_weight_computes_what_the_grouped_conv_does():
    w, b = weights(6, 2, 3, 2, seed=9)
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, dense_weight(w, 3), b), F.conv2d(x, w, b, groups=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0), (5, 2), (3, 0)])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_skip_folds_into_the_kernel(kernel, padding, groups):
    w, b = weights(6, 6 // groups, kernel, 2, seed=10)
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    y = F.conv2d(x, w, b, padding=padding, groups=groups)
    if y.shape != x.shape:  # a skip around a conv that shrinks the map cannot exist
        return
    w2, b2 = add_identity(w, b, padding=padding, groups=groups)
    torch.testing.assert_close(F.conv2d(x, w2, b2, padding=padding, groups=groups), y + x, rtol=1e-12, atol=1e-12)
    assert not torch.equal(w, w2)  # the input weight is left alone


def test_identity_errors():
    w, b = weights(6, 4, 3, 2)
    with pytest.raises(ValueError, match="as many output as input channels"):
        add_identity(w, b, padding=1)
    w, b = weights(4, 4, 3, 2)
    with pytest.raises(ValueError, match="outside the kernel"):
        add_identity(w, b, padding=3)
    with pytest.raises(ValueError, match="conv2 reads 6 channels but conv1 writes 4"):
        compose_conv(w, b, *weights(5, 6, 1, 2))


@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False), (False, False)])
def test_composed_linears_equal_the_two_linears(bias1, bias2):
    g = torch.Generator().manual_seed(11)
    w1, w2 = torch.randn(32, 8, dtype=torch.float64, generator=g), torch.randn(8, 32, dtype=torch.float64, generator=g)
    b1 = torch.randn(32, dtype=torch.float64, generator=g) if bias1 else None
    b2 = torch.randn(8, dtype=torch.float64, generator=g) if bias2 else None
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)  # tokens: the transformer MLP with GELU linearized
    w, b = compose_linear(w1, b1, w2, b2)
    torch.testing.assert_close(F.linear(x, w, b), F.linear(F.linear(x, w1, b1), w2, b2), rtol=1e-12, atol=1e-12)


class ConvBnActConv(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3, stride, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("stride", [1, 2])
def test_a_linearized_chain_folds_exactly_into_one_conv(stride):
    """linearize(plan="merge") moves the padding onto conv1; then batch norm folds into conv1
    (torch's fusion) and the two convs compose: one conv, equal to the chain at the borders too."""
    model = ConvBnActConv(stride).double()
    with torch.no_grad():  # a batch norm that does something
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2), model.bn.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    net = ek.linearize(model, ["act"], x, plan="merge").eval()
    conv1, bn, conv2 = net.conv1, net.bn, net.conv2
    assert conv1.padding == (1 + stride, 1 + stride) and conv2.padding == (0, 0)
    w1, b1 = fuse_conv_bn_weights(conv1.weight, conv1.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    w, b, groups = compose_conv(w1, b1, conv2.weight, conv2.bias, stride1=stride)
    folded = F.conv2d(x, w, b, stride=stride, padding=conv1.padding)
    torch.testing.assert_close(folded, net(x), rtol=1e-12, atol=1e-12)


# ---- ek.fold: the graph pass


def relative_error(got, expected):
    got, expected = got.detach(), expected.detach()
    return float((got - expected).abs().max() / expected.abs().max())


def linearized_model(name, fraction=0.5, seed=0, plan="merge", size=32):
    model = randomize_batch_norms(paper_or_torchvision(name), seed).eval()
    with torch.no_grad():  # torchvision's ViT starts with a zero head: its outputs would all be 0
        for p in model.parameters():
            if p.dim() > 1 and not p.any():
                p.normal_(std=0.02)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))
    names = [s.name for s in ek.find_sites(model, x)]
    chosen = [names[i] for i in torch.randperm(len(names), generator=torch.Generator().manual_seed(seed)).tolist()]
    return ek.linearize(model, chosen[: round(len(names) * fraction)], x, plan=plan).eval(), x


@pytest.mark.parametrize("name", [f"paper-{n}" for n in ("resnet18", "vgg16_bn", "mobilenet_v2")] + TORCHVISION_MODELS)
def test_fold_equals_the_model_on_every_model(name):
    """Done means: a random half of the sites linearized with plan="merge", every chain merged,
    batch norms folded: the folded module computes the same outputs (float32, rel. error 1e-5)."""
    net, x = linearized_model(name)
    folded = ek.fold(net, x, decide="merge")
    expected = net(x)
    assert relative_error(folded(x), expected) <= 1e-5
    record = ek.recipe(folded)["fold"]
    assert record["relative_error"] <= 1e-5
    assert record["batch_norms"] == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert decisions(folded) or not name.startswith("paper-")
    assert ek.recipe(folded)["linearized"] == ek.recipe(net)["linearized"]  # the linearize recipe travels along


PLAN_MODELS = ["paper-mobilenet_v2", "paper-resnet18", "paper-vgg16_bn", "swin_t"]


@pytest.mark.parametrize("name", PLAN_MODELS)
def test_every_plan_of_every_chain_is_exact(name):
    """Each chain's every candidate (separate, merges of any run of layers, fused pairs) computes
    the chain: replayed plan by plan over all chains at once."""
    from easier_kernels.fold import find_chains, fold_batch_norms
    from easier_kernels.fold.plans import plan_label, plans

    net, x = linearized_model(name, fraction=0.6, seed=1)
    gm = ek.capture.capture(net).eval()
    fold_batch_norms(gm, (x,))
    chains = {c.name: [plan_label(p) for p in plans([gm.get_submodule(n.target) for n in c.layers])] for c in find_chains(gm)}
    assert chains, "no chain to fold: pick another seed"
    expected = net(x)
    for k in range(max(len(p) for p in chains.values())):
        replay = {chain: labels[k % len(labels)] for chain, labels in chains.items()}
        folded = ek.fold(net, x, decide=replay)
        assert relative_error(folded(x), expected) <= 1e-5, replay
        assert relative_error(ek.fold(net, x, decide=replay, portable=True)(x), expected) <= 1e-5, replay
        assert [r["choice"] for r in decisions(folded)] == list(replay.values())
    fused = [label for labels in chains.values() for label in labels if "fused" in label]
    assert fused or name != "paper-mobilenet_v2"  # MobileNetV2's pw/dw pairs are fused candidates


def test_measure_keeps_the_fastest_exact_plan_and_records_the_table():
    net, x = linearized_model("paper-mobilenet_v2", fraction=0.5, seed=2)
    folded = ek.fold(net, x, decide="measure")
    rows = decisions(folded)
    assert rows
    for row in rows:
        assert "separate" in row["candidates_ms"]  # never slower than not folding: it is always a candidate
        if row["why"].startswith("fastest"):
            assert row["choice"] == choose(row["candidates_ms"])
        else:
            assert row["why"].startswith("fell back") and row["choice"] == "separate"
    latency = ek.recipe(folded)["fold"]["latency"]
    assert latency["runtime"] == "eager" and latency["baseline"] == "input" and latency["rounds"] >= 5
    text = ek.format_decisions(rows, latency)
    assert all(row["chain"] in text for row in rows) and "whole network (eager)" in text
    assert relative_error(folded(x), net(x)) <= 1e-5


def test_a_chain_not_prepared_for_folding_is_measured_and_merged_only_when_allowed():
    model = randomize_batch_norms(ConvBnActConv(1)).eval()
    x = torch.randn(2, 3, 16, 16)
    net = ek.linearize(model, ["act"], x, plan="none").eval()  # conv2 keeps its padding: merging is off at borders
    kept = ek.fold(net, x, decide="merge")
    (row,) = decisions(kept)
    assert row["choice"] == "separate" and "not exact" in row["why"]
    assert row["border_error"]["merge2@0"] > 1e-3
    assert relative_error(kept(x), net(x)) <= 1e-6
    merged = ek.fold(net, x, decide="merge", allow_inexact=True)
    assert decisions(merged)[0]["choice"] == "merge2"
    error = ek.recipe(merged)["fold"]["relative_error"]
    assert error > 1e-3 and error == pytest.approx(relative_error(merged(x), net(x)), rel=1e-3)
    measured = ek.fold(net, x, decide="measure")  # an inexact plan is shown, never chosen
    (row,) = decisions(measured)
    assert "merge2@0" in row["border_error"] and row["choice"] == "separate"


class TokenMLP(nn.Module):
    """A transformer MLP on tokens [N, L, C] with a residual: x + fc2(drop(gelu(fc1(norm(x)))))."""

    def __init__(self, c=16):
        super().__init__()
        self.norm, self.fc1, self.act, self.drop, self.fc2 = nn.LayerNorm(c), nn.Linear(c, 4 * c), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * c, c)

    def forward(self, x):
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


def test_transformer_mlp_with_gelu_linearized_is_one_linear():
    model = TokenMLP().eval()
    x = torch.randn(2, 5, 16)
    net = ek.linearize(model, ["act"], x).eval()
    folded = ek.fold(net, x, decide="merge")
    linears = [m for m in folded.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 and linears[0].weight.shape == (16, 16)
    assert relative_error(folded(x), net(x)) <= 1e-5


def test_identity_skip_is_absorbed_into_the_merged_kernel():
    net, x = linearized_model("paper-resnet18", fraction=0.0)
    first_block = [s.name for s in ek.find_sites(net, x) if "layer1_0" in s.name][0]
    net = ek.linearize(net, [first_block], x).eval()
    folded = ek.fold(net, x, decide="merge")
    (row,) = [r for r in decisions(folded) if r["residual"]]
    assert row["choice"] == "merge2"
    adds = lambda gm: sum(n.op == "call_function" and "add" in str(n.target) for n in gm.graph.nodes)  # noqa: E731
    assert adds(folded) == adds(net) - 1  # the skip's add is gone: it is in the kernel
    assert f"fold_{row['chain']}" in folded.code and relative_error(folded(x), net(x)) <= 1e-5


def test_a_model_without_linearized_sites_only_folds_batch_norms():
    model = randomize_batch_norms(paper_or_torchvision("paper-vgg16_bn")).eval()
    x = torch.randn(2, 3, 32, 32)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    folded = ek.fold(model, x)
    assert decisions(folded) == [] and ek.recipe(folded)["fold"]["batch_norms"] == 13
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert relative_error(folded(x), model(x)) <= 1e-5
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in params.items())  # the input model is untouched
    assert not folded.training and not any(p.requires_grad for p in folded.parameters())


def test_fold_bad_input_is_a_clear_error():
    model = ConvBnActConv(1).eval()
    with pytest.raises(ValueError, match="decide must be one of measure, merge, separate"):
        ek.fold(model, torch.randn(1, 3, 8, 8), decide="fast")
    with pytest.raises(TypeError, match="ConvBnActConv fails on the example inputs .*pass inputs it runs on"):
        ek.fold(model, torch.zeros(1, 3, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="no decision for the chain"):
        ek.fold(ek.linearize(model, ["act"], torch.randn(1, 3, 8, 8)), torch.randn(1, 3, 8, 8), decide={"other": "merge2"})


def fused_mobilenet():
    """A small MobileNetV2 whose every pointwise/depthwise pair runs the fused kernel."""
    net, x = linearized_model("paper-mobilenet_v2", fraction=0.5, seed=3)
    replay = fused_everywhere(net, x)
    assert any("fused" in label for label in replay.values())
    return net, x, ek.fold(net, x, decide=replay)


def test_folded_module_works_with_torch_export():
    net, x, folded = fused_mobilenet()
    exported = torch.export.export(folded, (x,))
    assert any("conv_block" in str(n.target) for n in exported.graph.nodes)
    assert relative_error(exported.module()(x), net(x)) <= 1e-5


def test_folded_module_works_with_torch_compile():
    net, x, folded = fused_mobilenet()
    compiled = torch.compile(folded)
    assert relative_error(compiled(x), net(x)) <= 1e-5


def test_save_and_load_rebuild_the_folded_module(tmp_path):
    """Weights plus a JSON recipe; the network was linearized in two steps (padding moves that the
    recipe's final paddings reproduce), folded with measured decisions, then rebuilt from scratch."""
    model = randomize_batch_norms(paper_or_torchvision("paper-mobilenet_v2")).eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(ek.linearize(model, names[1:6:2], x), names[2:7:2], x).eval()
    folded = ek.fold(net, x)
    path = tmp_path / "folded.pt"
    ek.save_folded(folded, path)
    assert set(torch.load(path, weights_only=True)) == {"format", "record", "state_dict"}

    def model_fn():
        torch.manual_seed(123)  # other weights: everything must come from the file
        return ek.models.paper_model("mobilenet_v2", width=0.25)

    loaded = ek.load_folded(path, model_fn)
    assert torch.equal(loaded(x), folded(x))
    assert ek.recipe(loaded) == ek.recipe(folded)
    with pytest.raises(ValueError, match="unknown site name"):  # another architecture
        ek.load_folded(path, lambda: ek.models.paper_model("resnet18", width=0.25))
    with pytest.raises(ValueError, match="pass a file from ek.save_folded"):
        torch.save({"format": "x"}, tmp_path / "other.pt")
        ek.load_folded(tmp_path / "other.pt", model_fn)
    with pytest.raises(ValueError, match="pass a file from ek.save_folded"):  # a pruned model is not a folded one
        ek.PruneResult(net, [], [], 0.0, 0.0, "", [], 1.0, "pooled").save(tmp_path / "pruned.pt")
        ek.load_folded(tmp_path / "pruned.pt", model_fn)
