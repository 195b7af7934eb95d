"""ek.prune: the loop's decisions, user-supplied training, checkpoints, save and load."""

import importlib
import json
import re

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek
from easier_kernels import checkpoints, payoff, report
from easier_kernels.prune import Pruner, read_record
from easier_kernels.select import choose_by_latency


@pytest.fixture(scope="module")
def splits():
    return ek.data.load("fashion-mnist-mini", seed=0)


@pytest.fixture
def loaders(splits):
    train = DataLoader(Subset(splits.train, range(192)), batch_size=64, shuffle=True)
    val = DataLoader(Subset(splits.val, range(128)), batch_size=128)
    return train, val


def small_model(width=0.125):
    torch.manual_seed(0)
    return ek.models.resnet18(num_classes=10, in_channels=1, width=width)


def scripted(accuracies):
    """An `evaluate` returning the given accuracies in turn (the first is the baseline's)."""
    values = iter(accuracies)
    return lambda net: next(values)


def linearized_sites(net) -> list:
    return ek.recipe(net)["linearized"]


def test_stops_below_the_threshold_and_returns_the_last_network_that_passed(loaders):
    train, val = loaders
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    handed = []

    def finetune(net, step):
        handed.append((step, linearized_sites(net)))

    result = ek.prune(model, train, val, max_drop=1.0, scoring="pass", finetune=finetune,
                      evaluate=scripted([90.0, 89.5, 89.0, 88.9]), progress=False)
    assert [s.accepted for s in result.history] == [True, True, False]
    assert result.linearized == result.history[0].removed + result.history[1].removed
    assert linearized_sites(result.model) == result.linearized
    assert result.accuracy == 89.0 and result.baseline_accuracy == 90.0
    assert "88.90 < 89.00" in result.stopped
    assert [step for step, _ in handed] == [1, 2, 3]
    assert handed[2][1] == result.linearized + result.history[2].removed  # it fine-tuned the rejected candidate
    # each step removed the lowest-entropy site of the scores it was chosen by
    for step in result.history:
        assert step.removed == [min(step.entropy, key=step.entropy.get)]
    assert set(result.history[1].entropy) == set(result.sites) - set(result.history[0].removed)
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_ride_along_scores_come_from_the_users_training(loaders, splits):
    train, val = loaders
    batch = next(iter(DataLoader(Subset(splits.train, range(64)), batch_size=64)))
    models_after = []

    def finetune(net, step):  # counts only what it runs: one batch, in train mode, no update
        net.train()
        with torch.no_grad():
            net(batch[0])

    result = ek.prune(small_model(), train, val, max_drop=100.0, max_steps=2, finetune=finetune,
                      evaluate=scripted([50.0, 50.0, 50.0]), progress=False, on_step=lambda r: models_after.append(r.model))
    after_step_1 = models_after[0]
    expected = ek.entropy_scores(after_step_1.train(), [batch])
    assert result.history[1].entropy == dict(expected)


def test_a_finetune_that_runs_nothing_is_an_error(loaders):
    train, val = loaders
    with pytest.raises(ValueError, match="finetune did not run the model it was given"):
        ek.prune(small_model(), train, val, finetune=lambda net, step: None, progress=False)


def test_layers_per_step_exclude_and_max_steps(loaders, splits):
    _, val = loaders
    train = DataLoader(Subset(splits.val, range(192)), batch_size=64)  # no augmentation: the first scores are exact
    first = ek.entropy_scores(small_model().train(), train)
    lowest = first.ranking()[0]
    result = ek.prune(small_model(), train, val, max_drop=100.0, layers_per_step=3, max_steps=2, exclude=[lowest],
                      progress=False)
    assert [len(s.removed) >= 3 for s in result.history] == [True, True]
    assert lowest not in result.linearized and len(result.linearized) >= 6
    assert result.stopped == "reached max_steps=2"
    assert result.history[0].entropy == dict(first)  # the first scores: a pass in train mode


