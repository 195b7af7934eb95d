"""Capture (torch.fx, else torch.export), inputs of real models, and what counts as an activation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.capture import (TraceFailure, as_call, batch_inputs, batch_targets, capture, default_loss,
                                    example_from_spec, example_spec, few_samples, logits_of)
from helpers import real_batches


# ---- inputs


def test_as_call_forms():
    x, y = torch.zeros(2, 3), torch.ones(2)
    assert as_call(x) == ((x,), {})
    assert as_call((x, y)) == ((x, y), {})
    assert as_call({"a": x}) == ((), {"a": x})
    assert as_call(((x,), {"b": y})) == ((x,), {"b": y})
    with pytest.raises(TypeError, match="example inputs must be"):
        as_call(3)


def test_batch_inputs_and_targets():
    x, y, ids = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(4, 5, dtype=torch.long)
    assert batch_inputs(x) == ((x,), {})
    assert batch_inputs((x, y)) == ((x,), {})
    assert batch_inputs(((x, x), y))[0] == (x, x)  # several positional inputs
    args, kwargs = batch_inputs({"input_ids": ids, "attention_mask": ids, "labels": y})
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"}  # labels are not an input
    assert batch_targets((x, y)) is y and batch_targets({"labels": y}) is y and batch_targets(x) is None
    args, kwargs = batch_inputs({"pixels": x, "y": y}, inputs_fn=lambda b: ((b["pixels"],), {}))
    assert args == (x,) and kwargs == {}
    with pytest.raises(TypeError, match="uint8"):
        batch_inputs((x.to(torch.uint8), y))


def test_batch_encoding_is_keyword_inputs():
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")
    ids, labels = torch.ones(2, 5, dtype=torch.long), torch.tensor([0, 1])
    batch = transformers.BatchEncoding({"input_ids": ids, "attention_mask": ids, "labels": labels})
    args, kwargs = batch_inputs(batch)
    assert args == () and set(kwargs) == {"input_ids", "attention_mask"} and batch_targets(batch) is labels


class _Output(dict):  # a Hugging Face ModelOutput is a dict with attributes
    __getattr__ = dict.get


def test_default_loss_reads_loss_logits_and_token_targets():
    logits, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    assert torch.equal(default_loss(logits, (None, y)), F.cross_entropy(logits, y))
    assert torch.equal(default_loss(_Output(logits=logits), {"labels": y}), F.cross_entropy(logits, y))
    own = torch.tensor(1.5)
    assert default_loss(_Output(loss=own, logits=logits), {"labels": y}) is own
    per_token = torch.randn(2, 5, 3)
    targets = torch.randint(0, 3, (2, 5))
    assert torch.allclose(default_loss(per_token, (None, targets)), F.cross_entropy(per_token.reshape(10, 3), targets.reshape(10)))
    assert logits_of((logits, "aux")) is logits
    with pytest.raises(ValueError, match="loss_fn"):
        default_loss(logits, logits)


def test_few_samples_cuts_every_batched_input_alike():
    x, ids, table = torch.randn(16, 3), torch.ones(16, 5, dtype=torch.long), torch.randn(7, 2)
    args, kwargs = few_samples(((x, table), {"ids": ids, "flag": True}))
    assert torch.equal(args[0], x[:2]) and torch.equal(kwargs["ids"], ids[:2])
    assert args[1] is table and kwargs["flag"] is True  # not batched: left whole
    (one,), _ = few_samples(x[:1])
    assert torch.equal(one, torch.cat([x[:1], x[:1]]))  # a batch of one repeated
    (two,), _ = few_samples(x[:2])
    assert two is not None and torch.equal(two, x[:2])
    nested, _ = few_samples(([x, x],))
    assert [t.shape[0] for t in nested[0]] == [2, 2]


def test_example_spec_round_trip():
    spec = example_spec(((torch.zeros(1, 3, 8, 8),), {"mask": torch.zeros(1, 4, dtype=torch.long)}))
    args, kwargs = example_from_spec(spec)
    assert args[0].shape == (1, 3, 8, 8) and args[0].dtype == torch.float32
    assert kwargs["mask"].dtype == torch.long and bool((kwargs["mask"] == 1).all())


# ---- capture


class ShapeBranch(nn.Module):
    """Python control flow on a shape: torch.fx cannot trace it, torch.export can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, scale=None):
        h = self.act(self.bn(self.conv(x)))
        if h.shape[-1] > 2:  # control flow on a shape
            h = F.gelu(self.conv2(h))
        if scale is not None:
            h = h * scale
        return self.fc(self.drop(h.mean((2, 3))))


