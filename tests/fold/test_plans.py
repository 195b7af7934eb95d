"""Plans chosen when a site is linearized, before fine-tuning: each plan's layout is exact after
training, a chain that stays separate keeps the original layout, the planner's choice is the
fastest plan, and the whole folded network falls back chain by chain where it would be slower."""

import hashlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import paper_or_torchvision

import easier_kernels as ek
from easier_kernels.fold import algebra, decisions, graph, planner
from easier_kernels.fold.chains import find_chains, fold_batch_norms
from easier_kernels.fold.plans import plan_label, plans, segments, signature


class InvertedResidual(nn.Module):
    """MobileNetV2's block: relu(x + pw(dw(pw(x)))) with its two inner activations, then a head."""

    def __init__(self, c=8, expand=4):
        super().__init__()
        h = c * expand
        self.pw1, self.bn1, self.act1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        self.dw, self.bn2, self.act2 = nn.Conv2d(h, h, 3, padding=1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6()
        self.pw2, self.bn3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, 4, 3, padding=1)

    def forward(self, x):
        y = self.bn3(self.pw2(self.act2(self.bn2(self.dw(self.act1(self.bn1(self.pw1(x))))))))
        return self.head(F.relu(x + y))


class DenseChain(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 (stride 2 first): a merge makes one 5x5 conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3, 2, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


def train_a_little(net, x, steps=3):
    """Fine-tuning: the weights and batch-norm statistics move after the layout was fixed."""
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    for _ in range(steps):
        opt.zero_grad()
        net(x).square().mean().backward()
        opt.step()
    return net.eval()


CASES = [(InvertedResidual, ["act1", "act2"], ["pw1", "dw", "pw2"], label)
         for label in ("separate", "merge3", "fused+sep", "sep+fused")] + \
        [(DenseChain, ["act"], ["conv1", "conv2"], label) for label in ("separate", "merge2")]


@pytest.mark.parametrize("model_cls, sites, layers, label", CASES,
                         ids=[f"{c[0].__name__}-{c[3]}" for c in CASES])
def test_each_plan_chosen_at_linearize_is_exact_after_fine_tuning(model_cls, sites, layers, label, monkeypatch):
    """Whatever plan the planner picks (forced here), linearize lays the padding out for it, the
    fine-tuning trains that layout, and fold follows the plan and reproduces the outputs."""
    monkeypatch.setattr(planner, "best_plan", lambda *args, **kwargs: (label, {"separate": 1.0, label: 0.5}))
    torch.manual_seed(0)
    model = model_cls().eval()
    x = torch.randn(4, model.conv1.in_channels if hasattr(model, "conv1") else 8, 10, 10)
    net = ek.linearize(model, sites, x)
    (record,) = ek.recipe(net)["plans"]
    assert record["layers"] == layers and record["plan"] == label and record["runtime"] == "eager"
    changed = [c["conv"] for c in ek.recipe(net)["padding"]]
    assert bool(changed) == ("merge" in label)  # padding moves only for a merge
    train_a_little(net, x)
    folded = ek.fold(net, x, check=False)
    (row,) = decisions(folded)
    assert row["choice"] == label and row["why"].startswith("planned by linearize")
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)


def _clock(module, args, runtime):
    """A made-up but fixed time per segment (from its signature): the planner's input in tests."""
    digest = hashlib.sha256(repr((signature(module), [a.shape for a in args])).encode()).digest()
    return 1e-3 * (1 + digest[0] / 255)


@pytest.mark.parametrize("name, fraction", [("paper-mobilenet_v2", 0.6), ("paper-vgg16_bn", 0.5), ("paper-resnet18", 0.7)])
def test_the_planner_finds_the_fastest_plan(name, fraction, monkeypatch):
    """Dynamic programming over segment times = the best of every plan enumerated (same clock),
    unless "separate" is within the margin."""
    monkeypatch.setattr(planner, "_seconds", _clock)
    torch.manual_seed(0)
    model = paper_or_torchvision(name).eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, names[: round(len(names) * fraction)], x, plan="none").eval()
    gm = ek.capture.capture(net).eval()
    fold_batch_norms(gm, (x,))
    chains = find_chains(gm)
    values = planner.chain_values(gm, chains, (x,))
    checked = 0
    for chain in chains:
        layers = [gm.get_submodule(t) for t in chain.targets]
        options = planner.segment_options(gm, chain, layers, values, fused=True, move=True)
        by_start = {(p.label, p.start): p for ps in options.values() for p in ps}
        choice, times = planner.best_plan(gm, chain, options, values, "eager")

        def total(plan):
            parts = [by_start.get((label, start)) for label, start, _ in segments(plan)]
            if None in parts:  # a merge of more than twice the work is no candidate
                return None
            return sum(planner.segment_seconds(gm, chain, p, values, "eager") for p in parts)

        if len(layers) > 6:
            continue  # too many plans to enumerate
        totals = {plan_label(p): t for p in plans(layers) if (t := total(p)) is not None}
        best = min(totals, key=totals.get)
        expected = "separate" if totals["separate"] <= totals[best] * (1 + planner.MARGIN) else best
        assert choice == expected, (chain.targets, totals)
        checked += 1
    assert checked


