"""ek.prune: the loop's decisions, user-supplied training, checkpoints, save and load."""

import json

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek
from easier_kernels.prune import _choose, read_record


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


def test_choose_takes_the_lowest_and_every_exact_zero():
    scores = {"a": 0.5, "b": 0.0, "c": 0.2, "d": 0.0, "e": 0.9}
    assert _choose(scores, 1) == ["b", "d"]
    assert _choose(scores, 3) == ["b", "d", "c"]
    assert _choose({"a": 0.3, "b": 0.1, "c": 0.1}, 1) == ["b"]  # a tie keeps execution order


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
    ({"select": "worst"}, "select must be one of entropy, random, first, last"),
    ({"select": "random", "seed": None}, "select='random' needs a seed or select_seed"),
])
def test_bad_options_are_clear_errors(loaders, options, message):
    train, val = loaders
    with pytest.raises(ValueError, match=message):
        ek.prune(small_model(), train, val, progress=False, **options)