def test_export_fallback_restores_module_calls():
    model = ShapeBranch().eval()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(TraceFailure, match="pass example inputs"):
        capture(model)
    gm = capture(model, x)
    assert gm.meta["ek_capture"]["by"] == "export"
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"conv", "bn", "act", "conv2", "drop", "fc"} <= called  # mode-aware modules stay modules
    sites = ek.find_sites(model, x)
    assert [(s.name, s.kind, s.channels, s.channel_dim) for s in sites] == [("act", "relu", 8, 1), ("gelu", "gelu", 8, 1)]
    other = torch.randn(5, 3, 8, 8)  # another batch size
    with torch.no_grad():
        assert torch.allclose(gm(other), model(other), atol=1e-6)
    gm.train()  # dropout and batch norm follow the module's mode
    assert not torch.equal(gm(other), gm(other))


def test_export_capture_keyword_inputs_linearize_and_train():
    model = ShapeBranch()
    x, scale = torch.randn(2, 3, 8, 8), torch.tensor(2.0)
    example = ((x,), {"scale": scale})
    net = ek.linearize(model, ["gelu"], example, plan="merge")
    assert [s.name for s in ek.sites.sites_of(net)] == ["act"]  # names are stable
    with torch.no_grad():
        expected = model.eval().fc(model.conv2(model.act(model.bn(model.conv(x)))).mul(scale).mean((2, 3)))
        assert torch.allclose(net.eval()(x, scale=scale), expected, atol=1e-5)
    loss = ek.train.fit(net, [((x, ), torch.tensor([0, 1]))] * 2, epochs=1, inputs_fn=lambda b: ((b[0][0],), {"scale": scale}))
    assert math.isfinite(loss)


class CachingAttention(nn.Module):
    """Caches a tensor derived from its parameters between eval calls (as timm's LeViT and
    EfficientFormer do): a torch.fx trace stores a proxy in the cache and goes wrong after."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.bias = nn.Parameter(torch.randn(4))
        self.cache = {}

    def forward(self, x):
        if self.training:
            bias = self.bias * 2
        else:
            if "b" not in self.cache:
                self.cache["b"] = self.bias * 2
            bias = self.cache["b"]
        return F.relu(self.fc(x) + bias)


class TwoCaching(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = CachingAttention(), CachingAttention()

    def forward(self, x):
        return self.b(self.a(x))


def test_model_caches_survive_capture_and_stale_graphs_are_not_used():
    model = TwoCaching().eval()
    x = torch.randn(3, 4)
    with torch.no_grad():
        expected = model(x)
    model.a.cache.clear(), model.b.cache.clear()
    gm = capture(model, x)
    assert model.a.cache == {} and model.b.cache == {}  # no proxy left in the model
    with torch.no_grad():
        assert torch.allclose(gm(x), expected) and torch.allclose(model(x), expected)


def test_untraceable_without_example_names_the_fix():
    with pytest.raises(TraceFailure, match="torch.fx cannot trace"):
        ek.EntropyMeter(ShapeBranch())


# ---- channel dims from propagated shapes


class PatchTokens(nn.Module):
    """conv -> flatten(2).transpose(1, 2) -> GELU: neurons on the last dim, tokens on dim 1."""

    def __init__(self, tokens_side: int, channels: int):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, 1)
        self.act = nn.GELU()
        self.side = tokens_side

    def forward(self, x):
        return self.act(self.embed(x).flatten(2).transpose(1, 2)).mean(1)


@pytest.mark.parametrize("side, channels", [(3, 5), (2, 4)])  # 9 tokens != 5 channels; 4 tokens == 4 channels
def test_channel_dim_follows_transposes(side, channels):
    model = PatchTokens(side, channels)
    x = torch.randn(2, 3, side, side)
    (site,) = ek.find_sites(model, x)
    assert site.channel_dim == -1 and site.channels == channels
    scores = ek.entropy_scores(model, [x])
    h = model.embed(x).flatten(2).transpose(1, 2).detach()
    on = (h >= 0).reshape(-1, channels).sum(0)
    assert torch.equal(scores.counts[site.name], on)


class Reshaped(nn.Module):
    """linear -> view to heads -> permute -> relu: the channel dim is carried through both."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 12)

    def forward(self, x):  # [N, L, 6] -> [N, L, 12] -> [N, L, 3, 4] -> [N, 3, L, 4]
        n, length, _ = x.shape
        return F.relu(self.fc(x).view(n, length, 3, 4).permute(0, 2, 1, 3))


