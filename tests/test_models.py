"""The paper's models: shapes, activation-site counts (17/15/35), fx tracing, argument checks."""

from collections import Counter

import pytest
import torch
from torch import nn

from easier_kernels.models import PAPER_MODELS, mobilenet_v2, paper_model, resnet18, vgg16_bn

SITES = {"resnet18": 17, "vgg16_bn": 15, "mobilenet_v2": 35}
NAMES = list(PAPER_MODELS)


def _forward(model, size=32, in_channels=3, n=2):
    torch.manual_seed(0)
    with torch.no_grad():
        return model(torch.randn(n, in_channels, size, size))


def _activation_calls(model, x):
    """Counter of activation module objects called during one forward."""
    calls = Counter()
    hooks = [m.register_forward_hook(lambda mod, inp, out: calls.update([id(mod)]))
             for m in model.modules() if isinstance(m, (nn.ReLU, nn.ReLU6))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls


def test_registry_lists_the_three_models():
    assert PAPER_MODELS == {"resnet18": resnet18, "vgg16_bn": vgg16_bn, "mobilenet_v2": mobilenet_v2}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_output_shape_small_width(name, in_channels):
    model = paper_model(name, num_classes=7, in_channels=in_channels, width=0.25).eval()
    assert _forward(model, in_channels=in_channels).shape == (2, 7)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape_full_width(name):
    model = paper_model(name, num_classes=10, in_channels=1, width=1.0).eval()
    assert _forward(model, in_channels=1, n=1).shape == (1, 10)


@pytest.mark.parametrize("name", NAMES)
def test_28px_input_works(name):
    model = paper_model(name, num_classes=10, in_channels=1, width=0.25).eval()
    assert _forward(model, size=28, in_channels=1).shape == (2, 10)


@pytest.mark.parametrize("name", NAMES)
def test_activation_sites_counted_once_each(name):
    model = paper_model(name, width=0.25).eval()
    calls = _activation_calls(model, torch.randn(2, 3, 32, 32))
    assert sum(calls.values()) == SITES[name]
    assert len(calls) == SITES[name]
    assert max(calls.values()) == 1, "an activation module was called twice in one forward"
    # Non-inplace everywhere, so hooks see the pre-activation input intact.
    assert not any(getattr(m, "inplace", False) for m in model.modules())


@pytest.mark.parametrize("name", NAMES)
def test_fx_trace_matches_eager(name):
    model = paper_model(name, width=0.25).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
    # The traced graph keeps every activation as its own call_module site.
    acts = [n for n in traced.graph.nodes if n.op == "call_module"
            and isinstance(traced.get_submodule(n.target), (nn.ReLU, nn.ReLU6))]
    assert len(acts) == len({n.target for n in acts}) == SITES[name]


@pytest.mark.parametrize("name", NAMES)
def test_width_scales_parameter_count(name):
    def params(width):
        return sum(p.numel() for p in paper_model(name, width=width).parameters())
    assert params(0.5) < params(1.0)


def test_vgg_attribute_names():
    model = vgg16_bn(width=0.25)
    assert isinstance(model.features, nn.Sequential)
    assert isinstance(model.classifier, nn.Sequential)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kwargs", [
    {"num_classes": 0}, {"num_classes": 2.5}, {"in_channels": 0}, {"in_channels": True},
    {"width": 0}, {"width": -1.0}, {"width": float("nan")}, {"width": "1"},
])
def test_bad_arguments_raise(name, kwargs):
    with pytest.raises(ValueError):
        paper_model(name, **kwargs)


def test_tiny_width_keeps_at_least_one_channel():
    for name in NAMES:
        assert _forward(paper_model(name, width=1e-3).eval()).shape == (2, 10)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        paper_model("resnet50")
    msg = str(err.value)
    assert "\n" not in msg
    assert all(name in msg for name in NAMES)


# ---- build(): timm: and hf: models; pretrained weights with a classifier head for other classes

from easier_kernels import models  # noqa: E402
from easier_kernels.compat import import_torchvision  # noqa: E402


def need(module: str, extra: str):
    """The optional module, or a skip; torchvision first (timm and transformers import it) through compat."""
    import_torchvision()
    return pytest.importorskip(module, reason=f"the {extra} extra is not installed (pip install '.[{extra}]')")


