"""Transformers folded: GPT-2's Conv1D as the Linear it is, a linearized MLP merged into one
linear, and `ek.write_back` putting the fold into the model's own modules (generate() works)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import easier_kernels as ek
from easier_kernels.compat import import_torchvision
from easier_kernels.fold import algebra
from easier_kernels.fold.write_back import edits_of
from easier_kernels.fold.chains import find_chains, linear_views
from easier_kernels.fold.graph import relative_error

import_torchvision()
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install --no-build-isolation '.[hf]'")


def tiny_gpt2(seed: int = 0, layers: int = 2, width: int = 32):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=layers, n_embd=width, n_head=2, vocab_size=64, n_positions=64,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2LMHeadModel(config).eval()


def tiny_bert(seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=128,
                                     vocab_size=64, max_position_embeddings=64, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def ids(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, *args, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def mlp_sites(model, example) -> list[str]:
    return [s.name for s in ek.find_sites(model, example)]


# ---- Conv1D as Linear


def test_conv1d_as_linear_computes_the_same():
    conv1d = transformers.pytorch_utils.Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs; weight [16, 24]
    x = torch.randn(3, 5, 16)
    linear = algebra.conv1d_as_linear(conv1d)
    assert type(linear) is nn.Linear and linear.weight.shape == (24, 16)
    torch.testing.assert_close(linear(x), conv1d(x))
    back = algebra.linear_as_conv1d(linear, type(conv1d))
    assert type(back) is type(conv1d)
    torch.testing.assert_close(back.weight, conv1d.weight)
    torch.testing.assert_close(back(x), conv1d(x))


def test_conv1d_recognised_by_its_class_only():
    conv1d = transformers.pytorch_utils.Conv1D(8, 4)

    class MyConv1D(transformers.pytorch_utils.Conv1D):  # a subclass may compute something else
        pass

    assert ek.capture.is_hf_conv1d(conv1d)
    assert not ek.capture.is_hf_conv1d(MyConv1D(8, 4))
    assert not ek.capture.is_hf_conv1d(nn.Linear(4, 8))


def test_gpt2_conv1d_calls_are_captured_as_modules_and_viewed_as_linears():
    model, x = tiny_gpt2(), ids()
    gm = ek.capture.capture(model, (x,))
    called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    assert {"transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj", "transformer.h.0.attn.c_attn"} <= called
    replaced = linear_views(gm)
    assert "transformer.h.1.mlp.c_fc" in replaced
    assert all(type(gm.get_submodule(p)) is nn.Linear for p in replaced)
    assert relative_error(gm(x), model(x, use_cache=False).logits) < 1e-5


# ---- the MLP merge


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_bert], ids=["gpt2-conv1d", "bert-linear"])
def test_linearized_mlp_folds_into_one_d_by_d_linear(build):
    model, x = build(), ids()
    sites = mlp_sites(model, (x,))
    net = ek.linearize(model, sites, (x,))
    folded = ek.fold(net, (x,), decide="merge")
    rows = [r for r in ek.recipe(folded)["fold"]["decisions"] if r["choice"].startswith("merge")]
    assert len(rows) == len(sites)  # one merged chain per linearized MLP
    width = model.config.hidden_size
    merged = [m for name, m in folded.named_modules() if name.startswith("fold_")]
    assert merged and all(type(m) is nn.Linear and m.weight.shape == (width, width) for m in merged)
    # the folded MLPs equal the linearized ones within the fold tolerance
    assert relative_error(logits(folded, x), logits(net, x)) <= ek.recipe(folded)["fold"]["tolerance"]
    # fewer multiply-adds: d x d instead of d x 4d twice
    assert ek.payoff.counts(folded, (x,))["macs"] < ek.payoff.counts(model, (x,))["macs"]


def test_unlinearized_gpt2_has_no_mlp_chain():
    model, x = tiny_gpt2(), ids()
    gm = ek.capture.capture(model, (x,))
    linear_views(gm)
    assert not [c for c in find_chains(gm) if "mlp" in c.name]  # the activation still stands between


# ---- write_back


def folded_gpt2(layers: int = 2, linearized: slice = slice(0, 1), decide: str = "merge"):
    model, x = tiny_gpt2(layers=layers), ids()
    sites = mlp_sites(model, (x,))[linearized]
    net = ek.linearize(model, sites, (x,))
    with torch.no_grad():  # fine-tuned weights differ from the model's: write_back must take the fold's
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model, net, ek.fold(net, (x,), decide=decide), x


def test_write_back_keeps_a_gpt2_that_generates_what_the_fold_computes():
    model, net, folded, x = folded_gpt2()
    written = ek.write_back(folded, model)
    assert type(written) is type(model) and written is not model
    mlp = written.transformer.h[0].mlp
    assert type(mlp.act) is nn.Identity and type(mlp.c_proj) is nn.Identity
    assert ek.capture.is_hf_conv1d(mlp.c_fc) and mlp.c_fc.weight.shape == (32, 32)  # GPT-2's own layer type, d x d
    assert ek.capture.is_hf_conv1d(written.transformer.h[1].mlp.c_fc)  # the untouched MLP keeps its Conv1D
    assert relative_error(logits(written, x), logits(folded, x)) < 1e-5
    assert relative_error(logits(written, x), logits(net, x)) < 1e-4  # the fine-tuned weights, not the model's
    # greedy decoding with the KV cache = greedy decoding with the folded GraphModule, token for token
    prompt = ids(1, 5, seed=3)
    generated = written.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                 min_new_tokens=12, do_sample=False, use_cache=True, pad_token_id=0)
    tokens = prompt
    for _ in range(12):
        tokens = torch.cat([tokens, logits(folded, tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, tokens)


def test_write_back_leaves_the_model_alone_and_records_its_edits():
    model, _, folded, x = folded_gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    written = ek.write_back(folded, model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.transformer.h[0].mlp.act) is not nn.Identity
    edits = edits_of(written)
    assert edits["transformer.h.0.mlp.act"] == {"type": "Identity"}
    assert edits["transformer.h.0.mlp.c_proj"] == {"type": "Identity"}
    assert edits["transformer.h.0.mlp.c_fc"]["type"] == "Conv1D"
    assert written.lm_head.weight is written.transformer.wte.weight  # tied weights stay tied


def test_written_back_model_saves_and_rebuilds(tmp_path):
    model, _, folded, x = folded_gpt2()
    written = ek.write_back(folded, model)
    written.save_pretrained(tmp_path)
    rebuilt = ek.models.load_pretrained(tmp_path)
    assert type(rebuilt.transformer.h[0].mlp.c_proj) is nn.Identity
    torch.testing.assert_close(logits(rebuilt, x), logits(written, x))


def test_write_back_of_bert_takes_the_absorbed_residual_out_again():
    model, x = tiny_bert(), ids()
    sites = mlp_sites(model, (x,))
    folded = ek.fold(ek.linearize(model, sites, (x,)), (x,), decide="merge")
    written = ek.write_back(folded, model)
    assert relative_error(logits(written, x), logits(folded, x)) < 1e-4
    assert type(written.bert.encoder.layer[0].output.dense) is nn.Identity
    assert written.bert.encoder.layer[0].intermediate.dense.weight.shape == (32, 32)


def test_write_back_of_a_cnn_folds_batch_norms_into_its_convs():
    torch.manual_seed(0)
    model = ek.models.resnet18(num_classes=10, in_channels=3, width=0.125).eval()
    x = torch.randn(2, 3, 16, 16)
    sites = [s.name for s in ek.find_sites(model, x)][1:3]
    folded = ek.fold(ek.linearize(model, sites, x, plan="merge"), x, decide="merge", portable=True)
    written = ek.write_back(folded, model)
    assert type(written) is type(model)
    assert not any(type(m) in (nn.BatchNorm2d,) for m in written.modules())  # folded into their convs
    assert relative_error(written(x), folded(x)) < 1e-4


def test_write_back_refuses_what_is_not_a_fold_and_functional_activations():
    model, net, folded, x = folded_gpt2()
    with pytest.raises(ek.WriteBackError, match="fold it first"):
        ek.write_back(net, model)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    small = Functional().eval()
    example = torch.randn(2, 8)
    site = ek.find_sites(small, example)[0].name
    small_folded = ek.fold(ek.linearize(small, [site], example), example, decide="merge")
    with pytest.raises(ek.WriteBackError, match="called as a function"):
        ek.write_back(small_folded, small)


def test_write_back_refuses_a_module_called_twice_with_one_call_linearized():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2, self.fc3 = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))

    model, example = Shared().eval(), torch.randn(2, 8)
    first = ek.find_sites(model, example)[0].name
    folded = ek.fold(ek.linearize(model, [first], example), example, decide="merge")
    with pytest.raises(ek.WriteBackError, match="called 2 times"):
        ek.write_back(folded, model)


def test_write_back_catches_a_forward_the_graph_does_not_show():
    model, _, folded, x = folded_gpt2()

    class Sneaky(type(model)):  # reads a weight outside its module's call: the graph cannot show it
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits + self.transformer.h[0].mlp.c_fc.weight.sum()
            return out

    sneaky = Sneaky(model.config).eval()
    sneaky.load_state_dict(model.state_dict())
    with pytest.raises(ek.WriteBackError, match="differs from the folded module"):
        ek.write_back(folded, sneaky)
