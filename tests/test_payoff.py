"""payoff: the multiply-adds and parameters a network runs with once folded, and its latency ratio
against the original with batch norms folded."""

import torch
import torch.nn as nn

import easier_kernels as ek
from easier_kernels import payoff


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.act2 = nn.Conv2d(4, 4, 1), nn.ReLU()
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.fc(x.mean((2, 3)))


X = torch.randn(2, 1, 6, 6)


def test_counts_are_the_folded_networks_multiply_adds_and_parameters():
    counts = payoff.counts(Tiny().eval(), X)
    # per sample: conv1 4x4x4 outputs x 9, conv2 4x4x4 x 4, fc 10 x 4; batch 2
    assert counts["macs"] == 2 * (64 * 9 + 64 * 4 + 10 * 4)
    # the batch norm is folded into conv1 (which gains a bias): 36 + 4, 16 + 4, 40 + 10
    assert counts["params"] == 40 + 20 + 50


def test_a_merged_chain_counts_as_the_one_layer_it_runs():
    net = ek.linearize(Tiny().eval(), ["act1"], X, plan="merge")
    folded = ek.fold(net, X, decide="merge", check=False)
    assert [r["choice"] for r in ek.recipe(folded)["fold"]["decisions"]] == ["merge2"]
    assert payoff.counts(folded, X) == {"macs": 2 * (64 * 9 + 10 * 4), "params": 36 + 4 + 50}
    assert not any(p.requires_grad for p in folded.parameters())  # an inference module: no autograd recorded


def test_measure_times_the_folded_network_against_the_original():
    model = Tiny().eval()
    net = ek.linearize(model, ["act1"], X)
    paid = payoff.measure(net, model, X)
    assert set(paid) == {"latency_ratio", "latency_ms", "baseline_ms", "macs", "params"}
    assert paid["latency_ratio"] > 0 and paid["baseline_ms"] > 0
    assert abs(paid["latency_ms"] - paid["baseline_ms"] * paid["latency_ratio"]) < 1e-3
    assert paid["macs"] <= payoff.counts(model, X)["macs"] * 2
