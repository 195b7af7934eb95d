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
    ({"distill": 0.5, "finetune": lambda net, step: None}, "distill, anneal and entropy_weight apply to the default fine-tuner"),
    ({"anneal": 0}, r"anneal must be the fraction of a step's batches to anneal over, in \(0, 1\], not 0"),
    ({"anneal": 1.5}, r"anneal must be the fraction of a step's batches to anneal over, in \(0, 1\], not 1.5"),
    ({"anneal": 0.5, "finetune": lambda net, step: None}, "distill, anneal and entropy_weight apply to the default fine-tuner"),
    ({"entropy_weight": 0}, "entropy_weight must be a finite number > 0, not 0"),
    ({"entropy_weight": 0.1, "entropy_side": "off"}, "entropy_side must be one of on, both, not 'off'"),
])
def test_bad_recovery_options_are_one_line_errors(options, message):
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


# ---- gradual linearization: sites annealed from their activation to the identity

from helpers import randomize_batch_norms  # noqa: E402

from easier_kernels.fold.graph import relative_error  # noqa: E402
from easier_kernels.linearize import Annealed, anneal, settle  # noqa: E402


def annealing_case(plan):
    torch.manual_seed(0)
    model = randomize_batch_norms(nn.Sequential(  # (a small net whose output follows its input closely)
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6),
        nn.ReLU6(), nn.Conv2d(6, 6, 1), nn.LeakyReLU(0.2), nn.Conv2d(6, 4, 3, padding=1), nn.GELU(), nn.Flatten(),
        nn.Linear(4 * 28 * 28, 10)), 0).eval()
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    before = ek.linearize(model, [], x, plan="none").eval()
    names = [s.name for s in ek.find_sites(model, x)][:3]
    return before, ek.linearize(before, names, x, plan=plan).eval(), names, x


@pytest.mark.parametrize("plan", ["none", "merge"])
def test_an_annealed_site_is_the_activation_at_0_and_exactly_the_identity_at_1_and_settled(plan):
    before, net, names, x = annealing_case(plan)
    with torch.no_grad():
        linear, original = net(x), before(x)
        sites = anneal(net, before, names)
        assert len(sites) == 3 and all(float(s.t) == 0 for s in sites)
        outputs = []
        for t in (0.0, 0.5, 1.0):
            for site in sites:
                site.t.fill_(t)
            outputs.append(net(x))
    if plan == "none":  # (a merge plan moves padding: the network at t = 0 differs at image borders)
        assert torch.equal(outputs[0], original)
    assert relative_error(outputs[1], linear) > 1e-3 and relative_error(outputs[1], outputs[0]) > 1e-3
    assert torch.equal(outputs[2], linear)  # t = 1: exactly the linear network
    settle(net)
    assert not any(isinstance(m, Annealed) for m in net.modules()) and ek.recipe(net)["linearized"] == names
    with torch.no_grad():
        assert torch.equal(net(x), linear)
        folded = ek.fold(net, x, decide="merge" if plan == "merge" else "measure", check=False)
        assert relative_error(folded(x), linear) < 1e-5  # the fold of the result is exact


def test_the_schedule_raises_t_over_the_fraction_of_the_batches_then_holds_1():
    site = Annealed(nn.ReLU())
    schedule = recovery.Anneal([site], fraction=0.5)
    seen = []
    for index in range(8):
        schedule.before_batch(index, 8)
        seen.append(float(site.t))
    assert seen == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match=r"anneal must be the fraction of a step's batches to anneal over, in \(0, 1\]"):
        recovery.Anneal([site], fraction=0)


def test_t_is_a_buffer_so_compile_does_not_recompile_per_value():
    from torch._dynamo.testing import CompileCounter

    site, counter = Annealed(nn.ReLU()), CompileCounter()
    compiled = torch.compile(site, backend=counter)
    x = torch.randn(4, 3)
    for t in (0.0, 0.3, 0.7, 1.0):
        site.t.fill_(t)
        assert torch.allclose(compiled(x), (1 - t) * torch.relu(x) + t * x)
    assert counter.frame_count == 1
    assert "t" in dict(site.named_buffers())  # (a state dict holds it; DDP broadcasts it)


def test_the_loop_anneals_each_step_s_sites_and_ends_with_the_exact_linear_network(loaders):
    seen = []
    forward = Annealed.forward

    def spy(self, x):
        seen.append(float(self.t))
        return forward(self, x)

    Annealed.forward = spy
    try:
        result = ek.prune(small_model(), *loaders, max_drop=100.0, max_steps=2, plan="merge", progress=False,
                          anneal=0.5)
    finally:
        Annealed.forward = forward
    assert {0.0, 0.5, 1.0} <= set(seen) <= {0.0, 0.5, 1.0}  # 3 batches, half of them: t = 0, 1/2, then 1
    first, second = result.history
    assert first.removed[0] not in second.entropy and len(second.entropy) == len(first.entropy) - 1  # counted the rest
    assert result.settings["anneal"] == 0.5 and not any(isinstance(m, Annealed) for m in result.model.modules())
    assert "annealed to the identity over the first 50% of its batches" in report.summary(result.to_dict())
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        folded = ek.fold(result.model.eval(), x, check=False)
        assert relative_error(folded(x), result.model(x)) < 1e-5


