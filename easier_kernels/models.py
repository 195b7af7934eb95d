"""The three CIFAR-style models of the EASIER paper: ResNet-18, VGG-16-BN and MobileNetV2.

Every activation is its own module, called once per forward (never reused, never functional), so
reference-style forward hooks see one call per site and the paper's site counts hold:
17 nn.ReLU (resnet18), 15 nn.ReLU (vgg16_bn), 35 nn.ReLU6 (mobilenet_v2). All trace with
torch.fx.symbolic_trace. No pretrained weights.

`build(name)` also makes torchvision's classifiers, timm's ("timm:NAME", pip install
'easier_kernels[timm]') and transformers' image classifiers ("hf:FOLDER", pip install
'easier_kernels[hf]'); with `text=TextSpec(...)`, transformers' language models and text
classifiers ("hf:FOLDER", or a small named config from random init: "hf-gpt2:n_layer=6,n_embd=256",
"hf-bert", "hf-opt", "hf-llama"); nothing is downloaded unless asked. `load_pretrained(folder)`
rebuilds a Hugging Face model saved after `ek.write_back` (its replaced modules recorded in its config). `read_weights` / `load_weights` load a
pretrained state_dict, replacing a classifier head of another class count.
"""

import ast
import dataclasses
import importlib
import json
import math
import numbers
from pathlib import Path

import torch
from torch import nn

from .files import why_unreadable

__all__ = ["resnet18", "vgg16_bn", "mobilenet_v2", "PAPER_MODELS", "paper_model", "build", "torchvision_names",
           "read_weights", "load_weights", "classifier_name", "TextSpec", "HF_FAMILIES", "load_pretrained"]


def _build(cls, num_classes, in_channels, width):
    """Checks the arguments, builds, initializes as torchvision does."""
    _check_args(num_classes, in_channels, width)
    model = cls(num_classes, in_channels, width)
    _init_weights(model)
    return model


def _check_args(num_classes, in_channels, width):
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if (isinstance(width, bool) or not isinstance(width, numbers.Real)
            or not math.isfinite(width) or width <= 0):
        raise ValueError(f"width must be a finite number > 0 (e.g. 0.5 or 1.0), got {width!r}")


def _scale(c, width):
    # resnet/vgg: plain rounding, but never below one channel.
    return max(1, round(c * width))


def _make_divisible(v, divisor=8):
    # torchvision's rule: round to a multiple of divisor, never dropping more than 10%.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _init_weights(model):
    # As torchvision does.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0, 0.01)
            nn.init.zeros_(m.bias)


# ---------------------------------------------------------------------------------------- ResNet-18

class BasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU()  # separate module: one hook site per activation
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        planes = [_scale(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(in_channels, planes[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes[0])
        self.relu = nn.ReLU()
        in_planes = planes[0]
        stages = []
        for p, stride in zip(planes, (1, 2, 2, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, p, stride), BasicBlock(p, p, 1)))
            in_planes = p
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(num_classes=10, in_channels=3, width=1.0):
    """CIFAR ResNet-18 (kuangliu/pytorch-cifar style): 17 nn.ReLU sites."""
    return _build(ResNet18, num_classes, in_channels, width)


# ----------------------------------------------------------------------------------------- VGG-16-BN

_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        layers, c_in = [], in_channels
        for v in _VGG16:
            if v == "M":
                # ceil_mode so 28x28 inputs survive five poolings (28->14->7->4->2->1).
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                c_out = _scale(v, width)
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                           nn.BatchNorm2d(c_out), nn.ReLU()]
                c_in = c_out
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)  # any input >= 28px ends at 1x1
        hidden = _scale(512, width)
        self.classifier = nn.Sequential(
            nn.Linear(c_in, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def vgg16_bn(num_classes=10, in_channels=3, width=1.0):
    """CIFAR VGG-16 with BatchNorm: 15 nn.ReLU sites (13 conv + 2 classifier)."""
    return _build(VGG, num_classes, in_channels, width)


# -------------------------------------------------------------------------------------- MobileNetV2

def _conv_bn(c_in, c_out, kernel, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=False),
              nn.BatchNorm2d(c_out)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expand_ratio):
        super().__init__()
        hidden = int(round(c_in * expand_ratio))
        self.use_res = stride == 1 and c_in == c_out
        layers = []
        if expand_ratio != 1:  # t=1 blocks have no expand conv, as in torchvision
            layers.append(_conv_bn(c_in, hidden, 1))
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))  # depthwise
        layers.append(_conv_bn(hidden, c_out, 1, act=False))  # linear bottleneck
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    # t, c, n, s; CIFAR change: the second stage has stride 1 (torchvision: 2).
    SETTINGS = [(1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]

    def __init__(self, num_classes, in_channels, width):
        super().__init__()
        c_in = _make_divisible(32 * width)
        # Like torchvision: the last conv only widens, never narrows below 1280.
        self.last_channel = _make_divisible(1280 * width) if width > 1.0 else 1280
        layers = [_conv_bn(in_channels, c_in, 3, 1)]  # stride-1 stem for 32x32 inputs
        for t, c, n, s in self.SETTINGS:
            c_out = _make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(c_in, c_out, s if i == 0 else 1, t))
                c_in = c_out
        layers.append(_conv_bn(c_in, self.last_channel, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(self.last_channel, num_classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v2(num_classes=10, in_channels=3, width=1.0):
    """CIFAR MobileNetV2: 35 nn.ReLU6 sites."""
    return _build(MobileNetV2, num_classes, in_channels, width)


# ------------------------------------------------------------------------------------------ registry

PAPER_MODELS = {"resnet18": resnet18, "vgg16_bn": vgg16_bn, "mobilenet_v2": mobilenet_v2}


def paper_model(name, **kwargs):
    """Build one of the paper's models by name, e.g. paper_model("resnet18", width=0.5)."""
    if not isinstance(name, str) or name not in PAPER_MODELS:
        raise ValueError(f"unknown model {name!r}; pass one of: {', '.join(PAPER_MODELS)}")
    return PAPER_MODELS[name](**kwargs)


def torchvision_names() -> list:
    """torchvision's classification model names (resnet50, mobilenet_v3_small, swin_t, ...)."""
    from .compat import import_torchvision

    torchvision = import_torchvision()
    return torchvision.models.list_models(module=torchvision.models)


def build(name, *, num_classes=10, in_channels=3, width=1.0, download=False, text: "TextSpec | None" = None):
    """A fresh (untrained) model by name: one of the paper's CIFAR-style models (with `width`), a
    torchvision classification model (3-channel input, its own width; "torchvision.resnet18" names
    torchvision's where the paper has a model of the same name), "timm:NAME" (timm.create_model,
    never pretrained, with `in_channels`; "timm:NAME:key=value,..." passes its config, e.g.
    "timm:vit_tiny_patch16_224:img_size=28,patch_size=4,depth=6" a small ViT for 28 px images) or
    "hf:FOLDER" (a transformers image classifier from a folder holding config.json: random init, or its weights where it holds them, the classifier
    made for `num_classes`). "hf:HUB/NAME" fetches from the Hugging Face hub, with download=True only.
    With `text` (a TextSpec: the task and the tokenizer's sizes), "hf:FOLDER" and the small named
    configs of HF_FAMILIES ("hf-gpt2:n_layer=6,n_embd=256,...") are built as text models: a causal
    LM (AutoModelForCausalLM) or a sequence classifier for `num_classes` labels."""
    if text is not None or name.startswith("hf-"):
        return _hf_text(name, num_classes, text, download)
    if name in PAPER_MODELS:
        return PAPER_MODELS[name](num_classes=num_classes, in_channels=in_channels, width=width)
    if name.startswith("timm:"):
        _paper_only(name, width=width)
        return _timm(name.removeprefix("timm:"), num_classes, in_channels)
    if name.startswith("hf:"):
        _paper_only(name, width=width, in_channels=in_channels)
        return _hf(name.removeprefix("hf:"), num_classes, download)
    name = name.removeprefix("torchvision.")
    if name not in torchvision_names():
        raise ValueError(f"unknown model {name!r}; pass one of {', '.join(PAPER_MODELS)}, a torchvision "
                         "classification model name (e.g. resnet50, mobilenet_v3_small), timm:NAME or hf:FOLDER")
    _paper_only(name, width=width, in_channels=in_channels)
    from .compat import import_torchvision

    return import_torchvision().models.get_model(name, weights=None, num_classes=num_classes)


def _paper_only(name, width, in_channels=3):
    """The models that take 3-channel images at their own width refuse other in_channels / width."""
    if in_channels != 3 or width != 1.0:
        raise ValueError(f"{name} takes 3-channel images at its own width; in_channels and width apply to the paper "
                         "models only (in_channels also to timm: models)")


def _optional(module: str, extra: str):
    """`module` imported, or an ImportError saying which extra installs it."""
    from .compat import import_torchvision

    try:  # both import torchvision where it is installed, which needs compat's workaround on some installs
        import_torchvision()
    except ImportError:
        if module == "timm":  # (transformers does without)
            raise
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ImportError(f"{extra}: models need {module}, which is not importable ({reason}): "
                          f"pip install 'easier_kernels[{extra}]'") from exc


def _timm(spec: str, num_classes, in_channels):
    timm = _optional("timm", "timm")
    arch, _, config = spec.partition(":")
    if not timm.is_model(arch):
        raise ValueError(f"unknown timm model {arch!r}; timm.list_models() names them (e.g. resnet18, convnext_tiny)")
    _check_args(num_classes, in_channels, 1.0)
    kwargs = _config(config, f"timm:{arch}")
    # never pretrained=True: that downloads; pretrained weights come as a state_dict (load_weights)
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"timm:{arch} does not take the config {config!r} ({reason})") from None


def _config(text: str, what: str, example: str = "depth=6,img_size=28") -> dict:
    """"key=value,key=value" -> {key: value}, values read as Python literals (numbers, True, 'x')
    where they are one, else as text."""
    config = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"{what}: {item!r} is not key=value (write e.g. {what}:{example})")
        try:
            config[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            config[key.strip()] = value.strip()
    return config


# what save_pretrained writes: one file, or the index of a sharded checkpoint
HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _hf(spec: str, num_classes, download: bool):
    _check_args(num_classes, 3, 1.0)
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"hf:{spec} holds no config.json: pass a folder written by save_pretrained "
                             "(config.json, and model.safetensors for pretrained weights)")
        source, options = folder, {"local_files_only": True}
        pretrained = any((folder / name).is_file() for name in HF_WEIGHTS)
    elif download:
        source, options, pretrained = spec, {}, True
    else:
        raise ValueError(f"hf:{spec} is not a local folder; pass --download to fetch it from the Hugging Face hub "
                         "(download=True), or a folder holding its config.json")
    transformers = _optional("transformers", "hf")
    auto = transformers.AutoModelForImageClassification

    def load():
        config = transformers.AutoConfig.from_pretrained(source, **options)
        config.num_labels = num_classes  # (its setter renames the labels when the count changes)
        if not pretrained:
            return auto.from_config(config)
        return auto.from_pretrained(source, config=config, ignore_mismatched_sizes=True, **options)

    try:
        return load()
    except ImportError:
        raise
    except Exception as exc:  # unreadable config or weights (safetensors' own error type), unknown model type, network
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"cannot build hf:{spec} ({reason})") from exc


