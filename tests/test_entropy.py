"""entropy_scores and EntropyMeter: faithful to the reference formula, exact counts, no side
effects, ride-along during training, clear errors."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.entropy import binary_entropy
from easier_kernels.activations import ACTIVATION_MODULES
from helpers import Gate, WithGate, real_batches

PAPER = ["resnet18", "vgg16_bn", "mobilenet_v2"]


def reference_scores(model, batches):
    """The reference code's computation, written independently: forward hooks on the separate
    activation modules store each input; per batch and layer, per-neuron on-fraction, binary
    entropy, mean, .item(); averaged over batches. Also returns pooled integer counts."""
    stored = {}
    paths = {m: p for p, m in model.named_modules()}
    hooks = [m.register_forward_pre_hook(lambda m, a: stored.__setitem__(paths[m], a[0].detach().clone()))
             for m in model.modules() if type(m) in ACTIVATION_MODULES]
    per_batch, counts, totals = {}, {}, {}
    with torch.no_grad():
        for images, _ in batches:
            stored.clear()
            model(images)
            for path, x in stored.items():
                dims = [d for d in range(x.dim()) if d != 1]
                on = (x >= 0)
                p = on.double().mean(dims)
                h = -(torch.where(p > 0, p * torch.log2(p), 0) + torch.where(p < 1, (1 - p) * torch.log2(1 - p), 0))
                per_batch.setdefault(path, []).append(h.mean().item())
                counts[path] = counts.get(path, 0) + on.sum(dims)
                totals[path] = totals.get(path, 0) + x.numel() // x.shape[1]
    for h in hooks:
        h.remove()
    return {p: sum(v) / len(v) for p, v in per_batch.items()}, counts, totals


def test_binary_entropy_values():
    p = torch.tensor([0.0, 1.0, 0.5, 0.25], dtype=torch.float64)
    expected = [0.0, 0.0, 1.0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]
    assert binary_entropy(p).tolist() == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("name", PAPER)
def test_batch_mean_reproduces_the_reference_code(name):
    torch.manual_seed(0)
    model = ek.models.paper_model(name, width=0.25).train()  # the paper scores in train mode
    batches = real_batches(3, 32)
    expected, expected_counts, _ = reference_scores(model, batches)
    scores = ek.entropy_scores(model, batches, mode="batch_mean")
    sites = ek.find_sites(model, batches[0][0])
    assert list(scores) == [s.name for s in sites] and scores.batches == 3
    for site in sites:
        assert scores[site.name] == pytest.approx(expected[site.module], abs=1e-6)
        assert torch.equal(scores.counts[site.name], expected_counts[site.module])  # integers: exact


@pytest.mark.parametrize("name", PAPER)
def test_pooled_is_the_entropy_of_pooled_counts(name):
    torch.manual_seed(0)
    model = ek.models.paper_model(name, width=0.25).eval()
    batches = real_batches(3, 16)
    _, counts, totals = reference_scores(model, batches)
    scores = ek.entropy_scores(model, batches)
    assert scores.mode == "pooled"
    for site in ek.find_sites(model, batches[0][0]):
        assert scores.totals[site.name] == totals[site.module]
        p = counts[site.module].double() / totals[site.module]
        assert torch.equal(scores.counts[site.name], counts[site.module])
        assert scores[site.name] == pytest.approx(binary_entropy(p).mean().item(), abs=1e-12)
        assert 0.0 <= scores[site.name] <= 1.0


def test_batch_mean_is_at_most_pooled():
    """Binary entropy is concave: the mean of per-batch entropies cannot exceed the pooled one."""
    model = ek.models.resnet18(width=0.25).train()
    batches = real_batches(4, 16)
    pooled = ek.entropy_scores(model, batches, mode="pooled")
    batch_mean = ek.entropy_scores(model, batches, mode="batch_mean")
    assert all(batch_mean[n] <= pooled[n] + 1e-12 for n in pooled)
    assert all(torch.equal(batch_mean.counts[n], pooled.counts[n]) for n in pooled)


def state(model):
    return ({k: v.clone() for k, v in model.state_dict(keep_vars=False).items()},
            [(m.training) for m in model.modules()], [p.requires_grad for p in model.parameters()])


def test_scoring_changes_no_model_state():
    model = ek.models.mobilenet_v2(width=0.25).train()
    model.features[3].eval()                              # mixed modes must survive as they are
    model.features[0][0].weight.requires_grad_(False)      # and frozen parameters stay frozen
    batches = real_batches(2, 16)
    with torch.no_grad():
        model(batches[0][0])  # non-trivial running statistics
    before = state(model)
    for mode in ("pooled", "batch_mean"):
        ek.entropy_scores(model, batches, mode=mode)
    after = state(model)
    assert before[1] == after[1] and before[2] == after[2]
    assert before[0].keys() == after[0].keys()
    for key, value in before[0].items():
        assert torch.equal(value, after[0][key]), key
    batch_norm = next(m for m in model.features[1].modules() if isinstance(m, nn.BatchNorm2d))
    assert batch_norm.num_batches_tracked.item() == 1


def _batch_sizes_seen(module) -> list:
    """The batch sizes `module` sees, call by call (forward pre-hooks run in the model and in any
    graph captured from it)."""
    seen = []
    module.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    return seen


def test_a_scoring_pass_runs_the_full_batch_only_to_score():
    """Capture, its check and shape recording run two samples: the user's batch is run only by
    the pass itself (the regression of issue 26: three extra full-batch forwards per pass)."""
    model = SmallNet().eval()
    seen = _batch_sizes_seen(model.conv1)
    batches = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    ek.entropy_scores(model, batches)
    assert seen.count(16) == len(batches) and set(seen) == {2, 16}, seen
    seen.clear()
    meter = ek.EntropyMeter(model, example_inputs=batches[0])
    assert seen and set(seen) == {2}, seen
    meter.close()


class Stochastic(nn.Module):
    """Dropout, stochastic depth (torchvision's) and noise drawn in the forward: every random stream a
    training forward reads."""

    def __init__(self):
        super().__init__()
        from easier_kernels.compat import import_torchvision

        stochastic_depth = import_torchvision().ops.StochasticDepth
        self.conv, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.drop, self.depth = nn.Dropout(0.3), stochastic_depth(0.5, "row")
        self.act, self.act2 = nn.ReLU(), nn.GELU()

    def forward(self, x):
        h = self.act(self.conv(x))
        h = h + self.depth(self.conv2(self.drop(h)))
        return self.act2(h + 0.1 * torch.randn_like(h))


@pytest.mark.parametrize("mode", ["pooled", "batch_mean"])
def test_scoring_leaves_the_random_streams_as_the_model_would(mode):
    """In train mode, scoring draws exactly the random numbers the model's own forwards draw:
    the same scores as hooks on the model under the same seed, and the caller's stream after
    it where the model's own forwards leave it."""
    model = Stochastic().train()
    batches = [(torch.randn(8, 3, 6, 6), None) for _ in range(3)]
    torch.manual_seed(0)
    expected_batch_mean, expected_counts, _ = reference_scores(model, batches)
    after_model = torch.rand(4)
    torch.manual_seed(0)
    scores = ek.entropy_scores(model, batches, mode=mode)
    assert torch.equal(torch.rand(4), after_model)
    for site, path in zip(scores, ("act", "act2")):
        assert torch.equal(scores.counts[site], expected_counts[path])
        if mode == "batch_mean":
            assert math.isclose(scores[site], expected_batch_mean[path], rel_tol=1e-9, abs_tol=1e-12)


def test_capturing_and_finding_sites_draw_no_random_numbers():
    model = Stochastic().train()
    x = torch.randn(8, 3, 6, 6)
    for stage in (lambda: ek.find_sites(model, x), lambda: ek.linearize(model, ["act"], x, plan="none"),
                  lambda: ek.EntropyMeter(model, example_inputs=x).close()):
        torch.manual_seed(0)
        expected = torch.rand(4)
        torch.manual_seed(0)
        stage()
        assert torch.equal(torch.rand(4), expected)


def test_batches_as_tensors_tuples_and_max_batches():
    model = ek.models.resnet18(width=0.25).eval()
    batches = real_batches(3, 8)
    tuples = ek.entropy_scores(model, batches, max_batches=2)
    tensors = ek.entropy_scores(model, [b[0] for b in batches[:2]])
    assert tuples.batches == 2 and dict(tuples) == dict(tensors)


def test_a_subset_of_sites_and_the_ranking():
    model = ek.models.vgg16_bn(width=0.25).eval()
    batches = real_batches(1, 8)
    names = [s.name for s in ek.find_sites(model, batches[0][0])]
    scores = ek.entropy_scores(model, batches, sites=[names[5], names[1]])
    assert list(scores) == [names[1], names[5]]
    assert scores.ranking() == sorted(scores, key=scores.get)
    assert set(scores.to_dict()["sites"]) == {names[1], names[5]}


def test_bad_input_errors():
    model = ek.models.resnet18(width=0.25)
    with pytest.raises(ValueError, match="no batches"):
        ek.entropy_scores(model, [])
    with pytest.raises(TypeError, match="float tensors"):
        ek.entropy_scores(model, [torch.zeros(2, 3, 32, 32, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="valid site names: relu, layer1_0_relu1"):
        ek.entropy_scores(model, [torch.zeros(2, 3, 32, 32)], sites=["nope"])
    with pytest.raises(ValueError, match="mode must be one of pooled, batch_mean"):
        ek.entropy_scores(model, [torch.zeros(2, 3, 32, 32)], mode="mean")
    with pytest.raises(ValueError, match="max_batches"):
        ek.entropy_scores(model, [torch.zeros(2, 3, 32, 32)], max_batches=0)


class NaNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return F.relu(self.fc(x) * torch.tensor([1.0, float("nan"), 1.0]))


def test_nan_activations_are_counted_and_reported():
    x = torch.randn(10, 4)
    with pytest.warns(UserWarning, match="10 NaN"):
        scores = ek.entropy_scores(NaNNet(), [x])
    name = next(iter(scores))
    assert scores.nan_counts[name].tolist() == [0, 10, 0]
    assert math.isnan(scores.probabilities[name][1].item())
    assert not math.isnan(scores[name])  # the layer entropy is over the channels that hold numbers


# ---- ride-along


def test_meter_rides_along_a_training_loop():
    torch.manual_seed(0)
    model = ek.models.resnet18(width=0.25).train()
    twin = ek.models.resnet18(width=0.25).train()
    twin.load_state_dict(model.state_dict())
    meter = ek.EntropyMeter(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    batches = real_batches(2, 16)
    for images, labels in batches:
        for net, optimizer in ((meter.model, opt), (twin, twin_opt)):
            optimizer.zero_grad()
            F.cross_entropy(net(images), labels).backward()
            optimizer.step()
    # same training as the plain model: the probes compute the ordinary activation and gradient
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(v, w, rtol=1e-4, atol=1e-5, msg=k)
    scores = meter.scores()
    assert scores.batches == 2 and len(scores) == 17
    assert all(c.sum() > 0 for c in scores.counts.values())
    with meter.paused():
        meter.model(batches[0][0])
    assert meter.scores().batches == 2  # paused: nothing counted


def test_meter_reset_counts_only_what_comes_after():
    """After reset() the meter holds exactly what a fresh meter on the same model gets from the
    later batches: counts, NaN counts, totals, batches and entropies, in both modes."""
    torch.manual_seed(0)
    model = ek.models.resnet18(width=0.25).eval()
    before, after = real_batches(3, 8)[:2], real_batches(3, 8)[2:]
    for mode in ("pooled", "batch_mean"):
        meter = ek.EntropyMeter(model, mode=mode)
        with torch.no_grad():
            for images, _ in before:
                meter.model(images)
        assert meter.scores().batches == 2
        meter.reset()
        with pytest.raises(RuntimeError, match="run batches through meter.model"):
            meter.scores()  # nothing counted since the reset
        with torch.no_grad():
            for images, _ in after:
                meter.model(images)
        got = meter.scores()
        fresh = ek.entropy_scores(model, after, mode=mode)
        assert got.batches == fresh.batches == 1
        assert got.totals == fresh.totals
        assert dict(got) == dict(fresh)
        for name in fresh:
            assert torch.equal(got.counts[name], fresh.counts[name]), name
            assert torch.equal(got.nan_counts[name], fresh.nan_counts[name]), name
        meter.close()


class SmallNet(nn.Module):
    """A small conv net with every kind of site: a module (in place), functional calls, an
    in-place call whose input is read again (an unfused probe), a residual, a linear head."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True)
        self.conv2, self.conv3 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc, self.out = nn.Linear(8, 16), nn.Linear(16, 10)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = F.gelu(self.conv2(h)) + h
        g = self.conv3(h)
        F.relu_(g)
        h = (g + 2 * g).mean((2, 3))
        return self.out(F.silu(self.fc(h)))


def _train(net, steps, batches, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for images, labels in batches[:steps]:
        opt.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        opt.step()


def _compiled(net):
    """torch.compile(net) on a backend that counts its compilations; graph-break counters cleared."""
    from torch._dynamo.testing import CompileCounterWithBackend
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    backend = CompileCounterWithBackend("aot_eager")
    return torch.compile(net, backend=backend), backend, counters


def _assert_same_counts(got, expected, batches):
    assert got.batches == expected.batches == batches and got.totals == expected.totals
    for name in expected:
        assert torch.equal(got.counts[name], expected.counts[name]), name
        assert torch.equal(got.nan_counts[name], expected.nan_counts[name]), name
        assert got[name] == pytest.approx(expected[name], abs=1e-12)


def _twins(mode, example_inputs):
    """The same SmallNet twice, an eager meter on one and a meter for compiling on the other."""
    torch.manual_seed(0)
    images, labels = torch.randn(5, 4, 3, 8, 8), torch.randint(0, 10, (5, 4))
    batches = list(zip(images, labels))
    eager_model = SmallNet().train()
    compiled_model = SmallNet().train()
    compiled_model.load_state_dict(eager_model.state_dict())
    eager = ek.EntropyMeter(eager_model, mode=mode)
    meter = ek.EntropyMeter(compiled_model, mode=mode, example_inputs=example_inputs)
    return batches, eager_model, compiled_model, eager, meter


@pytest.mark.parametrize("mode", ["pooled", "batch_mean"])
def test_compiled_training_compiles_once_and_counts_as_eager(mode):
    """With example_inputs, torch.compile(meter.model) compiles one graph for every step (the
    probes' state is tensors updated in place, allocated before the first call), with no graph
    break, and counts what the eager meter counts over the same training. Pausing adds one
    graph; reset() none."""
    batches, eager_model, compiled_model, eager, meter = _twins(mode, torch.randn(2, 3, 8, 8))
    assert [p.fused for p in meter.probes.values()] == [True, True, False, True]
    assert all(p.counts is not None for p in meter.probes.values())  # allocated before the first call
    assert all(p.counts is None for p in eager.probes.values())

    step, backend, counters = _compiled(meter.model)
    _train(eager.model, 4, batches, eager_model)
    _train(step, 4, batches, compiled_model)
    assert backend.frame_count == 1, f"{backend.frame_count} compilations for 4 steps"
    assert dict(counters["graph_break"]) == {}
    assert counters["stats"]["unique_graphs"] == 1
    _assert_same_counts(meter.scores(), eager.scores(), 4)

    # reset() zeroes the same tensors: the graph stays valid; pausing adds one graph, once
    meter.reset()
    eager.reset()
    _train(step, 1, batches[4:], compiled_model)
    _train(eager.model, 1, batches[4:], eager_model)
    assert backend.frame_count == 1
    for net, m in ((step, meter), (eager.model, eager)):
        with m.paused():
            net(batches[0][0])
            net(batches[1][0])
        net(batches[2][0])
    assert backend.frame_count == 2 and dict(counters["graph_break"]) == {}
    got, expected = meter.scores(), eager.scores()
    assert got.batches == expected.batches == 2 and got.totals == expected.totals
    assert all(torch.equal(got.counts[n], expected.counts[n]) for n in expected)


@pytest.mark.parametrize("mode", ["pooled", "batch_mean"])
def test_compiled_training_without_example_inputs_compiles_at_most_twice(mode):
    """Without example_inputs the counts are allocated at the first call: one extra compilation
    at the first step, then none; the counts are the eager meter's."""
    batches, eager_model, compiled_model, eager, meter = _twins(mode, None)
    assert all(p.counts is None for p in meter.probes.values())
    step, backend, counters = _compiled(meter.model)
    _train(eager.model, 4, batches, eager_model)
    _train(step, 4, batches, compiled_model)
    assert backend.frame_count <= 2, f"{backend.frame_count} compilations for 4 steps"
    assert dict(counters["graph_break"]) == {}
    _assert_same_counts(meter.scores(), eager.scores(), 4)


class Unsized(nn.Module):
    """Channel counts only shapes tell (after a cat, after a flatten: it depends on the input size)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 1)

    def forward(self, x):
        h = torch.relu(torch.cat([self.a(x), self.b(x)], 1))
        return F.relu(h.flatten(1))


@pytest.mark.parametrize("model,x,leaf_modules", [
    (Unsized(), torch.randn(2, 3, 4, 4), None),
    (ek.models.resnet18(width=0.25), torch.randn(2, 3, 32, 32), None),
    (WithGate(), torch.randn(2, 3, 8, 8), [Gate]),
], ids=["unsized", "resnet18", "leaf_sites"])
def test_example_inputs_allocate_what_find_sites_finds(model, x, leaf_modules):
    """The meter's channel counts come from the shapes find_sites reads (one shape pass), and
    with them the counts are exact from the first call."""
    expected = {s.name: s.channels for s in ek.find_sites(model, x, leaf_modules=leaf_modules)}
    fresh = ek.entropy_scores(model, [x], leaf_modules=leaf_modules)
    meter = ek.EntropyMeter(model, example_inputs=x[:1], leaf_modules=leaf_modules)  # (its leaf hooks count any run)
    assert {n: p.channels for n, p in meter.probes.items()} == expected
    assert all(p.counts.shape == (p.channels,) and not p.counts.any() for p in meter.probes.values())
    with torch.no_grad():
        meter.model(x)
    meter.close()
    got = meter.scores()
    assert got.totals == fresh.totals
    assert all(torch.equal(got.counts[n], fresh.counts[n]) for n in fresh)


@pytest.mark.parametrize("example,compiled", [(False, False), (True, False), (True, True)],
                         ids=["first_call", "example_inputs", "compiled"])
def test_a_changed_channel_count_is_an_error_naming_the_site(example, compiled):
    """A channel count other than the one allocated (here the flatten's, with a larger input)
    is an error naming the site, eager or compiled, never a silent resize."""
    model = Unsized()
    x = torch.randn(2, 3, 4, 4)
    meter = ek.EntropyMeter(model, example_inputs=x if example else None)
    net = _compiled(meter.model)[0] if compiled else meter.model
    with torch.no_grad():
        net(x)
        with pytest.raises(ValueError, match=r"^site relu_1: the activation has 150 channels \(dim 1 of shape \(2, 150\)\) "
                                             r"but the meter counts 96; .*make a new EntropyMeter"):
            net(torch.randn(2, 3, 5, 5))
    assert meter.probes["relu_1"].totals() == (2, 1)  # the failed call counted nothing there


class IntegerSite(nn.Module):
    def forward(self, x):
        return torch.relu(x.round().long())


def test_activations_are_checked_at_the_first_call():
    with pytest.raises(TypeError, match="site relu: the activation is torch.int64"):
        ek.EntropyMeter(IntegerSite()).model(torch.randn(2, 3))
    from easier_kernels.entropy import SiteProbe
    from easier_kernels.sites import Site

    probe = SiteProbe(Site("relu", "relu", None, 2), "pooled", True)
    with pytest.raises(ValueError, match=r"site relu: channel_dim=2 is out of range for an activation of shape \(4, 3\)"):
        probe(torch.randn(4, 3))
    assert probe.counts is None


def test_moving_the_model_moves_the_counts_and_keeps_their_dtypes():
    meter = ek.EntropyMeter(SmallNet(), example_inputs=torch.randn(1, 3, 8, 8), mode="batch_mean")
    probe = next(iter(meter.probes.values()))
    meter.model.double()
    assert (probe.counts.dtype, probe.entropy_sum.dtype, probe.tally.dtype) == (torch.int64, torch.float64, torch.int64)
    meter.model.to("meta")
    assert probe.counts.device.type == probe.entropy_sum.device.type == "meta"


class InplaceReused(nn.Module):
    """An in-place activation whose input is read again afterwards."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        h = self.conv(x)
        F.relu_(h)
        return h * 2


def test_inplace_call_whose_input_is_read_again():
    model = InplaceReused()
    x = torch.randn(2, 3, 6, 6)
    meter = ek.EntropyMeter(model)
    with torch.no_grad():
        torch.testing.assert_close(meter.model(x), model(x), rtol=0, atol=0)
        expected = (model.conv(x) >= 0).sum((0, 2, 3))
    assert torch.equal(meter.scores().counts["relu_"], expected)


def test_sites_inside_leaf_modules_are_counted():
    model = WithGate().eval()
    x = torch.randn(4, 3, 8, 8).abs()
    scores = ek.entropy_scores(model, [x], leaf_modules=[Gate])
    with torch.no_grad():
        inner = model.blocks[1].conv(model.relu(model.stem(x)))
    assert torch.equal(scores.counts["blocks.1.act"], (inner >= 0).sum((0, 2, 3)))
    assert not model.blocks[1].act._forward_pre_hooks  # hooks removed


# ---- torch.distributed


def test_two_processes_sum_counts_before_entropies(tmp_path):
    """Two gloo ranks on different shards of real data both get the scores of one process over
    the union of the shards."""
    import json
    from pathlib import Path

    import distributed_scores_worker as worker
    from helpers import run_python

    script = Path(worker.__file__)
    proc = run_python("-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(script), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    single = worker.score(worker.shard_batches(0) + worker.shard_batches(1))
    got = ranks[0]
    assert got["pooled"]["counts"] == single["pooled"]["counts"]
    assert got["pooled"]["entropy"] == single["pooled"]["entropy"]
    assert got["batch_mean"]["batches"] == single["batch_mean"]["batches"] == 6
    for name, value in single["batch_mean"]["entropy"].items():
        assert got["batch_mean"]["entropy"][name] == pytest.approx(value, abs=1e-12)
    for name, (changed, kept) in single["pooled"]["energy"].items():  # the energy sums are summed over ranks too
        assert got["pooled"]["energy"][name] == pytest.approx([changed, kept], rel=1e-9) and kept > 0


# ---- the linearization error, counted in the same pass (energy=True)

class _Ends(nn.Module):
    """Three sites on positive inputs: `on` sees them as they are (always on), `off` their
    negation (always off), `gelu` a GELU of the mixed-sign x - 1."""

    def __init__(self):
        super().__init__()
        self.on, self.off, self.gelu = nn.ReLU(), nn.ReLU(), nn.GELU()

    def forward(self, x):
        return self.on(x) + self.off(-x) + self.gelu(x - 1)


@pytest.mark.parametrize("mode", ["pooled", "batch_mean"])
def test_the_linearization_error_at_the_two_ends_and_of_a_smooth_activation(mode):
    """An all-positive ReLU site: zero entropy and zero error (it is the identity). An all-negative
    one: zero entropy too, but the largest error there is (it outputs 0, linearized it outputs x).
    A GELU: the error E||gelu(x) - x||^2 / E||gelu(x)||^2 computed by hand."""
    x = torch.rand(3, 5, 4) + 0.1
    batches = [x[:2], x[2:]]
    scores = ek.entropy_scores(_Ends(), batches, mode=mode, energy=True)
    assert scores["on"] == scores["off"] == 0.0
    assert scores.linearization_error("on") == 0.0
    assert scores.linearization_error("off") == math.inf
    z = x - 1
    gelu, z = F.gelu(z).double(), z.double()  # (the activation as the model computes it, in float32)
    assert scores.linearization_error("gelu") == pytest.approx(float((gelu - z).square().sum() / gelu.square().sum()),
                                                               rel=1e-6)
    assert scores.energy["off"] == pytest.approx((float(x.double().square().sum()), 0.0))
    assert scores.to_dict()["sites"]["on"]["linearization_error"] == 0.0


def test_without_energy_nothing_is_summed_and_asking_is_a_clear_error():
    scores = ek.entropy_scores(_Ends(), [torch.rand(2, 4)])
    assert scores.energy == {} and "linearization_error" not in scores.to_dict()["sites"]["on"]
    with pytest.raises(KeyError, match="count with energy=True"):
        scores.linearization_error("on")


def test_the_energy_of_an_in_place_call_is_taken_before_it_overwrites_its_input():
    """F.relu(x, inplace=True) on a fused probe: the error is that of the input, not of the output."""
    class InPlace(nn.Module):
        def forward(self, x):
            return F.relu(x * 1.0, inplace=True)

    x = torch.randn(4, 6)
    scores = ek.entropy_scores(InPlace(), [x], energy=True)
    (name,) = scores
    negative, positive = x.clamp(max=0).double().square().sum(), x.clamp(min=0).double().square().sum()
    assert scores.linearization_error(name) == pytest.approx(float(negative / positive), rel=1e-9)


def test_a_meter_counts_energy_under_compile_as_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2))
    x = torch.randn(4, 6)
    eager = ek.EntropyMeter(model, example_inputs=x, energy=True)
    compiled = ek.EntropyMeter(model, example_inputs=x, energy=True)
    step = torch.compile(compiled.model, backend="eager")
    with torch.no_grad():
        for batch in torch.randn(3, 4, 6):
            eager.model(batch)
            step(batch)
    got, expected = compiled.scores(), eager.scores()
    for name in expected:
        assert got.energy[name] == pytest.approx(expected.energy[name], rel=1e-12)
        assert 0 < got.linearization_error(name) < math.inf


# ---- token sites: padding is not counted


VOCAB = 20


class TokenNet(nn.Module):
    """Embedding -> Linear -> ReLU -> Linear on [N, T, C]; the padding mask zeroes the output
    (a real input). `inplace`: the ReLU is in place."""

    def __init__(self, inplace=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 6)
        self.fc1 = nn.Linear(6, 5)
        self.act = nn.ReLU(inplace=inplace)
        self.fc2 = nn.Linear(5, 4)

    def pre(self, input_ids):
        """The activation's input."""
        return self.fc1(self.emb(input_ids))

    def forward(self, input_ids, attention_mask):
        return self.fc2(self.act(self.pre(input_ids))) * attention_mask[..., None]


class UnmaskedTokenNet(TokenNet):
    def forward(self, input_ids):
        return self.fc2(self.act(self.pre(input_ids)))


def _padded_batches(seed=0):
    """Dict batches of different lengths with right and left padding (and one row all padding)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(0, VOCAB, (3, 7), generator=g)
    mask_a = torch.ones(3, 7, dtype=torch.long)
    mask_a[0, 4:] = 0
    mask_a[1, :2] = 0
    mask_a[2, :] = 0
    b = torch.randint(0, VOCAB, (2, 5), generator=g)
    mask_b = torch.ones(2, 5, dtype=torch.long)
    mask_b[1, 1:] = 0
    return [{"input_ids": a, "attention_mask": mask_a, "labels": a}, {"input_ids": b, "attention_mask": mask_b}]


def _hand_count(model, batches, masked=True):
    """(on-counts per channel, tokens counted) over the kept tokens (every token: masked=False)."""
    on, tokens = 0, 0
    with torch.no_grad():
        for batch in batches:
            x = model.pre(batch["input_ids"])
            x = x[batch["attention_mask"].bool()] if masked else x.reshape(-1, x.shape[-1])
            on, tokens = on + (x >= 0).sum(0), tokens + x.shape[0]
    return on, tokens


@pytest.mark.parametrize("inplace", [False, True])
def test_padded_tokens_are_not_counted(inplace):
    model = TokenNet(inplace).eval()
    batches = _padded_batches()
    scores = ek.entropy_scores(model, batches)
    assert list(scores) == ["act"]
    on, tokens = _hand_count(model, batches)
    assert tokens == 4 + 5 + 0 + 5 + 1
    assert scores.totals["act"] == tokens
    assert torch.equal(scores.counts["act"], on)
    every, all_tokens = _hand_count(model, batches, masked=False)
    assert all_tokens == 31 and not torch.equal(every, on)  # (the padding would have changed the counts)
    assert scores.probabilities["act"].tolist() == pytest.approx((on.double() / tokens).tolist())
    assert scores["act"] == pytest.approx(float(binary_entropy(on.double() / tokens).mean()), rel=1e-12)
    assert scores.batches == 2


def test_padded_tokens_are_not_counted_per_batch_either():
    """batch_mean: each batch's layer entropy over its own kept tokens."""
    model = TokenNet().eval()
    batches = _padded_batches(1)
    scores = ek.entropy_scores(model, batches, mode="batch_mean")
    expected = []
    for batch in batches:
        on, tokens = _hand_count(model, [batch])
        expected.append(float(binary_entropy(on.double() / tokens).mean()))
    assert scores["act"] == pytest.approx(sum(expected) / len(expected), rel=1e-12)
    on, tokens = _hand_count(model, batches)
    assert scores.totals["act"] == tokens and torch.equal(scores.counts["act"], on)


def test_a_bool_mask_counts_as_an_integer_one():
    model = TokenNet().eval()
    batches = _padded_batches(2)
    as_bool = [{**b, "attention_mask": b["attention_mask"].bool()} for b in batches]
    got, expected = ek.entropy_scores(model, as_bool), ek.entropy_scores(model, batches)
    assert got.totals == expected.totals and torch.equal(got.counts["act"], expected.counts["act"])


def test_an_all_ones_mask_counts_every_token():
    model = TokenNet().eval()
    batches = [{**b, "attention_mask": torch.ones_like(b["attention_mask"])} for b in _padded_batches(3)]
    scores = ek.entropy_scores(model, batches)
    on, tokens = _hand_count(model, batches, masked=False)
    assert tokens == 31 and scores.totals["act"] == tokens
    assert torch.equal(scores.counts["act"], on)


def test_a_model_without_an_attention_mask_counts_every_token():
    model = UnmaskedTokenNet().eval()
    batches = _padded_batches(4)
    scores = ek.entropy_scores(model, [{"input_ids": b["input_ids"]} for b in batches])
    on, tokens = _hand_count(model, batches, masked=False)
    assert scores.totals["act"] == tokens == 31
    assert torch.equal(scores.counts["act"], on)


def test_the_linearization_error_is_over_the_kept_tokens():
    model = TokenNet().eval()
    batches = _padded_batches(5)
    scores = ek.entropy_scores(model, batches, energy=True)
    with torch.no_grad():
        x = torch.cat([model.pre(b["input_ids"])[b["attention_mask"].bool()] for b in batches]).double()
    changed, kept = x.clamp(max=0).square().sum(), x.clamp(min=0).square().sum()
    assert scores.energy["act"] == pytest.approx((float(changed), float(kept)), rel=1e-9)


def test_a_riding_meter_counts_only_the_kept_tokens():
    model = TokenNet().train()
    twin = TokenNet().train()
    batches = _padded_batches(6)
    meter = ek.EntropyMeter(model, example_inputs={k: v for k, v in batches[0].items() if k != "labels"})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    pre = []  # the activation's input at each step, before that step's update
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        with torch.no_grad():
            pre.append(model.pre(ids)[mask.bool()])
        for net, optimizer in ((meter.model, opt), (twin, twin_opt)):
            optimizer.zero_grad()
            net(input_ids=ids, attention_mask=mask).square().mean().backward()
            optimizer.step()
    for (k, v), w in zip(model.state_dict().items(), twin.state_dict().values()):  # trained as the plain model
        torch.testing.assert_close(v, w, msg=k)
    scores = meter.scores()
    assert scores.totals["act"] == sum(x.shape[0] for x in pre) == 15
    assert torch.equal(scores.counts["act"], sum((x >= 0).sum(0) for x in pre))
    meter.close()


def test_a_gpt2_counts_the_tokens_its_attention_mask_keeps(tiny_gpt2):
    model = tiny_gpt2
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (3, 10), generator=g)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[0, 6:] = 0
    mask[2, 3:] = 0
    stored = {}
    hooks = [model.transformer.h[i].mlp.act.register_forward_pre_hook(
        lambda m, args, i=i: stored.__setitem__(i, args[0].detach().clone())) for i in range(2)]
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    for h in hooks:
        h.remove()
    scores = ek.entropy_scores(model, [{"input_ids": ids, "attention_mask": mask}])
    assert list(scores) == ["transformer_h_0_mlp_act", "transformer_h_1_mlp_act"]
    for i, name in enumerate(scores):
        kept = stored[i][mask.bool()]
        assert scores.totals[name] == kept.shape[0] == 10 + 6 + 3
        assert torch.equal(scores.counts[name], (kept >= 0).sum(0)), name
    # without the mask: every token
    unmasked = ek.entropy_scores(model, [{"input_ids": ids}])
    assert all(unmasked.totals[name] == 30 for name in unmasked)


def test_a_batch_of_padding_only_leaves_the_batch_mean_a_number():
    model = TokenNet().eval()
    batches = _padded_batches(7)
    padding = {"input_ids": batches[1]["input_ids"], "attention_mask": torch.zeros_like(batches[1]["attention_mask"])}
    scores = ek.entropy_scores(model, [batches[0], padding], mode="batch_mean")
    assert not math.isnan(scores["act"])
    assert scores["act"] == pytest.approx(ek.entropy_scores(model, [batches[0]], mode="batch_mean")["act"])