def test_timm_models_are_built_untrained_for_the_classes_and_channels():
    need("timm", "timm")
    model = models.build("timm:resnet18", num_classes=3, in_channels=1)
    assert model.conv1.in_channels == 1 and model.fc.out_features == 3
    assert model.eval()(torch.zeros(1, 1, 32, 32)).shape == (1, 3)
    torch.manual_seed(0)
    first = models.build("timm:resnet18", num_classes=3).conv1.weight
    torch.manual_seed(0)
    assert torch.equal(first, models.build("timm:resnet18", num_classes=3).conv1.weight)  # seeded random init
    with pytest.raises(ValueError, match="unknown timm model 'resnet9000'; timm.list_models"):
        models.build("timm:resnet9000")
    with pytest.raises(ValueError, match="timm:resnet18 takes 3-channel images at its own width"):
        models.build("timm:resnet18", width=0.5)


def test_a_timm_model_takes_its_config_after_the_name():
    from easier_kernels import models

    vit = models.build("timm:vit_tiny_patch16_224:img_size=28,patch_size=4,depth=2,embed_dim=64,num_heads=2",
                       num_classes=3, in_channels=1)
    assert len(vit.blocks) == 2 and vit.embed_dim == 64
    assert vit(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ValueError, match="is not key=value"):
        models.build("timm:vit_tiny_patch16_224:depth", num_classes=3)
    with pytest.raises(ValueError, match="does not take the config"):
        models.build("timm:resnet18:no_such_option=1", num_classes=3)


@pytest.mark.parametrize("module, extra", [("timm", "timm"), ("transformers", "hf")])
def test_a_missing_extra_says_which_to_install(monkeypatch, tmp_path, module, extra):
    import sys

    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    with pytest.raises(ImportError, match=f"not importable .*: pip install 'easier_kernels\\[{extra}\\]'"):
        models.build("timm:resnet18" if module == "timm" else f"hf:{tmp_path}")


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    """A tiny transformers ResNet: a folder with config.json only, and one with its weights too."""
    transformers = need("transformers", "hf")
    root = tmp_path_factory.mktemp("hf")
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic",
                                       num_labels=10)
    config.save_pretrained(root / "config")
    model = transformers.AutoModelForImageClassification.from_config(config)
    model.save_pretrained(root / "weights")
    return root, model


def test_hf_models_from_a_config_folder_or_a_folder_with_weights(hf_folders):
    root, saved = hf_folders
    model = models.build(f"hf:{root / 'config'}", num_classes=3)
    assert model.config.num_labels == 3 and model.classifier[1].out_features == 3
    assert model(torch.zeros(1, 3, 32, 32)).logits.shape == (1, 3)
    assert not torch.equal(model.resnet.embedder.embedder.convolution.weight,
                           saved.resnet.embedder.embedder.convolution.weight)  # random init
    pretrained = models.build(f"hf:{root / 'weights'}", num_classes=5)
    assert pretrained.classifier[1].out_features == 5
    for name, tensor in saved.state_dict().items():
        if not name.startswith("classifier."):
            assert torch.equal(pretrained.state_dict()[name], tensor), name


def test_hf_errors_and_nothing_downloaded_without_download(hf_folders, tmp_path):
    root, _ = hf_folders
    with pytest.raises(ValueError, match="hf:microsoft/resnet-50 is not a local folder; pass --download"):
        models.build("hf:microsoft/resnet-50")
    with pytest.raises(ValueError, match=f"hf:{tmp_path} holds no config.json"):
        models.build(f"hf:{tmp_path}")
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(ValueError, match=f"cannot build hf:{tmp_path} \\("):
        models.build(f"hf:{tmp_path}")
    with pytest.raises(ValueError, match="in_channels and width apply to the paper models only"):
        models.build(f"hf:{root / 'config'}", in_channels=1)


def test_classifier_name_finds_the_head():
    assert models.classifier_name(resnet18(3, width=0.125)) == "fc"
    assert models.classifier_name(vgg16_bn(3, width=0.125)) == "classifier.4"
    assert models.classifier_name(models.build("squeezenet1_0", num_classes=3)) == "classifier.1"  # a 1x1 conv
    assert models.classifier_name(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU())) is None


def test_load_weights_replaces_a_head_for_other_classes_and_loads_the_rest():
    torch.manual_seed(0)
    source = resnet18(1000, width=0.125).state_dict()
    model = resnet18(5, width=0.125)
    head = model.fc.weight.clone()
    assert models.load_weights(model, source) == "replaced head fc: 1000 -> 5 classes"
    assert torch.equal(model.fc.weight, head)  # the model's own new head
    for name, tensor in model.state_dict().items():
        if not name.startswith("fc."):
            assert torch.equal(tensor, source[name]), name
    headless = {k: v for k, v in source.items() if not k.startswith("fc.")}
    assert models.load_weights(resnet18(5, width=0.125), headless) == "new head fc: 5 classes (the checkpoint has none)"
    same = resnet18(1000, width=0.125)
    assert models.load_weights(same, source) is None and torch.equal(same.fc.weight, source["fc.weight"])


