"""Selection rules: the paper's entropy rule, the naive orders, and the latency-aware rule."""

import pytest

from easier_kernels.select import SELECT, choose, choose_by_latency, site_order


def test_choose_takes_the_lowest_and_every_exact_zero():
    scores = {"a": 0.5, "b": 0.0, "c": 0.2, "d": 0.0, "e": 0.9}
    assert choose(scores, 1) == ["b", "d"]
    assert choose(scores, 3) == ["b", "d", "c"]
    assert choose({"a": 0.3, "b": 0.1, "c": 0.1}, 1) == ["b"]  # a tie keeps execution order


def test_naive_orders_depend_on_the_sites_and_seed_only():
    sites = [f"s{i}" for i in range(10)]
    assert site_order(sites, "first", 0) == sites and site_order(sites, "last", 0) == sites[::-1]
    assert site_order(sites, "random", 3) == site_order(list(sites), "random", 3) != site_order(sites, "random", 4)
    assert site_order(sites, "entropy", 0) is None and site_order(sites, "entropy_latency", 0) is None
    assert choose({"s3": 0.9, "s1": 0.1}, 1, order=sites) == ["s1"]
    assert "entropy_latency" in SELECT


def move(sites, ms, pays=True):
    return {"sites": sites, "ms_saved": ms, "ms_before": 1.0, "pays": pays}


def test_latency_rule_takes_the_least_entropy_per_ms_saved():
    entropy = {"a": 0.1, "b": 0.4, "c": 0.3, "d": 0.05}
    moves = [move(["a"], 0.01), move(["b"], 1.0), move(["c"], 0.5), move(["d"], 0.0, pays=False)]
    # per ms: a 10, b 0.4, c 0.6; d buys nothing and goes last although its entropy is the lowest
    assert choose_by_latency(entropy, moves, 1) == ["b"]
    assert choose_by_latency(entropy, moves, 3) == ["b", "c", "a"]
    assert choose_by_latency(entropy, moves, 4) == ["b", "c", "a", "d"]
    assert choose_by_latency(entropy, moves, 9) == ["b", "c", "a", "d"]  # fewer left than asked


def test_a_pair_that_only_pays_together_wins_and_goes_lowest_entropy_first():
    entropy = {"x": 0.5, "y": 0.2, "z": 0.1}
    moves = [move(["x"], 0.02), move(["y"], 0.02), move(["z"], 0.01), move(["x", "y"], 1.0)]
    assert choose_by_latency(entropy, moves, 1) == ["y"]  # (0.7 / 1.0) beats z's (0.1 / 0.01)
    assert choose_by_latency(entropy, moves, 2) == ["y", "x"]
    assert choose_by_latency(entropy, moves, 3) == ["y", "x", "z"]


def test_latency_rule_is_deterministic_and_ignores_moves_over_other_sites():
    entropy = {"a": 0.2, "b": 0.2, "c": 0.0, "d": 0.9}
    moves = [move(["a"], 0.1), move(["b"], 0.1), move(["gone", "d"], 5.0), move(["d"], 0.1, pays=False)]
    # a and b tie on every key but the order moves were listed in; c scores exactly 0 and always goes
    assert choose_by_latency(entropy, moves, 1) == ["a", "c"]
    assert all(choose_by_latency(dict(entropy), list(moves), 1) == ["a", "c"] for _ in range(3))
    assert choose_by_latency(entropy, [], 2) == ["c", "a"]  # nothing measured: the entropy rule


@pytest.mark.parametrize("k", [1, 2, 3])
def test_latency_rule_never_takes_fewer_than_asked_while_sites_are_left(k):
    entropy = {f"s{i}": 0.1 * i + 0.05 for i in range(5)}
    moves = [move([f"s{i}"], 0.1 * (5 - i)) for i in range(5)] + [move(["s0", "s1"], 2.0)]
    chosen = choose_by_latency(entropy, moves, k)
    assert len(chosen) == k == len(set(chosen))
