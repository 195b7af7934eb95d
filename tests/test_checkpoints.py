"""The prune loop's checkpoints: the loop object's state_dict round trip, and resuming past
unreadable checkpoints (torn or hand-edited files)."""

import warnings

import pytest
import torch
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek
from easier_kernels.checkpoints import CheckpointError
from easier_kernels.prune import Pruner


@pytest.fixture(scope="module")
def loaders():
    splits = ek.data.load("fashion-mnist-mini", seed=0)  # train augments: the loop consumes torch's RNG
    return (DataLoader(Subset(splits.train, range(128)), batch_size=32, shuffle=True),
            DataLoader(Subset(splits.val, range(64)), batch_size=64))


def small_model():
    torch.manual_seed(0)
    return ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)


OPTIONS = dict(max_drop=100.0, max_steps=3, plan="merge", progress=False)  # plan merge: no clock in the decisions


def same_run(got, want) -> None:
    assert got.linearized == want.linearized
    assert [(s.removed, s.entropy, s.val_accuracy) for s in got.history] == \
        [(s.removed, s.entropy, s.val_accuracy) for s in want.history]
    for (name, a), b in zip(got.model.state_dict().items(), want.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.fixture(scope="module")
def uninterrupted(loaders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    return ek.prune(small_model(), *loaders, checkpoint_dir=folder, **OPTIONS), folder


def test_a_loop_restored_from_its_state_dict_continues_exactly(loaders, uninterrupted):
    loop = Pruner(small_model(), *loaders, **OPTIONS)
    loop.begin()
    assert loop.step().step == 1
    state = loop.state_dict()
    fresh = Pruner(small_model(), *loaders, **OPTIONS)
    fresh.load_state_dict(state)
    while fresh.step() is not None:
        pass
    assert fresh.result().stopped == "reached max_steps=3"
    same_run(fresh.result(), uninterrupted[0])


@pytest.mark.parametrize("damage", ["torn", "hand_edited"])
def test_resume_skips_an_unreadable_latest_checkpoint(loaders, uninterrupted, tmp_path, damage):
    expected, folder = uninterrupted
    for path in folder.glob("step_*.pt"):
        (tmp_path / path.name).write_bytes(path.read_bytes())
    latest = tmp_path / "step_003.pt"
    if damage == "torn":
        latest.write_bytes(latest.read_bytes()[:1000])
    else:  # loads, but its state lost a key
        saved = torch.load(latest, weights_only=True)
        del saved["state"]["rng"]
        torch.save(saved, latest)
    with pytest.warns(UserWarning, match=f"skipping unreadable checkpoint {latest}"):
        resumed = ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, resume=True, **OPTIONS)
    same_run(resumed, expected)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rewritten by the resumed run: readable again
        ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, resume=True, **OPTIONS)


def test_no_readable_checkpoint_is_one_clear_error(loaders, tmp_path):
    for name in ("step_000.pt", "step_001.pt"):
        (tmp_path / name).write_bytes(b"\x00" * 64)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as error:
        ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, resume=True, **OPTIONS)
    assert str(error.value) == (f"{tmp_path} holds no readable checkpoint (step_000.pt, step_001.pt could not be "
                                "read); start afresh in another folder")


def test_an_unwritable_checkpoint_dir_is_refused_before_the_baseline_is_evaluated(loaders, tmp_path, monkeypatch):
    from easier_kernels import checkpoints

    evaluated = []
    monkeypatch.setattr(checkpoints, "unwritable", lambda path: tmp_path)  # (as a read-only folder answers)
    with pytest.raises(CheckpointError, match=f"checkpoint_dir {tmp_path / 'run'}: cannot write in {tmp_path} "):
        ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path / "run", evaluate=lambda net: evaluated.append(1),
                 **OPTIONS)
    assert not evaluated