def test_load_weights_replaces_timm_heads():
    need("timm", "timm")
    model = models.build("timm:mobilenetv3_small_050", num_classes=3)
    source = models.build("timm:mobilenetv3_small_050", num_classes=1000).state_dict()
    assert models.load_weights(model, source) == "replaced head classifier: 1000 -> 3 classes"
    assert torch.equal(model.conv_stem.weight, source["conv_stem.weight"])


def test_load_weights_refuses_any_other_difference_and_loads_nothing():
    source = resnet18(10, width=0.125).state_dict()
    model = resnet18(10, width=0.25)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^conv1.weight, bn1.weight, bn1.bias and \d+ more have other shapes \(first: "
                                         r"conv1.weight is \[8, 3, 3, 3\] in the checkpoint, \[16, 3, 3, 3\] in the model\)$"):
        models.load_weights(model, source)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="^the checkpoint lacks layer1.0.conv1.weight$"):
        models.load_weights(resnet18(10, width=0.125), {k: v for k, v in source.items() if k != "layer1.0.conv1.weight"})
    with pytest.raises(ValueError, match="^the model has no extra.weight$"):
        models.load_weights(resnet18(10, width=0.125), {**source, "extra.weight": torch.zeros(1)})
    old = {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}  # as older torch saved them
    assert models.load_weights(resnet18(10, width=0.125), old) is None


def test_read_weights_takes_state_dicts_checkpoints_and_safetensors(tmp_path):
    source = resnet18(10, width=0.125).state_dict()
    for name, content in (("plain.pth", source), ("timm.pth", {"state_dict": source, "epoch": 3}),
                          ("tv.pth", {"model": source, "optimizer": {}}),
                          ("ddp.pth", {f"module.{k}": v for k, v in source.items()})):
        torch.save(content, tmp_path / name)
        read = models.read_weights(tmp_path / name)
        assert read.keys() == source.keys() and all(torch.equal(read[k], source[k]) for k in source), name
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file({k: v.contiguous() for k, v in source.items()}, tmp_path / "model.safetensors")
    assert models.read_weights(tmp_path / "model.safetensors").keys() == source.keys()
    with pytest.raises(FileNotFoundError, match="nothing.pth: no such file"):
        models.read_weights(tmp_path / "nothing.pth")
    torch.save(resnet18(10, width=0.125), tmp_path / "module.pth")  # a pickled module, not a state_dict
    with pytest.raises(ValueError, match=r"cannot read .*module.pth as a state_dict: it holds pickled Python objects "
                       r"\(easier_kernels.models.ResNet18\), not only tensors.*torch.save\(model.state_dict\(\)"):
        models.read_weights(tmp_path / "module.pth")
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    with pytest.raises(ValueError, match="empty.pth holds no state_dict"):
        models.read_weights(tmp_path / "empty.pth")


# ---- text models: small named configs, hf:FOLDER for text, load_pretrained after write_back

from easier_kernels.models import TextSpec  # noqa: E402

GPT2_TINY = "hf-gpt2:n_layer=2,n_embd=32,n_head=2"
BERT_TINY = "hf-bert:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"


def _tiny_gpt2(transformers, seed=0, **config):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(**{"n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 64, "n_positions": 32,
                                        "bos_token_id": None, "eos_token_id": None, **config})
    return transformers.GPT2LMHeadModel(config).eval()


def test_a_named_gpt2_is_built_for_the_tokenizer():
    transformers = need("transformers", "hf")
    model = models.build(GPT2_TINY, text=TextSpec("causal_lm", 300, 64, pad_id=0, eos_id=1))
    assert type(model) is transformers.GPT2LMHeadModel
    config = model.config
    assert config.vocab_size == 300 and model.lm_head.out_features == 300
    assert model.transformer.wte.num_embeddings == 300
    assert config.n_positions >= 64 and model.transformer.wpe.num_embeddings >= 64
    assert config.n_layer == 2 and len(model.transformer.h) == 2 and config.n_embd == 32
    assert (config.pad_token_id, config.eos_token_id, config.bos_token_id) == (0, 1, 1)
    ids = torch.randint(0, 300, (2, 64))
    assert model.eval()(input_ids=ids).logits.shape == (2, 64, 300)
    # the family's defaults where the name overrides nothing
    assert models.HF_FAMILIES["hf-gpt2"][1]["n_layer"] == 6
    assert models.build("hf-gpt2:n_embd=32,n_head=2", text=TextSpec("causal_lm", 50, 16)).config.n_layer == 6
    # positions are never lowered below the family's own
    assert models.build(GPT2_TINY, text=TextSpec("causal_lm", 50, 16)).config.n_positions == 1024