# ---- entropy in the loss: a soft layer entropy that tracks the hard one, and whose gradient lowers it

from easier_kernels.entropy import layer_entropy  # noqa: E402


def hard_entropy(x: torch.Tensor) -> float:
    on = (x >= 0).sum((0, 2, 3))
    return float(layer_entropy(on, x.numel() // x.shape[1]))


def test_the_surrogate_treats_the_two_ends_as_the_issue_asks():
    on, off, half = torch.ones(4) * 0.999, torch.ones(4) * 0.001, torch.full((4,), 0.5)
    assert recovery.surrogate(on, "both") < 0.02 and recovery.surrogate(off, "both") < 0.02  # both ends: low entropy
    assert recovery.surrogate(on, "on") < 0.02 and recovery.surrogate(off, "on") > 1.98  # only always-on is the identity
    assert recovery.surrogate(half, "on") == pytest.approx(1.0) == recovery.surrogate(half, "both")
    p = torch.linspace(0.01, 0.99, 50, requires_grad=True)
    torch.stack([recovery.surrogate(v.reshape(1), "on") for v in p]).sum().backward()
    assert (p.grad < 0).all()  # "on": more on-probability always lowers it


def test_the_soft_entropy_tracks_the_hard_one_on_real_activations():
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    images = torch.stack([splits.train[i][0] for i in range(64)])
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)).train()
    with torch.no_grad():
        conv[0].bias.uniform_(-0.5, 0.5)  # (units at every on-fraction)
        x = conv(images)
    soft = float(recovery.surrogate(recovery.soft_on_probability(x, 1), "both"))
    assert abs(soft - hard_entropy(x)) < 0.05, (soft, hard_entropy(x))


@pytest.mark.parametrize("side", ["on", "both"])
def test_the_surrogate_s_gradient_lowers_the_hard_entropy_of_a_site_on_real_images(side):
    splits = ek.data.load("fashion-mnist-mini", seed=0)
    images = torch.stack([splits.train[i][0] for i in range(64)])
    torch.manual_seed(0)
    conv = nn.Conv2d(1, 16, 3, padding=1)
    before = hard_entropy(conv(images).detach())
    optimizer = torch.optim.SGD(conv.parameters(), lr=5.0)
    for _ in range(60):
        optimizer.zero_grad()
        loss = recovery.surrogate(recovery.soft_on_probability(conv(images), 1), side)
        loss.backward()
        optimizer.step()
    x = conv(images).detach()
    assert hard_entropy(x) < before - 0.2, (before, hard_entropy(x))
    if side == "on":
        assert float((x >= 0).float().mean()) > 0.7  # towards always-on, not always-off (from about half)


def test_the_loop_penalizes_the_sites_next_in_line_and_takes_its_probes_out(loaders, monkeypatch):
    penalized = []
    surrogate = recovery.surrogate

    def spy(p, side="on"):
        penalized.append((p.numel(), side))
        return surrogate(p, side)

    monkeypatch.setattr(recovery, "surrogate", spy)
    result = ek.prune(small_model(), *loaders, max_drop=100.0, max_steps=2, plan="merge", progress=False,
                      entropy_weight=0.1, entropy_side="both")
    first, second = result.history
    assert penalized and {side for _, side in penalized} == {"both"}
    assert second.removed[0] == min(second.entropy, key=second.entropy.get)  # the loop still chooses by entropy
    assert not any(name.startswith("ek_surrogate_") for name, _ in result.model.named_modules())
    assert result.settings["entropy_weight"] == 0.1 and "entropy in the loss for the sites next in line (weight 0.1, " \
        "towards either end)" in report.summary(result.to_dict())
    with pytest.raises(ValueError, match="entropy_side must be one of on, both, not 'off'"):
        ek.Pruner(small_model(), *loaders, entropy_weight=0.1, entropy_side="off")


def test_in_place_activation_calls_anneal_without_overwriting_their_input():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return nn.functional.leaky_relu(self.c(self.b(nn.functional.relu(self.a(x), inplace=True)).relu_()), 0.2)

    torch.manual_seed(0)
    model, x = InPlace().eval(), torch.randn(2, 1, 8, 8)
    before = ek.linearize(model, [], x, plan="none")
    names = [s.name for s in ek.find_sites(model, x)]
    net = ek.linearize(before, names, x, plan="none")
    with torch.no_grad():
        linear = net(x)
        sites = anneal(net, before, names)
        assert torch.equal(net(x), before(x))  # t = 0: the in-place calls ran on copies
        for site in sites:
            site.t.fill_(1.0)
        assert torch.equal(net(x), linear)
