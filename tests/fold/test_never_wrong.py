"""Folding is exact or says so: layer subclasses are opaque, a batch norm folds only over its
layer's channels, a broadcast add stays outside the fused kernel, fold checks its outputs, and a
gated unit's activation is reported as nothing to fold."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels import select
from easier_kernels.fold import chains, gains, planner
from easier_kernels.fold.graph import CANNOT_FOLD, InexactFold, decisions, default_tolerance
from easier_kernels.fold.plans import ChainModule
from helpers import randomize_batch_norms


def relative_error(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


# ---- 1. layer subclasses are opaque


class StdConv(nn.Conv2d):
    """As timm's StdConv2d: the weight is standardized per output channel at every call, so a
    batch norm folded into .weight is undone."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True, momentum=0.0,
                         eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class SameConv(nn.Conv2d):
    """As timm's Conv2dSame (stride 1): 'same' zero padding at run time while .padding is 0, so a
    padding moved onto it is ignored."""

    def forward(self, x):
        p = (self.kernel_size[0] - 1) // 2
        return F.conv2d(F.pad(x, (p, p, p, p)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class TwoConvs(nn.Module):
    """head(pool(bn2(conv2(act(bn1(conv1(x))))))): the pooled head hides a changed border."""

    def __init__(self, conv1, conv2):
        super().__init__()
        self.conv1, self.bn1, self.act = conv1, nn.BatchNorm2d(conv1.out_channels), nn.ReLU()
        self.conv2, self.bn2 = conv2, nn.BatchNorm2d(conv2.out_channels)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(conv2.out_channels, 5)

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.fc(self.pool(y).flatten(1))


def timm_layers():
    from easier_kernels.compat import import_torchvision

    import_torchvision()  # timm imports torchvision, which imports on this torch only through compat
    return pytest.importorskip("timm").layers


SUBCLASSES = {
    "std_conv": lambda: StdConv(3, 8, 3, padding=1),
    "same_conv": lambda: SameConv(3, 8, 3),
    "timm_std_conv": lambda: timm_layers().StdConv2d(3, 8, 3, padding=1),
    "timm_conv2d_same": lambda: timm_layers().Conv2dSame(3, 8, 3),
}


def two_convs(kind, seed=0):
    torch.manual_seed(seed)
    first = SUBCLASSES[kind]()
    return randomize_batch_norms(TwoConvs(first, nn.Conv2d(8, 4, 3, padding=1)), seed), [type(first)]


@pytest.mark.parametrize("kind", list(SUBCLASSES))
def test_a_conv_subclass_gets_no_batch_norm_no_merge_and_no_padding_move(kind):
    model, leaves = two_convs(kind)
    x = torch.randn(2, 3, 12, 12)
    net = ek.linearize(model, ["act"], x, plan="merge", leaf_modules=leaves).eval()
    assert ek.recipe(net)["padding"] == []  # the old code moved conv2's padding onto conv1
    assert net.conv1.padding == model.conv1.padding and net.conv2.padding == (1, 1)
    by_hand = copy.deepcopy(model)
    by_hand.act = nn.Identity()
    torch.testing.assert_close(outputs(net, x), outputs(by_hand, x), rtol=0, atol=0)
    for decide in ("merge", "measure"):
        folded = ek.fold(net, x, decide=decide, check=False, leaf_modules=leaves)
        assert decisions(folded) == []  # conv1 is no layer of a chain
        assert isinstance(folded.bn1, nn.BatchNorm2d) and not hasattr(folded, "bn2")  # bn1 stays, bn2 folds
        assert relative_error(folded(x), outputs(by_hand, x)) <= 1e-5


@pytest.mark.parametrize("kind", ["std_conv", "timm_std_conv"])
def test_a_batch_norm_after_a_conv_subclass_stays(kind):
    model, leaves = two_convs(kind)  # nothing linearized: only batch norms to fold
    x = torch.randn(2, 3, 12, 12)
    folded = ek.fold(model, x, leaf_modules=leaves)
    assert relative_error(folded(x), outputs(model, x)) <= 1e-5  # the old code folded bn1 into the weight it re-standardizes
    assert ek.recipe(folded)["fold"]["batch_norms"] == 1 and isinstance(folded.bn1, nn.BatchNorm2d)


def test_a_conv_subclass_after_the_site_is_opaque_too():
    torch.manual_seed(1)
    model = randomize_batch_norms(TwoConvs(nn.Conv2d(3, 8, 3, padding=1), StdConv(8, 4, 3, padding=1)))
    x = torch.randn(2, 3, 12, 12)
    net = ek.linearize(model, ["act"], x, plan="merge", leaf_modules=[StdConv]).eval()
    assert ek.recipe(net)["padding"] == []
    folded = ek.fold(net, x, decide="merge", leaf_modules=[StdConv])
    assert decisions(folded) == [] and isinstance(folded.bn2, nn.BatchNorm2d)
    assert relative_error(folded(x), outputs(net, x)) <= 1e-5


def test_layer_types_are_matched_exactly():
    class MyLinear(nn.Linear):
        pass

    from easier_kernels.fold.algebra import LAYERS, exactly, foldable_conv

    assert exactly(nn.Linear(2, 2), LAYERS) and not exactly(MyLinear(2, 2), LAYERS)
    assert foldable_conv(nn.Conv2d(2, 2, 3)) and not foldable_conv(StdConv(2, 2, 3))


# ---- 2. fold checks its outputs


class ConvBnActConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


def unprepared_chain(dtype=torch.float32):
    """conv1 -> bn -> (linearized) -> conv2 with conv2's padding left in place: merging them is
    wrong at the borders."""
    torch.manual_seed(0)
    model = randomize_batch_norms(ConvBnActConv()).to(dtype)
    x = torch.randn(2, 3, 12, 12, dtype=dtype)
    return ek.linearize(model, ["act"], x, plan="none").eval(), x


def test_an_inexact_replayed_plan_raises_naming_its_chain():
    net, x = unprepared_chain()
    with pytest.raises(InexactFold, match=r"relative error of .* \(tolerance 1e-04\), from chain conv1 \(merge2: .*"
                                          r"allow_inexact=True") as info:
        ek.fold(net, x, decide={"conv1": "merge2"})  # the old code returned it silently
    assert "\n" not in str(info.value)
    folded = ek.fold(net, x, decide={"conv1": "merge2"}, allow_inexact=True)
    record = ek.recipe(folded)["fold"]
    assert record["relative_error"] > 1e-3 and record["tolerance"] == 1e-4
    assert [(c["chain"], c["choice"]) for c in record["inexact"]] == [("conv1", "merge2")]
    assert relative_error(folded(x), outputs(net, x)) > 1e-3
    loose = ek.fold(net, x, decide={"conv1": "merge2"}, tolerance=1.0)  # a tolerance that accepts it
    assert ek.recipe(loose)["fold"]["inexact"] == []


def test_the_check_is_relative_to_the_output_scale():
    """Exact folds pass at any output scale and dtype: only rounding is left."""
    for dtype in (torch.float32, torch.float64):
        for scale in (1e-6, 1.0, 1e6):
            net, x = unprepared_chain(dtype)
            with torch.no_grad():
                net.conv2.weight.mul_(scale), net.conv2.bias.mul_(scale)
            folded = ek.fold(net, x, decide="separate")
            record = ek.recipe(folded)["fold"]
            assert record["inexact"] == [] and record["relative_error"] <= default_tolerance(dtype) / 10


def test_a_wrong_batch_norm_fold_is_named(monkeypatch):
    net, x = unprepared_chain()
    monkeypatch.setattr(chains, "fuse_conv_bn_eval", lambda conv, bn: conv)  # a fusion that drops the batch norm
    with pytest.raises(InexactFold, match="from folding batch norms into their layers"):
        ek.fold(net, x, decide="separate")


def test_relative_error_is_scaled_by_the_finite_outputs_and_never_hides_a_nan():
    from easier_kernels.fold.graph import relative_error as measured

    expected = torch.tensor([1e6, -2e6, float("inf"), float("nan")])
    assert measured(expected.clone(), expected) == 0.0  # the same inf and NaN are no difference
    assert measured(expected + torch.tensor([2.0, 0.0, 0.0, 0.0]), expected) == pytest.approx(1e-6)
    assert measured(expected * 1e-12, expected * 1e-12) == 0.0
    broken = torch.tensor([1.0, float("nan")])
    assert math.isnan(measured((torch.ones(2), broken), (torch.ones(2), torch.ones(2))))  # not the other output's 0


def test_default_tolerance_per_dtype_and_tf32():
    assert default_tolerance(torch.float32) == 1e-4 and default_tolerance(torch.float64) == 1e-9
    assert default_tolerance([torch.float32, torch.float16]) == 1e-2 and default_tolerance(torch.bfloat16) == 5e-2
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert default_tolerance(torch.float32, "cuda") == 1e-2 and default_tolerance(torch.float32, "cpu") == 1e-4
        torch.backends.cudnn.allow_tf32 = False
        assert default_tolerance(torch.float32, "cuda") == (1e-2 if torch.backends.cuda.matmul.allow_tf32 else 1e-4)
    finally:
        torch.backends.cudnn.allow_tf32 = saved


# ---- 3. a batch norm folds only over its layer's output channels


class LayerThenNorm(nn.Module):
    def __init__(self, layer, norm):
        super().__init__()
        self.layer, self.bn = layer, norm

    def forward(self, x):
        return self.bn(self.layer(x))


@pytest.mark.parametrize("case, layer, shape, folds", [
    ("tokens [N, L, C], L == C", lambda: nn.Linear(8, 8), (2, 8, 8), False),   # BatchNorm1d normalizes L
    ("features [N, C]", lambda: nn.Linear(8, 8), (4, 8), True),
    ("unbatched conv1d [C, L], L == C", lambda: nn.Conv1d(8, 8, 1), (8, 8), False),
    ("conv1d [N, C, L]", lambda: nn.Conv1d(8, 8, 1), (2, 8, 8), True),
])
def test_batch_norm_1d_folds_only_over_the_layers_channels(case, layer, shape, folds):
    torch.manual_seed(0)
    model = randomize_batch_norms(LayerThenNorm(layer(), nn.BatchNorm1d(8)))
    x = torch.randn(shape)
    folded = ek.fold(model, x, decide="separate")
    assert relative_error(folded(x), outputs(model, x)) <= 1e-5, case  # the old code folded over the wrong dim
    assert ek.recipe(folded)["fold"]["batch_norms"] == int(folds)
    assert hasattr(folded, "bn") != folds


# ---- 4. a broadcast add after a chain stays outside the fused kernel


class PwDwPlus(nn.Module):
    """relu(dw(act(pw(x))) + other): other a learned [1, C, 1, 1] map, or a pooled branch [N, C, 1, 1]."""

    def __init__(self, other):
        super().__init__()
        self.pw, self.bn1, self.act = nn.Conv2d(4, 8, 1), nn.BatchNorm2d(8), nn.ReLU6()
        self.dw, self.bn2, self.out = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU()
        self.other = other
        self.shift = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.branch = nn.Conv2d(4, 8, 1)

    def forward(self, x):
        y = self.bn2(self.dw(self.act(self.bn1(self.pw(x)))))
        other = self.shift if self.other == "parameter" else self.branch(x.mean((2, 3), keepdim=True))
        return self.out(y + other)


@pytest.mark.parametrize("other", ["parameter", "branch"])
def test_a_broadcast_add_is_no_residual(other):
    torch.manual_seed(0)
    model = randomize_batch_norms(PwDwPlus(other))
    x = torch.randn(2, 4, 10, 10)
    net = ek.linearize(model, ["act"], x, plan="merge").eval()
    expected = outputs(net, x)
    folded = ek.fold(net, x, decide="measure")  # the old code gave the fused kernel the [1, 8, 1, 1] map and crashed
    (row,) = decisions(folded)
    assert row["residual"] is False and relative_error(folded(x), expected) <= 1e-5
    fused = ek.fold(net, x, decide={"pw": "fused"})
    assert decisions(fused)[0]["choice"] == "fused" and relative_error(fused(x), expected) <= 1e-5


def test_a_same_shape_add_is_still_the_fused_kernels_residual():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw, self.act, self.dw = nn.Conv2d(8, 8, 1), nn.ReLU6(), nn.Conv2d(8, 8, 3, padding=1, groups=8)

        def forward(self, x):
            return x + self.dw(self.act(self.pw(x)))

    x = torch.randn(2, 8, 10, 10)
    net = ek.linearize(Block().eval(), ["act"], x, plan="merge").eval()
    fused = ek.fold(net, x, decide={"pw": "fused"})
    (row,) = decisions(fused)
    assert row["residual"] is True and "add" not in fused.code  # the add is in the kernel's epilogue
    assert relative_error(fused(x), outputs(net, x)) <= 1e-5


def test_op_names_are_the_same_for_fx_and_aten_nodes():
    import operator
    import torch.fx as fx

    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    targets = {operator.add: "add", torch.add: "add", operator.iadd: "add", torch.ops.aten.add.Tensor: "add",
               torch.ops.aten.add_.Tensor: "add", operator.mul: "mul", torch.ops.aten.mul.Tensor: "mul",
               torch.ops.aten.flatten.using_ints: "flatten", torch.flatten: None}
    for target, name in targets.items():
        assert chains.op_name(graph.call_function(target, (a, b))) == name, target
    assert chains.op_name(graph.call_method("add_", (a, b))) == "add"
    assert chains.op_name(graph.call_method("mul", (a, b))) == "mul"


# ---- 5. gated units: nothing folds through the product


class SwiGLU(nn.Module):
    def __init__(self, c=8, h=16, functional=False):
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(c, h), nn.Linear(c, h), nn.Linear(h, c)
        self.act = None if functional else nn.SiLU()
        self.scale = nn.Parameter(torch.full((h,), 0.5))

    def forward(self, x):
        gate = F.silu(self.gate(x)) if self.act is None else self.act(self.gate(x))
        return self.down(gate * self.up(x))


class TinyBlock(nn.Module):
    """A GELU MLP (foldable once linearized) and a SwiGLU MLP (not), on tokens, with a layer
    scale (a mul by a parameter: no gate)."""

    def __init__(self, functional=False):
        super().__init__()
        self.fc1, self.gelu, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.mlp = SwiGLU(functional=functional)
        self.fc3, self.relu, self.fc4 = nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)
        self.gamma = nn.Parameter(torch.full((16,), 0.1))

    def forward(self, x):
        x = x + self.fc2(self.gelu(self.fc1(x)))
        x = x + self.mlp(x)
        return x + self.fc4(self.relu(self.fc3(x)) * self.gamma)


def site_nodes(gm):
    ek.sites.sites_of(gm)
    return {n.meta["ek_site"]: n for n in gm.graph.nodes if "ek_site" in n.meta}


@pytest.mark.parametrize("functional", [False, True])
def test_gated_sites_are_the_activations_multiplied_by_another_projection(functional):
    gm = ek.capture.capture(TinyBlock(functional))
    nodes = site_nodes(gm)
    gated_name = "silu" if functional else "mlp_act"
    assert set(nodes) == {"gelu", gated_name, "relu"}
    assert chains.gated_sites(gm, nodes.values()) == {nodes[gated_name]: chains.GATED}
    x = torch.randn(2, 5, 8)
    net = ek.linearize(TinyBlock(functional), [gated_name], x, plan="none")  # linearized: the marker is gated too
    markers = [n for n in net.graph.nodes if n.target is ek.sites.linearized]
    assert list(chains.gated_sites(net, markers)) == markers


def test_fold_reports_a_gated_site_as_cannot_fold():
    torch.manual_seed(0)
    model = TinyBlock().eval()
    x = torch.randn(2, 5, 8)
    net = ek.linearize(model, ["gelu", "mlp_act", "relu"], x, plan="merge").eval()
    folded = ek.fold(net, x, decide="merge")
    rows = {r["chain"]: r for r in decisions(folded)}
    assert rows["fc1"]["choice"] == "merge2"  # the GELU MLP merges
    assert rows["mlp_gate"]["choice"] == CANNOT_FOLD and rows["mlp_gate"]["why"] == chains.GATED
    assert rows["mlp_gate"]["site"] == "mlp_act" and rows["mlp_gate"]["layers"] == ["mlp.gate"]
    assert "fc3" not in rows  # a mul by a parameter is no gate, but no chain either: it stays as it is
    text = ek.format_decisions(decisions(folded))
    assert "cannot fold" in text and "gated unit" in text
    assert relative_error(folded(x), outputs(net, x)) <= 1e-5
    replayed = ek.fold(net, x, decide={r["chain"]: r["choice"] for r in decisions(folded)})  # a saved table replays
    assert decisions(replayed) == [{**r, "why": "replayed" if r["choice"] != CANNOT_FOLD else r["why"]}
                                   for r in decisions(folded)]


def calls(module, args, runtime):
    """Cost model: one per layer call, add and activation a planned chain runs."""
    if isinstance(module, ChainModule):
        return float(len(module.segments) + module.add_residual + (module.act is not None))
    return 1.0


def test_a_gated_site_gains_nothing_and_stays_selectable_by_entropy(monkeypatch):
    monkeypatch.setattr(planner, "_seconds", calls)
    monkeypatch.setattr(gains, "_seconds", calls)
    x = torch.randn(2, 5, 8)
    moves = {tuple(m["sites"]): m for m in gains.site_gains(TinyBlock().eval(), ["gelu", "mlp_act"], (x,), runtime="eager")}
    assert moves[("mlp_act",)] == {"sites": ["mlp_act"], "ms_saved": 0.0, "ms_before": 0.0, "pays": False,
                                   "excluded": chains.GATED}
    assert moves[("gelu",)]["pays"] and "excluded" not in moves[("gelu",)]
    scores = {"gelu": 0.5, "mlp_act": 0.1}
    assert select.choose_by_latency(scores, list(moves.values()), 1) == ["gelu"]  # the paying move first
    assert select.choose_by_latency(scores, list(moves.values()), 2) == ["gelu", "mlp_act"]
    assert select.choose(scores, 1) == ["mlp_act"]  # plain entropy takes it