def test_a_named_bert_is_a_sequence_classifier_for_the_classes():
    transformers = need("transformers", "hf")
    model = models.build(BERT_TINY, num_classes=3, text=TextSpec("classification", 300, 64, pad_id=5))
    assert type(model) is transformers.BertForSequenceClassification
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert model.config.vocab_size == 300 and model.config.pad_token_id == 5
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    ids = torch.randint(0, 300, (2, 10))
    assert model.eval()(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.shape == (2, 3)
    # as a causal LM, BERT decodes (its LM head needs the causal mask)
    lm = models.build(BERT_TINY, text=TextSpec("causal_lm", 300, 64))
    assert type(lm) is transformers.BertLMHeadModel and lm.config.is_decoder


@pytest.mark.parametrize("name, cls", [
    ("hf-opt:num_hidden_layers=1,hidden_size=32,num_attention_heads=2,ffn_dim=64,word_embed_proj_dim=32",
     "OPTForCausalLM"),
    ("hf-llama:num_hidden_layers=1,hidden_size=32,num_attention_heads=2,num_key_value_heads=2,intermediate_size=64",
     "LlamaForCausalLM"),
])
def test_the_other_families_build_as_causal_lms(name, cls):
    need("transformers", "hf")
    model = models.build(name, text=TextSpec("causal_lm", 120, 40, pad_id=0, eos_id=2))
    assert type(model).__name__ == cls and model.config.num_hidden_layers == 1
    assert model.eval()(input_ids=torch.randint(0, 120, (1, 40))).logits.shape == (1, 40, 120)


def test_text_model_errors_are_one_line():
    need("transformers", "hf")
    text = TextSpec("causal_lm", 300, 64)
    cases = [
        ("hf-gpt2", {}, "hf-gpt2 is a language model: use a text dataset"),
        (GPT2_TINY, {}, "hf-gpt2 is a language model: use a text dataset"),
        ("hf-gpt9:n_layer=2", {"text": text}, "unknown text model 'hf-gpt9:n_layer=2'; pass hf:FOLDER or one of hf-gpt2, "
                                              "hf-bert, hf-opt, hf-llama"),
        ("resnet18", {"text": text}, "unknown text model 'resnet18'"),
        ("hf-gpt2:n_layer", {"text": text}, "hf-gpt2: 'n_layer' is not key=value"),
        ("hf-gpt2:n_layer=1,n_embd=30,n_head=4", {"text": text}, "cannot build hf-gpt2:n_layer=1,n_embd=30,n_head=4 as a "
                                                                 "causal lm model \\(.*divisible"),
        (GPT2_TINY, {"text": TextSpec("masked_lm", 300, 64)}, "text task must be causal_lm or classification, not "
                                                              "'masked_lm'"),
        ("hf:/no/such/folder", {"text": text}, "hf:/no/such/folder is not a local folder; pass --download"),
    ]
    for name, kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            models.build(name, **kwargs)
        assert "\n" not in str(info.value), name


def test_a_config_key_the_family_does_not_have_is_an_error():
    need("transformers", "hf")
    with pytest.raises(ValueError, match="n_layers") as info:
        models.build("hf-gpt2:n_layers=2,n_embd=32,n_head=2", text=TextSpec("causal_lm", 300, 64))
    assert "\n" not in str(info.value)


def test_a_text_model_from_a_folder_keeps_its_weights_when_they_fit(tmp_path):
    transformers = need("transformers", "hf")
    saved = _tiny_gpt2(transformers)
    saved.save_pretrained(tmp_path / "gpt2")
    transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path / "config")
    ids = torch.randint(0, 64, (2, 12))
    loaded = models.build(f"hf:{tmp_path / 'gpt2'}", text=TextSpec("causal_lm", 64, 32, pad_id=0))
    with torch.no_grad():
        assert torch.allclose(loaded.eval()(input_ids=ids).logits, saved(input_ids=ids).logits, atol=1e-6)
    fresh = models.build(f"hf:{tmp_path / 'config'}", text=TextSpec("causal_lm", 300, 2000, pad_id=0))
    assert fresh.config.vocab_size == 300 and fresh.config.n_positions == 2000 and fresh.config.n_layer == 1
    with pytest.raises(ValueError, match="has a vocabulary of 64 ids, the tokenizer 300"):
        models.build(f"hf:{tmp_path / 'gpt2'}", text=TextSpec("causal_lm", 300, 32))
    with pytest.raises(ValueError, match="takes at most 32 positions: lower --seq-len"):
        models.build(f"hf:{tmp_path / 'gpt2'}", text=TextSpec("causal_lm", 64, 33))