def test_naive_rules_remove_sites_in_their_order_with_the_same_training(loaders):
    train, val = loaders
    sites = [s.name for s in ek.find_sites(small_model(), torch.zeros(1, 1, 28, 28))]
    handed = []  # what training sees per run: the same random numbers under every rule

    def run(select, **options):
        handed.append([])

        def finetune(net, step):
            handed[-1].append(torch.rand(1).item())

        result = ek.prune(small_model(), train, val, max_drop=100.0, layers_per_step=2, max_steps=3, scoring="pass",
                          finetune=finetune, evaluate=lambda net: 50.0, select=select, progress=False, **options)
        assert [len(s.removed) for s in result.history] == [2, 2, 2]
        assert all(set(s.entropy) >= set(s.removed) for s in result.history)  # scores still recorded
        return result.linearized

    assert run("first") == sites[:6]
    assert run("last") == sites[::-1][:6]
    drawn = run("random", seed=0)
    assert drawn == run("random", seed=0, select_seed=0) and len(set(drawn)) == 6
    assert run("random", seed=0, select_seed=1) != drawn  # 17 sites: two draws agreeing on 6 is ~1e-7
    entropy = run("entropy")
    assert entropy not in (sites[:6], sites[::-1][:6])
    assert len({tuple(v) for v in handed}) == 1


