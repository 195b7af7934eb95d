"""recovery: distillation's loss against a hand computation, a teacher that never changes, and the
loop's teacher built from the unpruned network (also on resume)."""

import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Subset

import easier_kernels as ek
from easier_kernels import recovery, report
from easier_kernels.checkpoints import CheckpointError


def test_the_distillation_loss_equals_a_hand_computation():
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    t = 2.5
    by_hand = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        p = [math.exp(v / t) for v in t_row]
        q = [math.exp(v / t) for v in s_row]
        p, q = [v / sum(p) for v in p], [v / sum(q) for v in q]
        by_hand += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    by_hand = by_hand / 3 * t * t
    assert recovery.distillation_loss(student, teacher, t).item() == pytest.approx(by_hand, rel=1e-6)
    assert recovery.distillation_loss(teacher, teacher, t).item() == pytest.approx(0.0, abs=1e-6)
    tokens = torch.randn(2, 5, 7, generator=generator)  # per-token logits: the mean over the 10 tokens
    assert recovery.distillation_loss(tokens, tokens.flip(1), t).item() == pytest.approx(
        recovery.distillation_loss(tokens.reshape(10, 7), tokens.flip(1).reshape(10, 7), t).item())


class DictNet(nn.Module):
    """Hugging Face style: a dict output with "logits"."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))

    def forward(self, x):
        return {"logits": self.body(x)}


def test_a_batch_s_loss_mixes_the_task_with_the_teacher_s_soft_targets():
    torch.manual_seed(0)
    teacher_net, student = DictNet().train(), DictNet()
    term = recovery.Distillation(teacher_net, weight=0.3, temperature=2.0)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    out = student(x)
    task = nn.functional.cross_entropy(out["logits"], y)
    mixed = term.loss(task, out, (x,), {})
    with torch.no_grad():  # the teacher runs in eval mode (running statistics), whatever its module's mode
        target = teacher_net.eval()(x)["logits"]
    assert mixed.item() == pytest.approx(0.7 * task.item() + 0.3 * recovery.distillation_loss(out["logits"], target, 2.0).item(),
                                         rel=1e-6)
    mixed.backward()
    assert all(p.grad is not None for p in student.parameters())
    assert all(p.grad is None and not p.requires_grad for p in term.teacher.parameters())


def test_training_with_a_teacher_never_changes_it_nor_the_module_it_was_copied_from():
    torch.manual_seed(0)
    teacher_net = DictNet()
    before = {k: v.clone() for k, v in teacher_net.state_dict().items()}
    term = recovery.Distillation(teacher_net, weight=0.5)
    student = DictNet()
    loader = [(torch.randn(8, 6), torch.randint(0, 3, (8,))) for _ in range(4)]
    ek.train.fit(student, loader, 2, lr=0.1, recovery=[term])
    for state in (teacher_net.state_dict(), term.teacher.state_dict()):  # BN statistics included
        assert all(torch.equal(v, before[k]) for k, v in state.items())
    assert not any(torch.equal(v, before[k]) for k, v in student.state_dict().items() if v.is_floating_point())


@pytest.mark.parametrize("options, message", [
    ({"distill": 0}, r"distill must be the teacher's share of the loss in \(0, 1\], not 0"),
    ({"distill": 1.5}, r"distill must be the teacher's share of the loss in \(0, 1\], not 1.5"),
    ({"distill": 0.5, "distill_temperature": 0}, "distill_temperature must be a finite number > 0, not 0"),
    ({"distill": 0.5, "finetune": lambda net, step: None}, "distill applies to the default fine-tuner"),
])
def test_bad_distillation_options_are_one_line_errors(options, message):
    with pytest.raises(ValueError, match=message):
        ek.Pruner(small_model(), [], [], **options)


@pytest.fixture(scope="module")
def loaders():
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    return (DataLoader(Subset(splits.train, range(96)), batch_size=32, shuffle=True),
            DataLoader(Subset(splits.val, range(64)), batch_size=64))


def small_model():
    torch.manual_seed(0)
    return ek.models.resnet18(num_classes=10, in_channels=1, width=0.125)


OPTIONS = dict(max_drop=100.0, max_steps=2, plan="merge", progress=False, distill=0.5, distill_temperature=3.0)


def test_the_loop_distills_from_the_unpruned_network_and_resumes_with_the_same_teacher(loaders, tmp_path):
    model = small_model()
    uninterrupted = ek.prune(model, *loaders, **OPTIONS)
    assert uninterrupted.settings["distill"] == 0.5 and uninterrupted.settings["distill_temperature"] == 3.0
    assert "recovery: distillation from the unpruned network (teacher's share of the loss 0.5, temperature 3)" in \
        report.summary(uninterrupted.to_dict())
    plain = ek.prune(small_model(), *loaders, **{**OPTIONS, "distill": None})
    assert not torch.equal(plain.model.state_dict()["fc.weight"], uninterrupted.model.state_dict()["fc.weight"])

    first = ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, **{**OPTIONS, "max_steps": 1})
    assert len(first.history) == 1
    loop = ek.Pruner(small_model(), *loaders, **OPTIONS)
    loop.load_state_dict(torch.load(sorted(tmp_path.glob("step_*.pt"))[-1], weights_only=True)["state"])
    teacher = loop._recovery()[0].teacher  # rebuilt from the model given (the unpruned network), not from the step's
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), model.state_dict().values()))
    resumed = ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, resume=True, **OPTIONS)
    assert resumed.linearized == uninterrupted.linearized
    for (name, a), b in zip(resumed.model.state_dict().items(), uninterrupted.model.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match=r"distill=0.5 \(now its default\)"):
        ek.prune(small_model(), *loaders, checkpoint_dir=tmp_path, resume=True, **{**OPTIONS, "distill": None})
