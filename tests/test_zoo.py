"""Models nobody here wrote: a zoo of timm and Hugging Face transformers architectures, randomly
initialized (nothing is downloaded), each taken through the whole method on real data: sites
found, scored on real images (or token ids of real text), the lower-entropy half linearized,
fine-tuned one step, folded; the folded model computes the linearized one's outputs within
tolerance, or fold refuses naming the chain and the reason.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.compat import import_torchvision
from easier_kernels.fold.graph import relative_error
from helpers import real_images

import_torchvision()  # timm imports torchvision
timm = pytest.importorskip("timm", reason="needs the timm extra: pip install --no-build-isolation '.[timm]'")
transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install --no-build-isolation '.[hf]'")

TOLERANCE = 1e-4
SIZE = 64  # image side: small enough for CI, large enough for every model's downsampling
FIXED_SIZE = {"efficientformer_l1": 224}  # attention biases sized for 224 px inputs

# name -> create_model keyword arguments (img_size where the architecture fixes its input size)
TIMM_MODELS = {
    # CNNs
    "resnet10t": {}, "resnet18": {}, "resnet26d": {}, "resnext26ts": {}, "seresnext26d_32x4d": {},
    "regnetx_002": {}, "regnety_002": {}, "densenet121": {}, "dla34": {}, "repvgg_a0": {}, "cspresnet50": {},
    "xception41": {},
    # mobile networks
    "mobilenetv2_050": {}, "mobilenetv3_small_050": {}, "efficientnet_b0": {}, "tf_efficientnet_lite0": {},
    "mnasnet_050": {}, "lcnet_050": {}, "ghostnet_050": {}, "rexnet_100": {}, "mixnet_s": {}, "tinynet_e": {},
    # vision transformers and MetaFormers
    "vit_tiny_patch16_224": {"img_size": SIZE}, "deit_tiny_patch16_224": {"img_size": SIZE},
    "pit_ti_224": {"img_size": SIZE}, "convnext_atto": {}, "poolformer_s12": {},
    # hybrids
    "levit_128s": {"img_size": SIZE}, "efficientformer_l1": {}, "mobilevit_xxs": {}, "edgenext_xx_small": {},
    "fastvit_t8": {}, "coatnet_nano_rw_224": {"img_size": SIZE},
}


def _images(n: int = 8, size: int = SIZE):
    images, labels = real_images()
    x = F.interpolate(images[:n], size=(size, size), mode="bilinear", align_corners=False)
    return x, labels[:n] % 3


def _token_ids(batch: int = 4, length: int = 16, vocab: int = 128):
    """Token ids of real text: the bytes of this repository's README, folded into the vocabulary."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_bytes()[: batch * length]
    ids = torch.tensor(list(text), dtype=torch.long).reshape(batch, length) % vocab
    return ids, ids[:, 0] % 3


def run_method(model, batch, example) -> dict:
    """The whole method on one model: returns what happened (sites, linearized, fold outcome)."""
    model.eval()
    sites = ek.find_sites(model, example)
    assert sites, "no activation sites found"
    assert all(s.channels for s in sites), [s.name for s in sites if not s.channels]
    model.train()
    scores = ek.entropy_scores(model, [batch])
    assert set(scores) == {s.name for s in sites}
    assert all(0.0 <= scores[s.name] <= 1.0 for s in sites if not math.isnan(scores[s.name]))
    chosen = scores.ranking()[: max(1, len(sites) // 2)]
    net = ek.linearize(model, chosen, example, plan="merge")
    assert sorted(ek.recipe(net)["linearized"]) == sorted(chosen)
    loss = ek.train.fit(net, [batch], epochs=1, lr=1e-3)
    assert math.isfinite(loss)
    net.eval()
    with torch.no_grad():
        expected = ek.capture.call(net, example)
        try:
            folded = ek.fold(net, example, decide="merge")
        except ek.InexactFold as refusal:  # a clear refusal names the chains and the way out
            assert "chain" in str(refusal) and "allow_inexact" in str(refusal)
            return {"sites": len(sites), "folded": False, "rows": []}
        error = relative_error(ek.capture.call(folded, example), expected)
    assert error <= TOLERANCE, f"fold changed the outputs: relative error {error:.1e}"
    return {"sites": len(sites), "folded": True, "rows": ek.recipe(folded)["fold"]["decisions"]}


@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm(name):
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3, **TIMM_MODELS[name])
    x, y = _images(4 if name in FIXED_SIZE else 8, FIXED_SIZE.get(name, SIZE))
    run_method(model, (x, y), x[:2])


def _hf_text(model_cls, config_cls, **config):
    model = model_cls(config_cls(vocab_size=128, num_labels=3, pad_token_id=0, **config))
    ids, labels = _token_ids()
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return model, batch, {"input_ids": ids[:2], "attention_mask": torch.ones_like(ids[:2])}


def _hf_vision(model_cls, config_cls, **config):
    model = model_cls(config_cls(num_labels=3, **config))
    x, y = _images(size=32)
    return model, {"pixel_values": x, "labels": y}, {"pixel_values": x[:2]}


HF_MODELS = {
    "bert (encoder)": lambda: _hf_text(transformers.BertForSequenceClassification, transformers.BertConfig, hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                       max_position_embeddings=64),
    "gpt2 (decoder)": lambda: _hf_text(transformers.GPT2ForSequenceClassification, transformers.GPT2Config, n_embd=32,
                                       n_layer=2, n_head=2, n_positions=64),
    "llama (gated decoder)": lambda: _hf_text(transformers.LlamaForSequenceClassification, transformers.LlamaConfig,
                                              hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=2, num_key_value_heads=2),
    "vit (vision)": lambda: _hf_vision(transformers.ViTForImageClassification, transformers.ViTConfig, image_size=32,
                                       patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                       intermediate_size=64),
    "resnet (cnn)": lambda: _hf_vision(transformers.ResNetForImageClassification, transformers.ResNetConfig,
                                       embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1]),
}


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_transformers(name):
    torch.manual_seed(0)
    model, batch, example = HF_MODELS[name]()
    outcome = run_method(model, batch, example)
    if "gated" in name:  # SwiGLU: the linearized gate leaves act(x) * up(x) -> a product of projections
        rows = [r for r in outcome["rows"] if r["choice"] == "cannot fold"]
        assert rows and all("gated" in r["why"] for r in rows)