def test_a_separate_chain_keeps_the_original_layout():
    """Planned for real on this machine: a chain that stays separate moves nothing, so the
    linearized network computes no larger maps than the original."""
    model = paper_or_torchvision("paper-resnet18").eval()
    x = torch.randn(8, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    rng = torch.get_rng_state()
    net = ek.linearize(model, names[::2], x)
    assert torch.equal(torch.get_rng_state(), rng)  # planning draws no random numbers: training sees the same
    record = ek.recipe(net)
    moved = {c["conv"] for c in record["padding"]}
    for plan in record["plans"]:
        assert plan["plan"] in plan["candidates_ms"] and "separate" in plan["candidates_ms"]
        if "merge" not in plan["plan"]:
            assert not moved & set(plan["layers"]), plan
    original = {n: m.padding for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    for name, module in net.named_modules():
        if isinstance(module, nn.Conv2d) and name not in moved:
            assert module.padding == original[name]


@pytest.mark.parametrize("stride, groups", [(1, 1), (2, 1), (1, 4)])
def test_a_padded_pointwise_conv_runs_unpadded(stride, groups):
    """A 1x1 conv whose padding was moved for a merge that did not happen: run unpadded, its bias
    carried into the next conv's, exactly (float64)."""
    torch.manual_seed(0)
    first = nn.Conv2d(8, 8, 1, stride=stride, padding=stride * 1, groups=groups).double()
    second = nn.Conv2d(8, 8, 3, groups=8 if groups > 1 else 1).double()
    x = torch.randn(2, 8, 9, 7, dtype=torch.float64)
    a, b = algebra.unpad_pointwise(first, second)
    assert a.padding == (0, 0) and a.bias is None and b.padding == (1, 1)
    torch.testing.assert_close(b(a(x)), second(first(x)), rtol=1e-12, atol=1e-12)
    assert algebra.unpad_pointwise(nn.Conv2d(8, 8, 3, padding=1), second) is None  # not pointwise: no
    assert algebra.unpad_pointwise(first, nn.Conv2d(8, 8, 3, padding=1)) is None  # next one padded: no


def test_the_whole_network_falls_back_chain_by_chain_while_slower(monkeypatch):
    """Per-chain timings said merge; the whole network (made to) run slower with any merged chain:
    fold puts chains back to separate, least expected gain first, until it is not slower."""
    torch.manual_seed(0)
    model = paper_or_torchvision("paper-vgg16_bn").eval()
    x = torch.randn(2, 3, 32, 32)
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(model, names[1:8:2], x, plan="merge").eval()
    monkeypatch.setattr(planner, "_seconds", lambda module, args, runtime: 1e-3 * len(list(module.segments)))

    def slower_while_merged(calls, baseline, device, **kwargs):
        merged = sum(("fold_" in str(n.target)) for n in current["folded"].graph.nodes) if "folded" in current else 0
        ratio = 1.2 if merged else 0.95
        return {"baseline": {"ms": 1.0, "ratio": 1.0, "q1": 1.0, "q3": 1.0, "rounds": 5},
                "folded": {"ms": ratio, "ratio": ratio, "q1": ratio, "q3": ratio, "rounds": 5}}

    current = {}
    apply = graph._apply
    monkeypatch.setattr(graph, "_apply", lambda *a: current.__setitem__("folded", apply(*a)) or current["folded"])
    monkeypatch.setattr(graph, "compare", slower_while_merged)
    folded = ek.fold(net, x)
    rows = decisions(folded)
    latency = ek.recipe(folded)["fold"]["latency"]
    assert rows and all(r["choice"] == "separate" for r in rows)
    assert latency["fallbacks"] == [r["chain"] for r in rows] and latency["ratio"] == 0.95
    assert all(r["why"].startswith("fell back") for r in rows)
    torch.testing.assert_close(folded(x), net(x), rtol=1e-5, atol=1e-5)