# ------------------------------------------------------------------------------------ text models


@dataclasses.dataclass
class TextSpec:
    """What a text model is built for: the task ("causal_lm" or "classification") and the
    tokenizer's vocabulary, the longest sequence, the padding (and end-of-text) id."""

    task: str
    vocab_size: int
    max_length: int
    pad_id: int = 0
    eos_id: int | None = None


# small transformer families by name, built from random init (no download); the defaults are a
# model these 2-core machines train in minutes, every key overridable: "hf-gpt2:n_layer=4"
HF_FAMILIES = {
    "hf-gpt2": ("gpt2", {"n_layer": 6, "n_embd": 256, "n_head": 4}),
    "hf-bert": ("bert", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "intermediate_size": 1024}),
    "hf-opt": ("opt", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4, "ffn_dim": 1024,
                       "word_embed_proj_dim": 256}),
    "hf-llama": ("llama", {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
                           "num_key_value_heads": 4, "intermediate_size": 688}),
}
_POSITIONS = ("n_positions", "max_position_embeddings")  # what a config calls its longest sequence


def _hf_text(name: str, num_classes, text: "TextSpec | None", download: bool):
    family = name.partition(":")[0]
    if text is None:
        raise ValueError(f"{family} is a language model: use a text dataset (--dataset text:FILE or tsv:PATH)")
    if text.task not in ("causal_lm", "classification"):
        raise ValueError(f"text task must be causal_lm or classification, not {text.task!r}")
    transformers = _optional("transformers", "hf")
    config, source, options = _text_config(name, family, transformers, download)
    pretrained = source is not None and any((Path(source) / f).is_file() for f in HF_WEIGHTS)
    _fit_config(config, name, text, num_classes, pretrained)
    auto = transformers.AutoModelForCausalLM if text.task == "causal_lm" else transformers.AutoModelForSequenceClassification
    try:
        if pretrained:
            return auto.from_pretrained(source, config=config, ignore_mismatched_sizes=True, **options)
        return auto.from_config(config)
    except Exception as exc:  # an architecture without that head, unreadable weights
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise ValueError(f"cannot build {name} as a {text.task.replace('_', ' ')} model ({reason})") from exc