def test_load_pretrained_of_a_plain_save_pretrained_folder(tmp_path):
    transformers = need("transformers", "hf")
    saved = _tiny_gpt2(transformers, seed=1)
    saved.save_pretrained(tmp_path)
    loaded = models.load_pretrained(tmp_path)
    assert type(loaded) is transformers.GPT2LMHeadModel and not loaded.training
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, saved(input_ids=ids).logits)
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()  # still tied


def test_load_pretrained_rebuilds_a_written_back_model(tmp_path):
    transformers = need("transformers", "hf")
    import easier_kernels as ek

    model = _tiny_gpt2(transformers, seed=2)
    ids = torch.randint(0, 64, (2, 16))
    first = ek.find_sites(model, (ids,))[0].name
    assert first == "transformer_h_0_mlp_act"
    net = ek.linearize(model, [first], (ids,))
    folded = ek.fold(net, (ids,), decide="merge")
    written = ek.write_back(folded, model)
    mlp = written.transformer.h[0].mlp
    # what write_back put there: the activation gone, the two MLP layers merged into one 32 -> 32 layer
    assert isinstance(mlp.act, nn.Identity) and isinstance(mlp.c_proj, nn.Identity)
    assert tuple(mlp.c_fc.weight.shape) == (32, 32) and tuple(model.transformer.h[0].mlp.c_fc.weight.shape) == (32, 128)
    written.save_pretrained(tmp_path)
    # a plain from_pretrained cannot load it: the shapes differ from the config's architecture
    loaded = models.load_pretrained(tmp_path)
    assert type(loaded) is transformers.GPT2LMHeadModel and not loaded.training
    got = loaded.transformer.h[0].mlp
    assert isinstance(got.act, nn.Identity) and isinstance(got.c_proj, nn.Identity)
    assert type(got.c_fc) is type(mlp.c_fc) and got.c_fc.weight.shape == mlp.c_fc.weight.shape
    assert torch.equal(got.c_fc.weight, mlp.c_fc.weight) and torch.equal(got.c_fc.bias, mlp.c_fc.bias)
    # the untouched block is as it was
    second = loaded.transformer.h[1].mlp
    assert not isinstance(second.act, nn.Identity) and tuple(second.c_fc.weight.shape) == (32, 128)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in written.parameters())
    with torch.no_grad():
        expected = written.eval()(input_ids=ids).logits
        assert torch.allclose(loaded(input_ids=ids).logits, expected, atol=1e-6)
        assert not torch.allclose(model(input_ids=ids).logits, expected, atol=1e-4)  # (the fold changed the network)
    # the record survives another save and load
    loaded.save_pretrained(tmp_path / "again")
    again = models.load_pretrained(tmp_path / "again")
    with torch.no_grad():
        assert torch.allclose(again(input_ids=ids).logits, expected, atol=1e-6)


def test_load_pretrained_errors(tmp_path):
    transformers = need("transformers", "hf")
    with pytest.raises(ValueError, match="cannot rebuild the model in"):
        models.load_pretrained(tmp_path)  # no config.json
    _tiny_gpt2(transformers).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        models.load_pretrained(tmp_path)
    other = tmp_path / "other"
    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64,
                                                         n_positions=32)).save_pretrained(other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not fit its config .*missing \\['transformer.h.1") as info:
        models.load_pretrained(tmp_path)  # a 2-layer config, 1-layer weights
    assert "\n" not in str(info.value)


def test_load_pretrained_of_weights_of_other_shapes_is_a_one_line_value_error(tmp_path):
    transformers = need("transformers", "hf")
    _tiny_gpt2(transformers).save_pretrained(tmp_path)
    other = tmp_path / "other"
    _tiny_gpt2(transformers, n_embd=16).save_pretrained(other)
    (tmp_path / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="do not fit its config") as info:
        models.load_pretrained(tmp_path)  # 32-wide config, 16-wide weights
    assert "\n" not in str(info.value)