def test_channel_dim_through_view_and_permute():
    (site,) = ek.find_sites(Reshaped(), torch.randn(2, 5, 6))
    assert site.channel_dim == -1 and site.channels == 4  # the neurons split into heads: per head dim


# ---- activations


class TanhGelu(nn.Module):
    """GPT-2's GELU, written out."""

    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class QuickGelu(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Mlp(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(6, 10), act, nn.Linear(10, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def test_declared_activation_modules():
    model = Mlp(TanhGelu())
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="activations=\\{MyAct: 'gelu_tanh'\\}"):
        ek.find_sites(model, x)
    (site,) = ek.find_sites(model, x, activations={TanhGelu: "gelu_tanh"})
    assert (site.name, site.kind, site.kind_args, site.module, site.channels) == ("act", "gelu", {"approximate": "tanh"}, "act", 10)
    scores = ek.entropy_scores(model, [x], activations={TanhGelu: "gelu_tanh"})
    assert torch.equal(scores.counts["act"], (model.fc1(x) >= 0).sum(0))
    net = ek.linearize(model, ["act"], x, activations={TanhGelu: "gelu_tanh"}, plan="none")
    with torch.no_grad():
        assert torch.allclose(net(x), model.fc2(model.fc1(x)), atol=1e-6)
    with pytest.raises(TypeError, match="nn.Module classes"):
        ek.find_sites(model, x, activations={3: "relu"})
    with pytest.raises(TypeError, match="approximate"):
        ek.find_sites(model, x, activations={TanhGelu: ("relu", {"approximate": "tanh"})})


def test_activation_the_kernels_do_not_compute_is_counted_unfused():
    model = Mlp(QuickGelu())
    x = torch.randn(8, 6)
    meter = ek.EntropyMeter(model, example_inputs=x, activations={QuickGelu: "quick_gelu"})
    with torch.no_grad():
        out = meter.model(x)
        assert torch.allclose(out, model(x))  # the module itself still computes it
    scores = meter.scores()
    assert torch.equal(scores.counts["act"], (model.fc1(x) >= 0).sum(0))


def test_known_library_activations_compute_their_kind():
    """Every known library activation computes the kind it is recorded as (within rounding)."""
    from easier_kernels.activations import KNOWN_MODULES
    from easier_kernels.compat import import_torchvision
    from easier_kernels.ops import kinds

    import_torchvision()
    x = torch.linspace(-6, 6, 1001, dtype=torch.float64)
    checked = 0
    for name, (kind, kind_args) in KNOWN_MODULES.items():
        module_name, _, cls_name = name.rpartition(".")
        try:
            cls = getattr(__import__(module_name, fromlist=[cls_name]), cls_name)
        except (ImportError, AttributeError):
            continue  # that library (or class) is not installed here
        got = cls()(x)
        if kind == "quick_gelu":
            expected = x * torch.sigmoid(1.702 * x)
        elif kind == "mish":
            expected = x * torch.tanh(F.softplus(x))
        else:
            expected = kinds.forward(x, *kinds.resolve(kind, kind_args))
        assert torch.allclose(got, expected, atol=1e-3), name
        checked += 1
    assert checked >= 10


def test_prune_with_dict_batches_and_several_inputs():
    """prune keeps every input: keyword inputs and several positional ones reach the model."""
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = ek.models.resnet18(width=0.125)

        def forward(self, x, gain):
            return self.body(x) * gain

    batches = real_batches(2, 16)
    train = [{"x": x, "gain": torch.ones(len(x), 1), "labels": y} for x, y in batches]
    result = ek.prune(TwoInputs(), train, train, max_drop=100, max_steps=1, progress=False, plan="none",
                      lr=0.001)
    assert len(result.history) == 1 and result.linearized
    assert result.example == {"args": [], "kwargs": {"x": {"shape": [1, 3, 32, 32], "dtype": "float32"},
                                                     "gain": {"shape": [1, 1], "dtype": "float32"}}}
    seen = []
    result = ek.prune(TwoInputs(), train, train, max_drop=100, max_steps=1, progress=False, plan="none",
                      inputs_fn=lambda b: ((b["x"], b["gain"]), {}),
                      loss_fn=lambda out, b: seen.append(1) or F.cross_entropy(out, b["labels"]))
    assert seen and len(result.history) == 1
