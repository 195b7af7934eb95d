"""The training-free scores beside the entropy: each on hand-made activations with a known answer."""

import math

import pytest
import torch
import torch.nn as nn

import easier_kernels as ek
from easier_kernels.scores import SCORES, off_fraction, on_split, output_change, random_scores, training_free
from helpers import real_batches


class Ends(nn.Module):
    """On positive inputs: `on` is always on (the identity), `off` always off (outputs 0), `mixed`
    sees both signs."""

    def __init__(self):
        super().__init__()
        self.on, self.off, self.mixed = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.scale = nn.Parameter(torch.tensor(2.0))

    def forward(self, x):
        return self.scale * self.on(x) + self.off(-x) + self.mixed(x - 0.5)


def test_the_on_split_and_the_off_fraction_of_known_probabilities():
    p = torch.tensor([1.0, 0.0, 0.5, 0.99, math.nan], dtype=torch.float64)
    assert on_split(p) == (0.25, 0.25)  # the NaN channel left out
    assert on_split(p, tol=0.02) == (0.5, 0.25)
    assert off_fraction(p) == pytest.approx((0 + 1 + 0.5 + 0.01) / 4)
    assert math.isnan(on_split(torch.tensor([math.nan]))[0])


def test_output_change_is_zero_for_an_always_on_site_and_the_hand_computed_norm_for_the_others():
    x = torch.rand(6, 5) + 0.01
    model = Ends()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    change = output_change(model.train(), [(x[:3], None), (x[3:], None)], max_batches=2)
    assert list(change) == ["on", "off", "mixed"]
    f = model(x).detach().double()
    assert change["on"] == 0.0  # linearizing an always-on ReLU changes nothing
    # linearized, `off` outputs -x instead of 0; `mixed` outputs x - 0.5 instead of relu(x - 0.5)
    assert change["off"] == pytest.approx(float((-x).double().norm() / f.norm()), rel=1e-6)
    moved = (x - 0.5).double() - torch.relu(x - 0.5).double()
    assert change["mixed"] == pytest.approx(float(moved.norm() / f.norm()), rel=1e-6)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_output_change_runs_in_eval_mode_on_a_real_network():
    """Batch norms use their running statistics (eval), so the score of a batch does not depend
    on the other samples in it: one batch of 8 and two of 4 give the same change."""
    torch.manual_seed(0)
    model = ek.models.resnet18(width=0.25)
    images = torch.cat([b[0] for b in real_batches(1, 8)])
    whole = output_change(model, [images], max_batches=1, sites=["relu", "layer4_1_relu2"])
    halves = output_change(model, [images[:4], images[4:]], max_batches=2, sites=["relu", "layer4_1_relu2"])
    assert whole.keys() == halves.keys() == {"relu", "layer4_1_relu2"}
    for name in whole:
        assert 0 < whole[name] == pytest.approx(halves[name], rel=1e-5)


def test_every_score_from_one_pass_and_the_random_floor_is_seeded():
    x = torch.rand(4, 5) + 0.01
    counted = ek.entropy_scores(Ends(), [x], energy=True)
    table = training_free(counted, output_change(Ends(), [x]), seed=3)
    assert list(table) == list(SCORES)
    assert table["entropy"]["on"] == table["entropy"]["off"] == 0.0
    assert table["off_fraction"]["on"] == 0.0 and table["off_fraction"]["off"] == 1.0
    assert table["linearization_error"]["on"] == 0.0 and table["linearization_error"]["off"] == math.inf
    assert table["random"] == random_scores(["on", "off", "mixed"], 3) != random_scores(["on", "off", "mixed"], 4)
    assert set(training_free(ek.entropy_scores(Ends(), [x]))) == {"entropy", "off_fraction", "random"}


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="max_batches must be a positive"):
        output_change(Ends(), [torch.rand(2, 3)], max_batches=0)
    with pytest.raises(ValueError, match="yielded no batches"):
        output_change(Ends(), [])
