"""Whole-block removal by Block Influence (ShortGPT): which modules are blocks, their scores
against a hand computation, and pruned Hugging Face models that still generate, save and load."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from easier_kernels import depth


@pytest.fixture(scope="module")
def transformers():
    from easier_kernels.compat import import_torchvision

    import_torchvision()
    return pytest.importorskip("transformers", reason="needs the hf extra: pip install '.[hf]'")


def tiny_gpt2(transformers, seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=None, eos_token_id=None)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(transformers, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                                     vocab_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


# ---- toy models whose blocks are known maps


class Map(nn.Module):
    """A block computing fn(hidden_states); returns a tuple (hidden, extra) when as_tuple."""

    def __init__(self, fn, as_tuple=False):
        super().__init__()
        self.fn, self.as_tuple = fn, as_tuple

    def forward(self, hidden_states):
        out = self.fn(hidden_states)
        return (out, None) if self.as_tuple else out


class Toy(nn.Module):
    """Blocks called alternately by position and as hidden_states=; takes an attention_mask it ignores."""

    def __init__(self, fns):
        super().__init__()
        self.layers = nn.ModuleList(Map(fn, as_tuple=i == 1) for i, fn in enumerate(fns))

    def forward(self, x, attention_mask=None):
        for i, layer in enumerate(self.layers):
            out = layer(x) if i % 2 == 0 else layer(hidden_states=x)
            x = out[0] if isinstance(out, tuple) else out
        return x


SHIFT = torch.tensor([1.0, -2.0, 0.5, 3.0])
TOY_FNS = [lambda x: x, lambda x: -x, lambda x: 2 * x, lambda x: x + SHIFT]


def hand_mean(fn_of_cos, inputs, outputs, masks):
    """Token-weighted mean of fn_of_cos(cos) over unmasked tokens, one python loop per token."""
    total, count = 0.0, 0
    for x, y, mask in zip(inputs, outputs, masks):
        for b in range(x.shape[0]):
            for t in range(x.shape[1]):
                if mask[b, t]:
                    u, v = x[b, t].double(), y[b, t].double()
                    total += fn_of_cos(float(u @ v / (u.norm() * v.norm())))
                    count += 1
    return total / count


def toy_batches():
    torch.manual_seed(0)
    first = torch.randn(2, 3, 4)
    mask = torch.ones(2, 3, dtype=torch.long)
    mask[1, 1:] = 0
    first[1, 1:] = torch.tensor([-50.0, 1.0, 1.0, 1.0])  # padding that would move the scores if it counted
    second = torch.randn(1, 5, 4)
    return [{"x": first, "attention_mask": mask}, {"x": second, "attention_mask": torch.ones(1, 5, dtype=torch.long)}]


# ---- blocks_of


def test_blocks_of_hugging_face(transformers):
    assert depth.blocks_of(tiny_gpt2(transformers)) == [f"transformer.h.{i}" for i in range(4)]
    assert depth.blocks_of(tiny_bert(transformers)) == ["bert.encoder.layer.0", "bert.encoder.layer.1"]


class Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList(nn.Linear(4, 4) for _ in range(6))  # longer, but inside the blocks

    def forward(self, x):
        return x + sum(e(x) for e in self.experts)


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.layers = nn.ModuleList(Layer() for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(self.stem[0](x))
        return x


def test_blocks_of_plain_module_and_error():
    assert depth.blocks_of(Plain()) == ["layers.0", "layers.1", "layers.2"]
    assert depth.blocks_of(Toy(TOY_FNS)) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    with pytest.raises(ValueError, match=r"pass blocks=\[paths\]"):
        depth.blocks_of(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))


# ---- block_influence


def test_block_influence_by_hand_with_mask():
    model, batches = Toy(TOY_FNS), toy_batches()
    scores = depth.block_influence(model, batches)
    assert list(scores) == ["layers.0", "layers.1", "layers.2", "layers.3"]
    assert scores["layers.0"] == pytest.approx(0, abs=1e-12)  # identity
    assert scores["layers.1"] == pytest.approx(2, abs=1e-12)  # negation
    assert scores["layers.2"] == pytest.approx(0, abs=1e-12)  # scaling keeps the direction
    inputs = [-2 * b["x"] for b in batches]  # what reaches the shift block
    outputs = [x + SHIFT for x in inputs]
    masks = [b["attention_mask"] for b in batches]
    expected = hand_mean(lambda c: 1 - c, inputs, outputs, masks)
    assert scores["layers.3"] == pytest.approx(expected, rel=1e-9)
    every_token = hand_mean(lambda c: 1 - c, inputs, outputs, [torch.ones_like(m) for m in masks])
    assert abs(expected - every_token) > 1e-3  # the mask mattered
    assert depth.order_by_influence(scores) == ["layers.0", "layers.2", "layers.3", "layers.1"]

    angular = depth.block_influence(model, batches, metric="angular", blocks=["layers.1", "layers.3"])
    assert angular["layers.1"] == pytest.approx(1, abs=1e-6)
    assert angular["layers.3"] == pytest.approx(hand_mean(lambda c: math.acos(c) / math.pi, inputs, outputs, masks), rel=1e-6)


def test_block_influence_tuples_max_batches_and_errors():
    model, batches = Toy(TOY_FNS), toy_batches()
    tuples = [(b["x"], torch.zeros(b["x"].shape[0])) for b in batches]  # no mask: every token counts
    scores = depth.block_influence(model, tuples, max_batches=1)
    inputs = [-2 * tuples[0][0]]
    every_token = hand_mean(lambda c: 1 - c, inputs, [x + SHIFT for x in inputs], [torch.ones(2, 3)])
    assert scores["layers.3"] == pytest.approx(every_token, rel=1e-9)
    with pytest.raises(ValueError, match="metric must be"):
        depth.block_influence(model, batches, metric="euclid")
    with pytest.raises(ValueError, match="no tokens reached"):
        depth.block_influence(model, [])
    with pytest.raises(ValueError, match="has no module"):
        depth.block_influence(model, batches, blocks=["layers.7"])


def test_block_influence_sums_over_ranks(monkeypatch):
    """Sums and token counts both go through sum_over_ranks: two equal ranks give the same means."""
    from easier_kernels import distributed

    calls = []
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "collective_device", lambda: torch.device("cpu"))
    monkeypatch.setattr(distributed, "sum_over_ranks", lambda t: calls.append(t) or t.mul_(2))
    model, batches = Toy(TOY_FNS), toy_batches()
    doubled = depth.block_influence(model, batches)
    monkeypatch.undo()
    assert len(calls) == 2 and doubled == pytest.approx(depth.block_influence(model, batches), rel=1e-12)


def test_block_influence_gpt2_padding_and_state(transformers):
    """Right padding does not count: a padded batch scores as its two unpadded sequences do (causal
    attention: the real tokens' states do not see the padding). The model's flags are restored."""
    model = tiny_gpt2(transformers).train()
    model.transformer.h[1].eval()  # a mixed state, to be restored as it was
    flags = [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    padded = depth.block_influence(model, [{"input_ids": ids, "attention_mask": mask, "labels": ids}])
    apart = depth.block_influence(model, [{"input_ids": ids[:1]}, {"input_ids": ids[1:, :5]}])
    assert padded == pytest.approx(apart, rel=1e-5)
    assert all(0 <= s <= 2 for s in padded.values())
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(m._forward_hooks for m in model.modules())


# ---- remove_blocks


def test_remove_identity_block_changes_nothing(transformers):
    model = tiny_gpt2(transformers)
    block = model.transformer.h[2]
    with torch.no_grad():  # residual branches zeroed: the block is exactly the identity
        for proj in (block.attn.c_proj, block.mlp.c_proj):
            proj.weight.zero_()
            proj.bias.zero_()
    before = copy.deepcopy(model.state_dict())
    pruned = depth.remove_blocks(model, ["transformer.h.2"])
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, model(ids).logits, atol=1e-5, rtol=0)
    assert pruned.config.n_layer == pruned.config.num_hidden_layers == 3
    assert [b.attn.layer_idx for b in pruned.transformer.h] == [0, 1, 2]
    # the caller's model untouched
    assert len(model.transformer.h) == 4 and model.config.n_layer == 4
    assert [b.attn.layer_idx for b in model.transformer.h] == [0, 1, 2, 3]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def greedy_by_full_forwards(model, ids, steps):
    with torch.no_grad():
        for _ in range(steps):
            next_id = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    return ids


def test_pruned_gpt2_generates_saves_and_loads(transformers, tmp_path):
    model = tiny_gpt2(transformers, seed=3)
    pruned = depth.remove_blocks(model, ["transformer.h.0", "transformer.h.2"])
    assert [b.attn.layer_idx for b in pruned.transformer.h] == [0, 1]
    ids = torch.randint(0, 64, (1, 5), generator=torch.Generator().manual_seed(4))
    settings = dict(attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = pruned.generate(ids, use_cache=True, **settings)
    uncached = pruned.generate(ids, use_cache=False, **settings)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_by_full_forwards(pruned, ids, 8))

    pruned.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert loaded.config.n_layer == 2 and len(loaded.transformer.h) == 2
    with torch.no_grad():
        torch.testing.assert_close(loaded(cached).logits, pruned(cached).logits)


def test_pruned_bert_classifier_runs(transformers):
    model = tiny_bert(transformers)
    pruned = depth.remove_blocks(model, ["bert.encoder.layer.0"])
    assert pruned.config.num_hidden_layers == 1 and len(pruned.bert.encoder.layer) == 1
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    with torch.no_grad():
        out = pruned(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)


def test_remove_from_plain_module_and_errors(transformers):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(4)])
    pruned = depth.remove_blocks(model, ["1", "3"])
    x = torch.randn(3, 4)
    torch.testing.assert_close(pruned(x), model[2](model[0](x)))
    assert len(model) == 4 and [name for name, _ in pruned.named_children()] == ["0", "1"]

    toy = Toy(TOY_FNS)
    assert len(depth.remove_blocks(toy, ["layers.1"]).layers) == 3

    gpt2 = tiny_gpt2(transformers)
    for bad, message in [("transformer.h.9", "has no module"), ("transformer.wte", "is not an entry"),
                         ("transformer.h", "is not an entry")]:
        with pytest.raises(ValueError, match=message):
            depth.remove_blocks(gpt2, [bad])
    with pytest.raises(ValueError, match="every block"):
        depth.remove_blocks(gpt2, depth.blocks_of(gpt2))
