"""The removal-cost oracle (each site linearized alone, with and without fine-tuning), its cache,
and the rank statistics that judge a score against it."""

import copy
import json
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import easier_kernels as ek
from easier_kernels import oracle
from easier_kernels.checkpoints import seed_everything
from easier_kernels.oracle import agreement, finetuned_cost, kendall, removal_costs, spearman, top_k_overlap
from easier_kernels.train import accuracy, fit


def _task():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(192, 6)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    train = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    val = DataLoader(TensorDataset(x[:96], y[:96]), batch_size=48)
    fit(model, train, 3, lr=0.05)
    return model, train, val


def test_the_costs_are_the_hand_computed_drops_and_nothing_of_the_caller_s_changes():
    model, train, val = _task()
    before = copy.deepcopy(model.state_dict())
    torch.manual_seed(123)
    state = torch.get_rng_state()
    costs = removal_costs(model, train, val, seeds=(0, 1), plan="none")
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream kept
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert list(costs) == ["_1", "_3"]
    baseline = accuracy(model, val)
    example = next(iter(val))[0][:1]
    for site, cost in costs.items():
        net = ek.linearize(model, [site], example, plan="none")
        assert cost["untrained"] == baseline - accuracy(net, val)
        for seed in (0, 1):  # every site of a seed fine-tunes from the same random state
            seed_everything(seed)
            tuned = copy.deepcopy(net)
            fit(tuned, train, 1)
            assert cost["finetuned"][str(seed)] == baseline - accuracy(tuned, val)
    assert finetuned_cost(costs)["_1"] == pytest.approx(sum(costs["_1"]["finetuned"].values()) / 2)


def test_the_cache_measures_only_what_is_missing_and_survives_a_kill(tmp_path, monkeypatch):
    model, train, val = _task()
    cache = tmp_path / "costs.json"
    fits = []
    real_fit = oracle.fit

    def counted_fit(net, *args, **kwargs):
        fits.append(kwargs["desc"])
        if kwargs["desc"] == "_3 seed 0" and len(fits) == 2:
            raise KeyboardInterrupt  # killed while fine-tuning the second site
        return real_fit(net, *args, **kwargs)

    monkeypatch.setattr(oracle, "fit", counted_fit)
    with pytest.raises(KeyboardInterrupt):
        removal_costs(model, train, val, seeds=(0,), plan="none", cache=cache)
    saved = json.loads(cache.read_text())
    assert set(saved["sites"]["_1"]) == {"untrained", "finetuned"} and saved["sites"]["_1"]["finetuned"].keys() == {"0"}
    assert saved["sites"]["_3"] == {"finetuned": {}, "untrained": saved["sites"]["_3"]["untrained"]}
    fits.clear()
    resumed = removal_costs(model, train, val, seeds=(0,), plan="none", cache=cache)
    assert fits == ["_3 seed 0"]  # only what was missing
    fits.clear()
    more = removal_costs(model, train, val, seeds=(0, 1), plan="none", cache=cache)
    assert fits == ["_1 seed 1", "_3 seed 1"]
    assert all(more[s]["finetuned"]["0"] == resumed[s]["finetuned"]["0"] for s in more)
    fits.clear()
    monkeypatch.setattr(oracle, "fit", real_fit)
    fresh = removal_costs(model, train, val, seeds=(0, 1), plan="none")  # no cache: the same numbers
    assert fresh == more


def test_a_cache_of_other_weights_or_options_is_refused(tmp_path):
    model, train, val = _task()
    cache = tmp_path / "costs.json"
    removal_costs(model, train, val, seeds=(), plan="none", cache=cache)
    with pytest.raises(ValueError, match=r"written for other options .*delete it or pass another cache"):
        removal_costs(model, train, val, seeds=(), plan="none", lr=0.1, cache=cache)
    weights = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        model[0].weight[0, 0] += 1
    with pytest.raises(ValueError, match="written for other weights"):
        removal_costs(model, train, val, seeds=(), plan="none", cache=cache)
    model.load_state_dict(weights)
    other = DataLoader(TensorDataset(*val.dataset[48:]), batch_size=48)
    with pytest.raises(ValueError, match="measured on other validation data"):
        removal_costs(model, train, other, seeds=(), plan="none", cache=cache)
    cache.write_text("{torn")
    with pytest.raises(ValueError, match="cannot read the cost cache"):
        removal_costs(model, train, val, seeds=(), plan="none", cache=cache)


def test_rank_statistics_against_hand_values():
    names = ["a", "b", "c", "d"]
    score = dict(zip(names, [1, 2, 3, 4]))
    assert spearman(score, dict(zip(names, [1, 3, 2, 4]))) == pytest.approx(0.8)  # 1 - 6 * 2 / (4 * 15)
    assert kendall(score, dict(zip(names, [1, 3, 2, 4]))) == pytest.approx(4 / 6)  # 5 concordant, 1 discordant
    assert spearman(score, dict(zip(names, [4, 3, 2, 1]))) == pytest.approx(-1)
    # ties: tau-b = (C - D) / sqrt((pairs untied in a) (pairs untied in b)) = 2 / sqrt(2 * 3)
    assert kendall({"a": 1, "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 3}) == pytest.approx(2 / math.sqrt(6))
    # spearman with ties: ranks (1.5, 1.5, 3) against (1, 2, 3)
    assert spearman({"a": 1, "b": 1, "c": 2}, {"a": 1, "b": 2, "c": 3}) == pytest.approx(math.sqrt(3) / 2)
    # NaN sites are left out, inf ranks last, sites of one side only are ignored
    assert spearman({"a": 1, "b": math.nan, "c": math.inf, "z": 0}, {"a": 0, "b": 5, "c": 1}) == pytest.approx(1)
    assert math.isnan(kendall({"a": 1}, {"a": 2})) and math.isnan(spearman({"a": 1, "b": 1}, {"a": 1, "b": 2}))
    assert top_k_overlap(score, dict(zip(names, [2, 1, 4, 3])), 2) == 1.0
    assert top_k_overlap(score, dict(zip(names, [4, 3, 2, 1])), 2) == 0.0
    assert agreement(score, score, 3) == {"spearman": 1.0, "kendall": 1.0, "top_k": 1.0}