def _text_config(name: str, family: str, transformers, download: bool):
    """(config, the folder its weights would be in or None, from_pretrained options)."""
    if family in HF_FAMILIES:
        model_type, defaults = HF_FAMILIES[family]
        overrides = _config(name.partition(":")[2], family, "n_layer=6" if family == "hf-gpt2" else "num_hidden_layers=6")
        known = transformers.AutoConfig.for_model(model_type)  # (a config takes any keyword: a typo would be ignored)
        if unknown := [k for k in overrides if not hasattr(known, k)]:
            raise ValueError(f"{family} has no config key {', '.join(unknown)} (a {type(known).__name__} has e.g. "
                             f"{', '.join(defaults)})")
        try:
            return transformers.AutoConfig.for_model(model_type, **{**defaults, **overrides}), None, {}
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{family} does not take the config {name.partition(':')[2]!r} ({exc})") from None
    if not name.startswith("hf:"):
        raise ValueError(f"unknown text model {name!r}; pass hf:FOLDER or one of {', '.join(HF_FAMILIES)} "
                         "(with key=value config, e.g. hf-gpt2:n_layer=6,n_embd=256)")
    spec = name.removeprefix("hf:")
    folder = Path(spec).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ValueError(f"hf:{spec} holds no config.json: pass a folder written by save_pretrained")
        source, options = folder, {"local_files_only": True}
    elif download:
        source, options = spec, {}
    else:
        raise ValueError(f"hf:{spec} is not a local folder; pass --download to fetch it from the Hugging Face hub")
    try:
        return transformers.AutoConfig.from_pretrained(source, **options), source, options
    except Exception as exc:
        raise ValueError(f"cannot read the config of hf:{spec} ({' '.join(str(exc).split())[:200]})") from exc


def _fit_config(config, name: str, text: "TextSpec", num_classes, pretrained: bool) -> None:
    """The config made for the tokenizer and the task: vocabulary, positions, padding, labels. A
    pretrained model's vocabulary and positions must already fit (they are weights)."""
    positions = next((k for k in _POSITIONS if hasattr(config, k)), None)
    if pretrained:
        if config.vocab_size != text.vocab_size:
            raise ValueError(f"{name} has a vocabulary of {config.vocab_size} ids, the tokenizer {text.vocab_size}: use "
                             "the model folder's own tokenizer (leave out --tokenizer)")
        if positions and getattr(config, positions) < text.max_length:
            raise ValueError(f"{name} takes at most {getattr(config, positions)} positions: lower --seq-len")
    else:
        config.vocab_size = text.vocab_size
        if positions:
            setattr(config, positions, max(getattr(config, positions), text.max_length))
    config.pad_token_id = text.pad_id
    if text.eos_id is not None:
        config.eos_token_id = config.bos_token_id = text.eos_id
    if text.task == "classification":
        config.num_labels = num_classes
    elif getattr(config, "model_type", None) == "bert":
        config.is_decoder = True  # (BERT as a causal LM: its LM head needs the causal mask)


