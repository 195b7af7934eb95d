"""The latency gain of linearizing each site, measured before choosing: which units a move changes,
the plan each would get, pairs that only pay together. Timing is replaced by a cost model (one
unit per layer call, add and activation), so the expected gains are exact on any machine."""

import pytest
import torch
import torch.nn as nn

import easier_kernels as ek
from easier_kernels.fold import gains, planner
from easier_kernels.fold.chains import find_chains, fold_batch_norms
from easier_kernels.fold.plans import ChainModule


class Bottleneck(nn.Module):
    """relu3(x + conv3(relu2(conv2(relu1(conv1(x)))))), then a pooled activation and a head."""

    def __init__(self, c=4, h=8):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(c, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(h, h, 3, padding=1, bias=False), nn.BatchNorm2d(h), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(h, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU()
        self.pool, self.relu4, self.fc = nn.AdaptiveAvgPool2d(1), nn.ReLU(), nn.Linear(c, 10)

    def forward(self, x):
        y = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        y = self.relu3(x + self.bn3(self.conv3(y)))
        return self.fc(self.relu4(self.pool(y)).flatten(1))


def calls(module, args, runtime):
    """The cost model: a chain as planned costs one per layer call, add and activation it runs."""
    if isinstance(module, ChainModule):
        return float(len(module.segments) + module.add_residual + (module.act is not None))
    return 1.0  # an activation on its own


@pytest.fixture
def cost_model(monkeypatch):
    monkeypatch.setattr(planner, "_seconds", calls)
    monkeypatch.setattr(gains, "_seconds", calls)


SITES = ["relu1", "relu2", "relu3", "relu4"]
X = torch.randn(1, 4, 6, 6)


def by_sites(moves):
    return {tuple(m["sites"]): (m["ms_saved"] / 1e3, m["ms_before"] / 1e3, m["pays"]) for m in moves}


def test_each_move_saves_what_its_changed_units_cost_before_minus_after(cost_model):
    model = Bottleneck().eval()
    moves = by_sites(gains.site_gains(model, SITES, (X,), runtime="inductor"))
    # units now: [conv1]+relu1 (2), [conv2]+relu2 (2), [conv3]+add+relu3 (3), relu4 alone (1), [fc] (1)
    assert set(moves) == {("relu1",), ("relu2",), ("relu3",), ("relu4",), ("relu1", "relu2"), ("relu2", "relu3")}
    assert moves[("relu1",)] == (2.0, 4.0, True)        # conv1+conv2 merge: one call and relu2 (2)
    assert moves[("relu2",)] == (2.0, 5.0, True)        # conv2+conv3 merge, the add, relu3 (3)
    assert moves[("relu3",)] == (1.0, 3.0, True)        # its own call: the pool ends the chain
    assert moves[("relu4",)] == (1.0, 1.0, True)        # an activation after a pooling: just its call
    # together: conv1..conv3 merge with the identity residual inside, then relu3 (2): more than the two alone
    assert moves[("relu1", "relu2")] == (5.0, 7.0, True)
    assert moves[("relu2", "relu3")] == (3.0, 5.0, True)


def test_a_recorded_plan_is_what_the_unit_costs_now(cost_model):
    net = ek.linearize(Bottleneck().eval(), ["relu1"], X, runtime="inductor")
    assert [r["plan"] for r in ek.recipe(net)["plans"]] == ["merge2"]
    moves = by_sites(gains.site_gains(net, ["relu2", "relu3", "relu4"], (X,), runtime="inductor"))
    assert moves[("relu2",)] == (5.0 - 2.0, 5.0, True)  # merge2 + relu2 (2) and conv3's unit (3) -> merge3 (2)
    net.meta["easier_kernels"]["plans"][0]["plan"] = "separate"  # a chain kept separate costs its two calls
    moves = by_sites(gains.site_gains(net, ["relu2", "relu3", "relu4"], (X,), runtime="inductor"))
    assert moves[("relu2",)] == (6.0 - 2.0, 6.0, True)


def test_a_move_that_changes_nothing_does_not_pay(cost_model):
    class Leafy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU())
            self.fc = nn.Linear(4, 10)

        def forward(self, x):
            return self.fc(self.body(x).mean((2, 3)))

    moves = gains.site_gains(Leafy().eval(), ["body.1"], (X,), runtime="inductor", leaf_modules=["body"])
    assert moves == [{"sites": ["body.1"], "ms_saved": 0.0, "ms_before": 0.0, "pays": False}]  # inside a leaf


def test_hypothetical_identities_join_units_like_a_linearization_does():
    gm = ek.linearize(Bottleneck().eval(), [], X, plan="none")
    fold_batch_norms(gm, (X,))
    relu1 = next(n for n in gm.graph.nodes if n.name == "relu1")
    assert [u.targets for u in find_chains(gm, min_layers=1)] == [["conv1"], ["conv2"], ["conv3"], ["fc"]]
    assert find_chains(gm) == []
    joined = find_chains(gm, min_layers=1, identities={relu1})
    assert [u.targets for u in joined][:2] == [["conv1", "conv2"], ["conv3"]]
    assert joined[0].act.name == "relu2"
    real = ek.linearize(Bottleneck().eval(), ["relu1"], X, plan="none")
    fold_batch_norms(real, (X,))
    assert [u.targets for u in find_chains(real, min_layers=1)] == [u.targets for u in joined]


def test_gains_are_timed_in_the_runtime_on_the_real_shapes():
    model = Bottleneck().eval()
    moves = gains.site_gains(model, SITES, (X,), runtime="eager")
    assert len(moves) == 6 and all(m["ms_before"] >= 0 and isinstance(m["pays"], bool) for m in moves)
    assert all(m["pays"] == (m["ms_saved"] > planner.MARGIN * m["ms_before"] and m["ms_saved"] > 0) for m in moves)
