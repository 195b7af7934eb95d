"""payoff: the multiply-adds and parameters a network runs with once folded, and its latency ratio
against the original with batch norms folded."""

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import easier_kernels as ek
from easier_kernels import payoff, report, timing
from easier_kernels.fold import graph


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
    assert set(paid) == {"latency_ratio", "latency_ms", "baseline_ms", "latency_q1", "latency_q3", "noisy", "noisy_why",
                         "macs", "params"}
    assert paid["latency_q1"] <= paid["latency_ratio"] <= paid["latency_q3"] and isinstance(paid["noisy"], bool)
    assert paid["latency_ratio"] > 0 and paid["baseline_ms"] > 0
    assert abs(paid["latency_ms"] - paid["baseline_ms"] * paid["latency_ratio"]) < 1e-3
    assert paid["macs"] <= payoff.counts(model, X)["macs"] * 2


# ---- a latency the machine was too busy to measure is timed again, then said to be noisy


def timings(quartiles):
    """A `compare` stand-in answering each call with the next (q1, ratio, q3) of the folded network
    (the last one again once they run out), and the calls' keyword arguments it got."""
    calls = []

    def compare(candidates, baseline, device, **kwargs):
        q1, ratio, q3 = quartiles[min(len(calls), len(quartiles) - 1)]
        calls.append(kwargs)
        return {"baseline": {"ms": 2.0, "ratio": 1.0, "q1": 1.0, "q3": 1.0, "rounds": 5, "ms_q1": 1.98, "ms_q3": 2.02},
                "folded": {"ms": 2.0 * ratio, "ratio": ratio, "q1": q1, "q3": q3, "rounds": 5, "ms_q1": 2.0 * q1,
                           "ms_q3": 2.0 * q3}}

    return compare, calls


WIDE, TIGHT, NARROWER = (0.6, 0.9, 1.3), (0.89, 0.9, 0.91), (0.7, 0.9, 1.1)


def test_a_tight_timing_is_trusted_and_not_repeated(monkeypatch):
    compare, calls = timings([TIGHT])
    monkeypatch.setattr(graph, "compare", compare)
    model = Tiny().eval()
    paid = payoff.measure(ek.linearize(model, ["act1"], X), model, X)
    assert len(calls) == 1 and calls[0]["seconds"] == 1.0
    assert paid["noisy"] is False and paid["noisy_why"] == "" and (paid["latency_q1"], paid["latency_q3"]) == (0.89, 0.91)


def test_a_wide_timing_is_repeated_longer_and_the_narrowest_kept(monkeypatch):
    compare, calls = timings([WIDE, TIGHT])
    monkeypatch.setattr(graph, "compare", compare)
    model = Tiny().eval()
    paid = payoff.measure(ek.linearize(model, ["act1"], X), model, X)
    assert [(c["seconds"], c["max_rounds"]) for c in calls] == [(1.0, 60), (2.0, 120)]  # longer, with more rounds
    assert paid["noisy"] is False and (paid["latency_q1"], paid["latency_q3"]) == (0.89, 0.91)


def test_a_timing_still_wide_after_the_retries_is_recorded_noisy(monkeypatch):
    compare, calls = timings([WIDE, NARROWER, WIDE])
    monkeypatch.setattr(graph, "compare", compare)
    model = Tiny().eval()
    folded = ek.fold(ek.linearize(model, ["act1"], X), X, original=model)
    latency = ek.recipe(folded)["fold"]["latency"]
    assert len(calls) == 1 + timing.RETRIES
    assert latency["noisy"] is True and latency["tries"] == 3 and (latency["q1"], latency["q3"]) == (0.7, 1.1)
    assert "44% for the paired ratio" in latency["noisy_why"] and "the machine is busy" in latency["noisy_why"]
    text = ek.format_decisions(graph.decisions(folded), latency)
    assert "= 0.900x? (quartiles 0.700-1.100); noisy: interquartile range" in text


def test_the_baselines_own_times_spreading_wide_are_noisy_too():
    """A tight ratio with the original's own times all over the place: the machine was busy."""
    wide = {"baseline": {"ms": 2.0, "ratio": 1.0, "q1": 1.0, "q3": 1.0, "ms_q1": 1.0, "ms_q3": 4.0},
            "folded": {"ms": 1.8, "ratio": 0.9, "q1": 0.89, "q3": 0.91}}
    tries = []
    timed = timing.steady(lambda k: tries.append(k) or {k: dict(v) for k, v in wide.items()}, "folded", "baseline")
    assert tries == [0, 1, 2] and timed["folded"]["noisy"] and "150% for the baseline's own times" in \
        timed["folded"]["noisy_why"]


def test_a_timing_of_the_original_far_from_the_runs_start_is_noisy():
    paid = {"latency_ratio": 0.9, "latency_ms": 1.009, "baseline_ms": 1.121, "noisy": False, "noisy_why": ""}
    assert payoff.against_start(paid, 1.121 * payoff.DRIFT) == paid and payoff.against_start(paid, None) == paid
    late = payoff.against_start(paid, 307.9)  # the reported run: loaded at its start
    assert late["noisy"] and late["noisy_why"] == ("the original ran 1.121 ms in this timing but 307.900 ms at the start, "
                                                   "274.7x apart: the machine's load changed")
    assert payoff.against_start(paid, 0.4)["noisy"]  # either way


def test_a_prune_step_timed_under_another_load_than_the_start_is_noisy(monkeypatch):
    """The reported run: the original took 307.9 ms at the start, 1.121 ms in the steps."""
    starts = iter([307.9, 1.121, 1.121])

    def measure(net, original, example_inputs, *, runtime="eager", leaf_modules=None):
        return {"latency_ratio": 0.9, "latency_ms": 1.009, "baseline_ms": next(starts), "latency_q1": 0.89,
                "latency_q3": 0.91, "noisy": False, "noisy_why": "", "macs": 10, "params": 10}

    monkeypatch.setattr(payoff, "measure", measure)
    data = TensorDataset(torch.randn(8, 1, 6, 6), torch.randint(0, 10, (8,)))
    loader = DataLoader(data, batch_size=4)
    result = ek.prune(Tiny(), loader, loader, max_drop=100.0, max_steps=2, scoring="pass", progress=False,
                      finetune=lambda net, step: None, evaluate=lambda net: 90.0)
    assert result.baseline_payoff["latency_ms"] == 307.9 and result.baseline_payoff["noisy"] is False
    assert [s.noisy for s in result.history] == [True, True] and [s.baseline_ms for s in result.history] == [1.121] * 2
    assert "307.900 ms at the start" in result.history[0].noisy_why and result.payoff["noisy"]
    record = result.to_dict()
    assert record["steps"][0]["noisy"] and record["steps"][0]["latency_q1"] == 0.89
    summary = report.summary(record)
    assert "1.121 ms -> 1.009 ms = 0.900x? the original with batch norms folded; the original ran 307.900 ms at the " \
           "start; noisy: q1-q3 0.890-0.910x (the original ran 1.121 ms" in summary
