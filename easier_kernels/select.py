"""Selection rules: which sites a pruning step removes.

    order = site_order(sites, "random", seed)            # a naive rule's fixed order (None for the others)
    chosen = choose(scores, k, order)                    # the paper's rule, or the next k in `order`
    chosen = choose_by_latency(scores, moves, k)         # entropy and measured latency gain together

"entropy" (the paper's rule) takes the k lowest-entropy sites. "output_change" takes the k sites
whose linearization alone moves the network's logits least (`scores.output_change`, measured on the
current network before each step, on validation batches): `choose` on those values instead of the
entropies. "entropy_latency" (ours, DESIGN.md "Beyond the paper") spends the accuracy budget where
it buys speed: choosing which sites to linearize so as to save a latency at the least information
lost is a knapsack (each move has a weight, its entropy, and a value, the ms it saves), and the
knapsack's classic greedy takes items by weight per value. So moves (one site, or two that only
together form a mergeable chain; see `fold.gains`) go by least entropy per ms saved; a move's sites
go lowest entropy first. The gains are measured again after every step (fine-tuning changes the
entropies, each linearization the chains), which keeps the greedy honest where gains do not add up.
Sites whose linearization does not pay (no chain, a gain within timing noise) come last, by entropy
alone. Every rule is a pure function of its inputs: the same scores and gains give the same choice.
"""

from __future__ import annotations

import random

__all__ = ["SELECT", "site_order", "choose", "choose_by_latency"]

# the method's rule, ours, the training-free score that predicts the removal cost best
# (docs/RESULTS.md, "What makes a layer removable"), and the naive rules they are measured against
SELECT = ("entropy", "entropy_latency", "output_change", "random", "first", "last")


def site_order(site_names: list, select: str, seed: int | None) -> list | None:
    """The fixed removal order of a naive rule (None for the entropy rules): a function of the
    sites and the seed only, so a resumed run continues it without saved state."""
    if select == "first":
        return list(site_names)
    if select == "last":
        return site_names[::-1]
    if select == "random":
        order = list(site_names)
        random.Random(seed).shuffle(order)
        return order
    return None


def choose(candidates: dict, k: int, order: list | None = None) -> list:
    """The next k candidates in `order`; without one, the k lowest-entropy sites and every site
    scoring exactly 0 (ties keep execution order)."""
    if order is not None:
        return [n for n in order if n in candidates][:k]
    ranked = sorted(candidates, key=candidates.__getitem__)
    return ranked[:k] + [n for n in ranked[k:] if candidates[n] == 0.0]


def choose_by_latency(candidates: dict, moves: list[dict], k: int) -> list:
    """At least k sites (fewer when fewer are left): the sites of the paying moves by least
    entropy per ms saved, then the rest by entropy; and every site scoring exactly 0.

    candidates: site -> entropy (the sites that may go). moves: [{"sites", "ms_saved", "pays"}]
    as `fold.gains.site_gains` measures them; a move naming a site not in candidates is ignored.
    Ties go to the lower entropy, then to the first move listed (execution order)."""
    position = {name: i for i, name in enumerate(candidates)}
    usable = [(i, m) for i, m in enumerate(moves)
              if m["pays"] and m["sites"] and all(s in candidates for s in m["sites"])]

    def cost(entry):
        i, move = entry
        entropy = sum(candidates[s] for s in move["sites"])
        return entropy / move["ms_saved"], entropy, i

    chosen = []
    for _, move in sorted(usable, key=cost):
        for site in sorted(move["sites"], key=lambda s: (candidates[s], position[s])):
            if len(chosen) < k and site not in chosen:
                chosen.append(site)
    rest = sorted((s for s in candidates if s not in chosen), key=lambda s: (candidates[s], position[s]))
    chosen += rest[:max(0, k - len(chosen))]
    return chosen + [s for s in candidates if candidates[s] == 0.0 and s not in chosen]