class TwoSites(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        x = self.act2(self.act1(self.conv(x)))  # act2 only ever sees x >= 0: entropy exactly 0
        return self.head(x.mean((2, 3)))


def test_zero_entropy_sites_go_with_the_lowest_and_the_loop_ends_when_nothing_is_left(loaders):
    train, val = loaders
    result = ek.prune(TwoSites(), train, val, max_drop=100.0, progress=False)
    assert result.history[0].entropy["act2"] == 0.0
    assert "act2" in result.history[0].removed
    assert sorted(result.linearized) == ["act1", "act2"]
    assert result.stopped == "no site left to linearize"


def test_default_finetuner_trains_and_the_result_saves_and_loads(loaders, tmp_path):
    train, val = loaders
    result = ek.prune(small_model(), train, val, max_drop=100.0, max_steps=2, progress=False)
    assert len(result.linearized) == 2 and all(s.val_accuracy >= 0 for s in result.history)
    result.save(tmp_path / "pruned.pt")
    loaded = ek.load(tmp_path / "pruned.pt", small_model)
    assert loaded.linearized == result.linearized and loaded.history == result.history
    assert ek.recipe(loaded.model) == ek.recipe(result.model)
    got, want = loaded.model.state_dict(), result.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    x = next(iter(val))[0][:8]
    assert torch.equal(loaded.model.eval()(x), result.model.eval()(x))
    # the bare state dict carries the recipe too (plans measured by the run, nothing timed again)
    assert torch.equal(ek.load(result.model.state_dict(), small_model).eval()(x), result.model(x))
    # the file is weights and JSON: loadable without unpickling any code
    saved = torch.load(tmp_path / "pruned.pt", weights_only=True)
    assert json.loads(saved["record"])["linearized"] == result.linearized
    assert read_record(tmp_path / "pruned.pt")["baseline_accuracy"] == result.baseline_accuracy
    with pytest.raises(RuntimeError):  # another width: the weights do not fit
        ek.load(tmp_path / "pruned.pt", lambda: small_model(width=0.25))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable easier_kernels file"):
        ek.load(tmp_path / "junk.pt", small_model)


def test_checkpoints_resume_and_refuse_what_does_not_match(loaders, tmp_path):
    train, val = loaders
    options = dict(max_drop=100.0, checkpoint_dir=tmp_path, progress=False, scoring="pass",
                   finetune=lambda net, step: None)
    first = ek.prune(small_model(), train, val, max_steps=1, evaluate=scripted([70.0, 69.0]), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000.pt", "step_001.pt"]
    with pytest.raises(ValueError, match="already holds a run .* pass resume=True"):
        ek.prune(small_model(), train, val, max_steps=1, **options)
    with pytest.raises(ValueError, match="holds a run of a different model"):
        ek.prune(small_model(width=0.25), train, val, max_steps=1, resume=True, **options)
    with pytest.raises(ValueError, match=r"started with max_drop=100.0 \(now 2.0\)"):
        ek.prune(small_model(), train, val, max_steps=1, resume=True, **dict(options, max_drop=2.0))
    with pytest.raises(ValueError, match=r"started with deploy_batch=its default \(now 16\)"):  # (not recorded at 1)
        ek.prune(small_model(), train, val, max_steps=1, resume=True, deploy_batch=16, **options)
    (tmp_path / ".step_002.pt.999.deadbeef.tmp").write_bytes(b"half a checkpoint")  # a write killed midway
    # a larger max_steps goes on from where the run stopped; the baseline is not evaluated again
    more = ek.prune(small_model(), train, val, max_steps=3, resume=True, evaluate=scripted([68.0, 67.0]), **options)
    assert more.history[0] == first.history[0] and len(more.history) == 3
    assert more.baseline_accuracy == 70.0 and more.accuracy == 67.0
    assert not list(tmp_path.glob("*.tmp")), "the stale temporary file was not cleared"
    # a finished run resumes to its result at once
    again = ek.prune(small_model(), train, val, max_steps=3, resume=True, evaluate=scripted([]), **options)
    assert again.linearized == more.linearized


@pytest.mark.parametrize("options, message", [
    ({"max_drop": -1.0}, "max_drop must be accuracy points in"),
    ({"mode": "mean"}, "mode must be one of"),
    ({"scoring": "later"}, "scoring must be one of"),
    ({"layers_per_step": 0}, "layers_per_step must be an integer >= 1"),
    ({"exclude": ["nope"]}, "exclude names unknown site"),
    ({"select": "worst"}, "select must be one of entropy, entropy_latency, output_change, random, first, last"),
    ({"latency_target": 1.5}, r"latency_target must be a fraction of the original's latency in \(0, 1\]"),
    ({"select": "random", "seed": None}, "select='random' needs a seed or select_seed"),
    ({"deploy_batch": 0}, "deploy_batch must be an integer >= 1, not 0"),
    ({"deploy_batch": -1}, "deploy_batch must be an integer >= 1, not -1"),
    ({"deploy_batch": 2.5}, "deploy_batch must be an integer >= 1, not 2.5"),
    ({"max_drop": float("nan")}, r"max_drop must be accuracy points in \[0, 100\], not nan"),
    ({"max_drop": 101}, r"max_drop must be accuracy points in \[0, 100\], not 101"),
    ({"lr": -1}, "lr must be a finite learning rate > 0, not -1"),
    ({"lr": float("inf")}, "lr must be a finite learning rate > 0, not inf"),
    ({"weight_decay": -0.1}, "weight_decay must be a finite number >= 0, not -0.1"),
])
def test_bad_options_are_clear_errors(loaders, options, message):
    train, val = loaders
    with pytest.raises(ValueError, match=message) as raised:
        ek.prune(small_model(), train, val, progress=False, **options)
    assert "\n" not in str(raised.value)


# ---- latency-aware selection and the payoff of every step


def test_every_step_records_its_payoff_and_entropy_latency_follows_the_measured_gains(loaders):
    train, val = loaders
    result = ek.prune(small_model(), train, val, max_drop=100.0, max_steps=2, select="entropy_latency",
                      scoring="pass", finetune=lambda net, step: None, progress=False)
    before = result.baseline_payoff
    assert before["runtime"] == "eager" and before["example_shape"] == [1, 1, 28, 28] and before["latency_ms"] > 0
    assert before["macs"] == payoff.counts(small_model(), torch.zeros(1, 1, 28, 28))["macs"] > 0
    for step in result.history:
        assert step.latency_ratio > 0 and step.latency_ms > 0 and step.macs > 0 and step.params > 0
        assert {tuple(m["sites"]) for m in step.gains} >= {(n,) for n in step.entropy}  # every candidate measured
        assert step.removed == choose_by_latency(step.entropy, step.gains, 1)
    assert result.payoff["latency_ratio"] == result.history[-1].latency_ratio
    assert result.to_dict()["baseline_payoff"] == before


def scripted_payoff(ratios):
    """A payoff.measure stand-in returning the given latency ratios in turn (the first: the unpruned network)."""
    values = iter(ratios)

    def measure(net, original, example_inputs, *, runtime="eager", leaf_modules=None):
        ratio = next(values)
        return {"latency_ratio": ratio, "latency_ms": ratio, "baseline_ms": 1.0, "macs": 10, "params": 10}

    return measure


def test_a_latency_target_stops_the_loop_successfully(loaders, monkeypatch):
    train, val = loaders
    monkeypatch.setattr(payoff, "measure", scripted_payoff([1.0, 0.9, 0.75, 0.6]))
    options = dict(max_drop=1.0, scoring="pass", finetune=lambda net, step: None, progress=False, latency_target=0.8)
    result = ek.prune(small_model(), train, val, evaluate=scripted([90.0, 89.9, 89.8, 89.7]), **options)
    assert [s.latency_ratio for s in result.history] == [0.9, 0.75] and all(s.accepted for s in result.history)
    assert result.stopped == "latency ratio 0.750 <= latency_target 0.8" and result.payoff["latency_ratio"] == 0.75
    assert result.settings["latency_target"] == 0.8
    # the accuracy still stops it first, and a rejected step's payoff is recorded too
    monkeypatch.setattr(payoff, "measure", scripted_payoff([1.0, 0.7]))
    result = ek.prune(small_model(), train, val, evaluate=scripted([90.0, 88.0]), **options)
    assert result.stopped.startswith("validation accuracy 88.00 < 89.00") and result.history[0].latency_ratio == 0.7
    assert result.payoff["latency_ratio"] == 1.0  # the unpruned network is the result


def scripted_gains(favourite):
    """A site_gains stand-in under which `favourite` saves the most."""
    def site_gains(net, names, args, *, runtime, leaf_modules=None):
        return [{"sites": [n], "ms_saved": 1.0 if n == favourite else 0.001, "ms_before": 1.0, "pays": True}
                for n in names]
    return site_gains


def test_a_resumed_latency_aware_run_chooses_from_the_gains_in_its_checkpoint(loaders, tmp_path, monkeypatch):
    prune_module = importlib.import_module("easier_kernels.prune")  # (ek.prune is the function)
    train, val = loaders
    options = dict(max_drop=100.0, checkpoint_dir=tmp_path, progress=False, scoring="pass", select="entropy_latency",
                   finetune=lambda net, step: None, evaluate=lambda net: 50.0)
    monkeypatch.setattr(payoff, "measure", scripted_payoff([1.0] * 10))
    monkeypatch.setattr(prune_module, "site_gains", scripted_gains("layer2_0_relu1"))
    first = ek.prune(small_model(), train, val, max_steps=1, **options)  # measures step 2's gains before its checkpoint
    assert first.history[0].removed == ["layer2_0_relu1"]
    monkeypatch.setattr(prune_module, "site_gains", scripted_gains("layer3_0_relu1"))  # another measurement now
    more = ek.prune(small_model(), train, val, max_steps=3, resume=True, **options)
    second, third = more.history[1], more.history[2]
    # step 2 chose from the gains checkpointed by the first run (all 0.001: its favourite was gone) ...
    assert all(m["ms_saved"] == 0.001 for m in second.gains)
    assert second.removed == choose_by_latency(second.entropy, second.gains, 1) != ["layer3_0_relu1"]
    # ... and step 3 from a measurement of this process
    assert third.removed == ["layer3_0_relu1"]


# ---- the deploy batch: plans, gains and payoff timed at the batch the model will serve at


class Mlp(nn.Module):
    """Three linears: linearizing an activation makes a chain whose merge the planner can choose."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2, self.fc3 = nn.Linear(784, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x.flatten(1))))))


def layers_as_seconds(timed: list):
    """A planner timing stand-in: a segment takes one second per layer (so a merge always wins,
    without a clock), and the input shape of every timing is recorded in `timed`."""
    def seconds(module, args, runtime):
        timed.append(list(args[0].shape))
        return float(sum(isinstance(m, nn.Linear) for m in module.modules()))
    return seconds


def test_plans_are_timed_at_the_deploy_batch_and_fold_follows_them(loaders, tmp_path, monkeypatch):
    planner = importlib.import_module("easier_kernels.fold.planner")
    timed = []
    monkeypatch.setattr(planner, "_seconds", layers_as_seconds(timed))
    train, val = loaders
    options = dict(max_drop=100.0, scoring="pass", finetune=lambda net, step: None, evaluate=lambda net: 50.0,
                   progress=False, checkpoint_dir=tmp_path)
    result = ek.prune(Mlp(), train, val, max_steps=1, deploy_batch=16, **options)
    plans = ek.recipe(result.model)["plans"]
    assert plans and all(p["batch"] == 16 and p["plan"].startswith("merge") for p in plans)
    assert timed and all(shape[0] == 16 for shape in timed)  # every plan timing at the deploy batch
    assert result.deploy_batch == 16 and result.settings["deploy_batch"] == 16
    assert result.baseline_payoff["example_shape"] == [16, 1, 28, 28]
    assert result.example_shape == (1, 1, 28, 28)  # captured with one sample
    # the report and the summary say at which batch the latency was measured
    record = result.to_dict()
    assert record["deploy_batch"] == 16 and record["baseline_payoff"]["example_shape"] == [16, 1, 28, 28]
    assert "latency (eager on cpu at batch 16, input [16, 1, 28, 28]): " in report.summary(record)

    # folding at the deploy batch follows the recorded plans, timing none again
    x = next(iter(val))[0][:16]
    timed.clear()
    folded = ek.fold(result.model, x, check=False)
    rows = ek.recipe(folded)["fold"]["decisions"]
    assert {tuple(r["layers"]): r["choice"] for r in rows} == {tuple(p["layers"]): p["plan"] for p in plans}
    assert all(r["why"] == "planned by linearize (eager, batch 16)" and r["input"][0] == 16 for r in rows)
    assert timed == []

    # a resume with another deploy batch is refused; with the same one it goes on at that batch
    for other, shown in ((4, "deploy_batch=16 (now 4)"), (1, "deploy_batch=16 (now its default)")):
        with pytest.raises(ValueError, match=re.escape(f"started with {shown}")):
            ek.prune(Mlp(), train, val, max_steps=2, deploy_batch=other, resume=True, **options)
    rebuilt = Pruner(Mlp(), train, val, deploy_batch=16, **{k: v for k, v in options.items() if k != "checkpoint_dir"})
    rebuilt.load_state_dict(checkpoints.read(tmp_path / "step_001.pt")["state"])
    assert ek.recipe(rebuilt.current) == ek.recipe(result.model)  # the recorded plans, nothing timed again
    assert timed == []
    more = ek.prune(Mlp(), train, val, max_steps=2, deploy_batch=16, resume=True, **options)
    assert more.history[0] == result.history[0] and len(more.history) == 2
    assert all(p["batch"] == 16 for p in ek.recipe(more.model)["plans"]) and timed
    assert all(shape[0] == 16 for shape in timed)


def test_the_deploy_batch_is_the_first_samples_of_the_validation_loader(splits):
    images = torch.stack([splits.val[i][0] for i in range(20)])
    train = DataLoader(Subset(splits.train, range(64)), batch_size=64)
    small_batches = DataLoader(Subset(splits.val, range(20)), batch_size=6)  # 16 samples take three batches
    loop = Pruner(Mlp(), train, small_batches, deploy_batch=16)
    assert torch.equal(loop.deploy_example[0][0], images[:16]) and torch.equal(loop.example[0][0], images[:1])
    few = DataLoader(Subset(splits.val, range(5)), batch_size=4)  # fewer samples than the batch: repeated
    assert torch.equal(Pruner(Mlp(), train, few, deploy_batch=12).deploy_example[0][0], images[torch.arange(12) % 5])
    given = Pruner(Mlp(), train, few, deploy_batch=3, example_inputs=images[7:9])  # or drawn from example_inputs
    assert torch.equal(given.deploy_example[0][0], images[[7, 8, 7]]) and torch.equal(given.example[0][0], images[7:9])


# ---- retry on rejection (patience)


def test_patience_tries_the_next_move_and_never_the_rejected_site_again(loaders):
    train, val = loaders
    options = dict(max_drop=1.0, scoring="pass", finetune=lambda net, step: None, progress=False)
    result = ek.prune(small_model(), train, val, patience=1, evaluate=scripted([90.0, 89.5, 80.0, 89.4, 80.0, 80.0]),
                      **options)
    steps = result.history
    assert [s.accepted for s in steps] == [True, False, True, False, False]  # two rejected in a row end it
    assert result.stopped == ("validation accuracy 80.00 < 89.00 (baseline 90.00 - max_drop 1.0) in 2 tries in a row "
                              "(patience 1)")
    assert result.linearized == steps[0].removed + steps[2].removed == linearized_sites(result.model)
    assert result.accuracy == 89.4 and result.settings["patience"] == 1
    rejected = steps[1].removed[0]
    # the retry chose from the last accepted step's scores (the rejected network's are dropped), without the rejected site
    assert steps[2].entropy == steps[1].entropy
    assert steps[2].removed == [min((n for n in steps[1].entropy if n != rejected), key=steps[1].entropy.get)]
    assert all(rejected not in s.removed for s in steps[2:]) and steps[3].removed != steps[4].removed
    # every try is a row of the report, where the rejected ones sit counted from the last accepted step
    run = result.to_dict()
    accepted, missed = report.accuracy_series(run)
    assert accepted["x"] == [0, 1, 2] and missed["x"] == [2, 3, 3] and missed["val"] == [80.0, 80.0, 80.0]
    assert "3 tries rejected in all (patience 1)" in report.summary(run)
    assert "3 tries rejected in all (patience 1)" in report.markdown(run)
    assert report.markdown(run).count("| rejected |") == 3

    # patience=0 (the default): the paper's loop, ended by the first rejected step
    paper = ek.prune(small_model(), train, val, patience=0, evaluate=scripted([90.0, 89.5, 80.0]), **options)
    assert [s.accepted for s in paper.history] == [True, False] and "patience" not in paper.settings
    assert paper.stopped == "validation accuracy 80.00 < 89.00 (baseline 90.00 - max_drop 1.0)"
    assert "rejected (patience" not in report.summary(paper.to_dict())


@pytest.mark.parametrize("select", ["first", "entropy_latency"])
def test_patience_skips_the_rejected_site_under_every_rule(loaders, select):
    train, val = loaders
    result = ek.prune(small_model(), train, val, max_drop=1.0, max_steps=2, patience=1, select=select, scoring="pass",
                      finetune=lambda net, step: None, evaluate=scripted([90.0, 80.0, 90.0]), progress=False)
    first, second = result.history
    assert [first.accepted, second.accepted] == [False, True] and not set(first.removed) & set(second.removed)
    open_sites = {n: e for n, e in second.entropy.items() if n not in first.removed}
    if select == "first":
        assert first.removed + second.removed == result.sites[:2]
    else:  # the gains of the unpruned network, kept for the retry
        assert second.gains == first.gains and second.removed == choose_by_latency(open_sites, second.gains, 1)


def test_a_rejected_step_of_several_sites_is_retried_with_half_as_many(loaders):
    train, val = loaders
    def finetune(net, step):  # changes every weight of the network it is handed
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)

    loop = Pruner(small_model(), train, val, max_drop=1.0, layers_per_step=2, max_steps=4, patience=2, scoring="pass",
                  finetune=finetune, evaluate=scripted([90.0, 80.0, 80.0, 90.0, 90.0]), progress=False)
    loop.begin()
    before = {k: v.clone() for k, v in loop.current.state_dict().items()}
    first = loop.step()
    low, second_lowest = first.removed  # (no site scores exactly 0 here)
    assert not first.accepted and loop.state["width"] == 1 and not loop.state.get("rejected")  # not marked while halving
    assert all(torch.equal(before[k], v) for k, v in loop.current.state_dict().items())  # the rejected try left no trace
    retry = loop.step()
    assert retry.removed == [low] and not retry.accepted and loop.state["rejected"] == [low]  # one site: marked
    third = loop.step()
    assert third.removed == [second_lowest] and third.accepted and loop.state["width"] == 2 and loop.state["tries"] == 0
    fourth = loop.step()
    assert len(fourth.removed) == 2 and low not in fourth.removed and fourth.accepted
    assert loop.step() is None and loop.result().linearized == [second_lowest, *fourth.removed]


def test_a_run_resumed_after_a_rejected_try_makes_the_same_choices(loaders, tmp_path):
    train, val = loaders
    cursed = {"layer1_0_relu2", "layer4_1_relu2"}  # what any network without them scores: rejected

    def run(max_steps, **more):
        return ek.prune(small_model(), train, val, max_drop=1.0, max_steps=max_steps, patience=2, plan="merge",
                        evaluate=lambda net: 50.0 if cursed & set(linearized_sites(net)) else 90.0, progress=False,
                        **more)

    expected = run(6)
    assert [s.accepted for s in expected.history][:4] == [True, False, False, True], "pick other cursed sites"
    first = run(2, checkpoint_dir=tmp_path)  # stopped mid-retry: one try rejected, its site marked
    assert [s.accepted for s in first.history] == [True, False]
    resumed = run(6, checkpoint_dir=tmp_path, resume=True)
    assert [s.removed for s in resumed.history] == [s.removed for s in expected.history]
    assert [s.entropy for s in resumed.history] == [s.entropy for s in expected.history]
    assert [s.accepted for s in resumed.history] == [s.accepted for s in expected.history]
    assert resumed.linearized == expected.linearized and resumed.stopped == expected.stopped
    got, want = resumed.model.state_dict(), expected.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match=r"started with patience=2 \(now 1\)"):  # a resume keeps the patience
        ek.prune(small_model(), train, val, max_drop=1.0, max_steps=6, patience=1, plan="merge", checkpoint_dir=tmp_path,
                 resume=True, progress=False)


@pytest.mark.parametrize("patience", [-1, 1.5, True, "2", None])
def test_a_bad_patience_is_a_one_line_error(loaders, patience):
    train, val = loaders
    with pytest.raises(ValueError, match=f"^patience must be an integer >= 0, not {re.escape(repr(patience))}$"):
        ek.prune(small_model(), train, val, patience=patience, progress=False)


# ---- select="output_change": the training-free score that predicts the removal cost best


def test_output_change_removes_the_site_that_moves_the_outputs_least_and_resumes_with_the_same_choices(loaders, tmp_path):
    """Each step takes the site whose linearization alone changes the current network's logits
    least, measured on the first validation batches; a run stopped after step 1 and resumed makes
    the choices of an uninterrupted one (the ranking is in the checkpoint)."""
    from easier_kernels.prune import OUTPUT_CHANGE_BATCHES
    from easier_kernels.scores import output_change

    train, val = loaders

    def run(max_steps, **more):
        return ek.prune(small_model(), train, val, max_drop=100.0, max_steps=max_steps, select="output_change",
                        plan="merge", evaluate=lambda net: 50.0, progress=False, **more)

    expected = run(3)
    torch.manual_seed(0)
    change = output_change(small_model(), val, max_batches=OUTPUT_CHANGE_BATCHES)
    first = expected.history[0]
    assert first.ranking == pytest.approx(change) and first.removed == [min(change, key=change.get)]
    second = expected.history[1]
    assert set(second.ranking) == set(change) - set(first.removed)  # measured again on the network after step 1
    assert second.removed == [min(second.ranking, key=second.ranking.get)]
    assert run(1, checkpoint_dir=tmp_path).linearized == first.removed
    resumed = run(3, checkpoint_dir=tmp_path, resume=True)
    assert [s.removed for s in resumed.history] == [s.removed for s in expected.history]
    assert [s.ranking for s in resumed.history] == [s.ranking for s in expected.history]
    got, want = resumed.model.state_dict(), expected.model.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)