def load_pretrained(folder) -> nn.Module:
    """A Hugging Face model saved with save_pretrained after `ek.write_back` (or any save_pretrained
    folder): its class from config.json's architectures, the modules write_back replaced rebuilt
    from the config's record, then its weights."""
    transformers = _optional("transformers", "hf")
    from .fold.write_back import EDITS_KEY, restructure

    folder = Path(folder)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
        architecture = (config.architectures or [None])[0]
        model_class = getattr(transformers, architecture or "", None)
        if model_class is None:
            raise ValueError(f"its config names no architecture transformers has ({architecture})")
        model = model_class(config)
    except Exception as exc:
        raise ValueError(f"cannot rebuild the model in {folder} ({' '.join(str(exc).split())[:200]})") from None
    restructure(model, getattr(config, EDITS_KEY, None) or {})
    weights = next((folder / f for f in HF_WEIGHTS[::2] if (folder / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds no weights ({' or '.join(HF_WEIGHTS[::2])})")
    try:
        missing, unexpected = model.load_state_dict(read_weights(weights), strict=False)
    except RuntimeError as exc:  # weights of other shapes than the config's
        raise ValueError(f"the weights in {folder} do not fit its config ({' '.join(str(exc).split())[:200]})") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:  # (a tied weight is saved once)
        raise ValueError(f"the weights in {folder} do not fit its config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval()


# ------------------------------------------------------------------------------------ pretrained weights

CHECKPOINT_KEYS = ("state_dict", "model", "model_state_dict")  # where training scripts keep the state_dict
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


def read_weights(path) -> dict:
    """The state_dict in a file: torch.save'd (the state_dict itself, or a checkpoint dict holding it
    under "state_dict", "model" or "model_state_dict") or .safetensors. A "module." or "_orig_mod."
    prefix on every key (a DDP or compiled model's) is dropped. Raises FileNotFoundError, or
    ValueError saying what the file holds instead."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except ImportError:
        raise
    except Exception as exc:  # pickled code (weights_only refuses it), not a torch file, truncated
        reason = f"it is not a safetensors file ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})" \
            if path.suffix == ".safetensors" else why_unreadable(path, exc)
        raise ValueError(f"cannot read {path} as a state_dict: {reason}") from None
    if isinstance(state, dict):
        state = next((state[key] for key in CHECKPOINT_KEYS if isinstance(state.get(key), dict)), state)
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds no state_dict (a dict of tensors, or a checkpoint holding one under "
                         f"{', '.join(CHECKPOINT_KEYS)})")
    for prefix in WRAPPER_PREFIXES:
        if all(key.startswith(prefix) for key in state):
            state = {key.removeprefix(prefix): value for key, value in state.items()}
    return state


def classifier_name(model: nn.Module) -> str | None:
    """The classifier head's module name: timm's get_classifier(), else the last nn.Linear or 1x1
    nn.Conv2d (torchvision's, the paper's, transformers' `classifier`, SqueezeNet's conv)."""
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    last = None
    for name, module in model.named_modules():
        if module is head and name:
            return name
        if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)):
            last = name
    return last or None


def load_weights(model: nn.Module, state: dict) -> str | None:
    """Loads the state_dict into `model`. Where only its classifier head differs (the checkpoint's
    is for another class count, or it has none) every other tensor is loaded, strictly, and the
    model's freshly initialized head is kept: returns a line saying so ("replaced head fc: 1000 ->
    5 classes"); None when everything was loaded. Any other difference is a ValueError naming the
    first keys, and nothing is loaded."""
    own = model.state_dict()
    head = classifier_name(model)
    in_head = lambda key: head is not None and key.startswith(head + ".")  # noqa: E731
    # an older checkpoint may lack batch norms' counters; load_state_dict keeps the model's then
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in own if k in state and state[k].shape != own[k].shape]
    problems = []
    if bad := [k for k in mismatched if not in_head(k)]:
        problems.append(f"{_first(bad)} {'has' if len(bad) == 1 else 'have'} other shapes (first: {bad[0]} is "
                        f"{list(state[bad[0]].shape)} in the checkpoint, {list(own[bad[0]].shape)} in the model)")
    if bad := [k for k in missing if not in_head(k)]:
        problems.append(f"the checkpoint lacks {_first(bad)}")
    if bad := [k for k in unexpected if not in_head(k)]:
        problems.append(f"the model has no {_first(bad)}")
    if problems:
        raise ValueError("; ".join(problems))
    replaced = [k for k in (*mismatched, *missing, *unexpected) if in_head(k)]
    if not replaced:
        model.load_state_dict(state)
        return None
    result = model.load_state_dict({k: v for k, v in state.items() if not in_head(k)}, strict=False)
    assert all(in_head(k) for k in result.missing_keys) and not result.unexpected_keys, result
    classes = own[f"{head}.weight"].shape[0] if f"{head}.weight" in own else "?"
    old = state.get(f"{head}.weight")
    if old is None:
        return f"new head {head}: {classes} classes (the checkpoint has none)"
    return f"replaced head {head}: {old.shape[0]} -> {classes} classes"


def _first(keys, shown=3) -> str:
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more
