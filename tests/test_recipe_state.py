"""A pruned network's state dict carries its recipe: a plain load into the original is an error
(not a silent swap back to the original's activations and paddings), ek.load rebuilds from it."""

import copy

import types

import pytest
import torch
import torch.nn as nn

import easier_kernels as ek
from helpers import Gate

KEY = "easier_kernels.recipe:load_with_ek.load"  # what a reader sees in torch's "Unexpected key(s)"


class Tiny(nn.Module):
    """conv-bn-relu-conv-bn-relu: linearizing relu1 moves conv2's padding onto conv1; the gate
    cannot be traced (a leaf module)."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()
        self.gate, self.head = Gate(), nn.Linear(4, 3)

    def forward(self, x):
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        return self.head(self.gate(x).mean((2, 3)))


def pruned(sites=("relu1",)):
    """Tiny with `sites` linearized (padding moved), its weights and statistics changed as fine-tuning would."""
    torch.manual_seed(0)
    net = ek.linearize(Tiny(), list(sites), torch.randn(2, 3, 8, 8), plan="merge", leaf_modules=[Gate])
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
        net.train()(torch.randn(4, 3, 8, 8))  # batch norm statistics
    return net.eval()


def outputs(net, x):
    with torch.no_grad():
        return net.eval()(x)


def test_a_pruned_state_dict_does_not_load_into_the_original():
    net, original = pruned(), Tiny()
    assert ek.recipe(net)["padding"]  # a moved padding and a removed activation: another network
    with pytest.raises(RuntimeError, match=f'Unexpected key.*"{KEY}"'):
        original.load_state_dict(net.state_dict())
    # strict=False loads the weights into the original architecture, and names what it skipped
    assert original.load_state_dict(net.state_dict(), strict=False).unexpected_keys == [KEY]


def test_ek_load_rebuilds_the_network_from_its_state_dict_or_a_saved_one(tmp_path):
    net = pruned()
    x = torch.randn(3, 3, 8, 8)
    state = net.state_dict()
    torch.save(state, tmp_path / "pruned_state.pt")
    for source in (state, tmp_path / "pruned_state.pt", str(tmp_path / "pruned_state.pt")):
        loaded = ek.load(source, Tiny)  # the leaf module recorded in the entry: no leaf_modules needed
        assert ek.recipe(loaded) == ek.recipe(net)
        assert torch.equal(outputs(loaded, x), outputs(net, x))
        got = loaded.state_dict()
        assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    assert torch.equal(outputs(ek.load(state, Tiny()), x), outputs(net, x))  # model_fn may be the module itself


def test_a_folded_modules_state_dict_rebuilds_too():
    net, x = pruned(), torch.randn(3, 3, 8, 8)
    folded = ek.fold(net, x, decide="merge", check=False, leaf_modules=[Gate])
    loaded = ek.load(folded.state_dict(), Tiny)
    assert [r["choice"] for r in ek.recipe(loaded)["fold"]["decisions"]] == ["merge2"]
    assert torch.equal(outputs(loaded, x), outputs(folded, x))


def test_a_state_dict_of_another_pruned_network_does_not_load():
    net, other = pruned(["relu1"]), pruned(["relu2"])
    with pytest.raises(RuntimeError, match=r"another pruned network: linearized sites \['relu1'\] \(this module: \['relu2'\]\)"):
        other.load_state_dict(net.state_dict())
    other.load_state_dict(Tiny().state_dict())  # a plain state dict (the original's weights) still loads


def test_the_entry_follows_wrappers_and_copies():
    net = pruned()
    wrapped = nn.ModuleDict({"net": net})
    assert list(wrapped.state_dict())[-1] == f"net.{KEY}"
    nn.ModuleDict({"net": pruned()}).load_state_dict(wrapped.state_dict())
    compiled = torch.compile(copy.deepcopy(net))  # (not run: only its state dict's prefix)
    assert f"_orig_mod.{KEY}" in compiled.state_dict()
    compiled.load_state_dict(torch.compile(net).state_dict())
    copied = copy.deepcopy(net).to(torch.float64)
    assert torch.equal(copied.state_dict()[KEY], net.state_dict()[KEY])


def test_ek_load_of_a_plain_or_broken_state_dict_is_a_one_line_error(tmp_path):
    with pytest.raises(ValueError, match="is a plain state dict") as plain:
        ek.load(Tiny().state_dict(), Tiny)
    assert "\n" not in str(plain.value)
    broken = dict(pruned().state_dict(), **{KEY: torch.tensor([1, 2, 3], dtype=torch.uint8)})
    with pytest.raises(ValueError, match="is not an easier_kernels recipe"):
        ek.load(broken, Tiny)
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="neither a PruneResult file nor a pruned network's state dict"):
        ek.load(tmp_path / "list.pt", Tiny)


def test_the_cli_refuses_a_pruned_network_as_weights(tmp_path):
    from easier_kernels.cli import UsageError, _load_weights

    torch.save({"state_dict": pruned().state_dict()}, tmp_path / "pruned.pt")
    with pytest.raises(UsageError, match="holds a pruned network.*ek.load"):
        _load_weights(Tiny(), types.SimpleNamespace(weights=tmp_path / "pruned.pt", model="tiny", epochs=1))
