"""Helpers shared by the tests: random inputs with the awkward cases, and exact comparison."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile

import torch
import torch.nn as nn

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def special_values(shape, dtype, generator: torch.Generator) -> torch.Tensor:
    """Random normals with exact +-0, +-inf and NaN sprinkled in."""
    x = torch.randn(shape, generator=generator, dtype=torch.float32)
    pick = torch.rand(shape, generator=generator)
    x[pick < 0.08] = 0.0
    x[(pick >= 0.08) & (pick < 0.12)] = -0.0
    x[(pick >= 0.12) & (pick < 0.14)] = float("inf")
    x[(pick >= 0.14) & (pick < 0.16)] = float("-inf")
    x[(pick >= 0.16) & (pick < 0.18)] = float("nan")
    return x.to(dtype)


def random_cases(seed: int, count: int, max_numel: int, dtype=None):
    """Yields (description, x, channel_dim) over random shapes and layouts: odd sizes, size-1 dims,
    empty batches, contiguous, channels_last, tokens [..., C], permuted and gapped (slow path)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    layouts = ("contiguous", "channels_last", "tokens", "permuted", "gapped", "matrix")
    for i in range(count):
        layout = layouts[i % len(layouts)]
        dt = dtype or DTYPES[rng.randrange(len(DTYPES))]
        while True:
            dims = 2 if layout == "matrix" else (3 if layout == "tokens" else 4)
            shape = [rng.choice([1, 2, 3, 5, 7, 8, 13, 16]) for _ in range(dims)]
            if rng.random() < 0.1:
                shape[0] = 0  # empty batch
            if torch.Size(shape).numel() <= max_numel:
                break
        values = special_values(shape, dt, gen)
        if layout == "channels_last":
            x, cdim = values.contiguous(memory_format=torch.channels_last), 1
        elif layout == "tokens":
            x, cdim = values, -1
        elif layout == "permuted":  # [N, H, W, C] memory viewed as [N, C, H, W]
            x, cdim = values.permute(0, 3, 1, 2), 1
        elif layout == "gapped":
            x, cdim = torch.cat([values, values], dim=-1)[..., ::2], 1
        else:
            x, cdim = values, 1
        yield f"{layout}-{tuple(x.shape)}-{str(dt)[6:]}", x, cdim


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Same shape, dtype, NaN positions and identical bits everywhere else (so -0 != +0)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    nan_a, nan_e = torch.isnan(actual), torch.isnan(expected)
    assert torch.equal(nan_a, nan_e), "NaN positions differ"
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    a = actual.masked_fill(nan_a, 0).contiguous().view(bits)
    e = expected.masked_fill(nan_e, 0).contiguous().view(bits)
    mismatch = (a != e).nonzero()
    assert mismatch.numel() == 0, f"{mismatch.shape[0]} elements differ, first at {mismatch[0].tolist()}"


def run_python(*args: str, env_updates: dict | None = None, drop_env=(), cwd=None) -> subprocess.CompletedProcess:
    """`python *args` in a fresh process. It runs outside the repository by default, so that
    the installed package is imported, not the source tree (which has no built extension)."""
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(env_updates or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd or tempfile.gettempdir())


def data_root():
    """The real datasets: $EASIER_KERNELS_DATA, else ../shared/data next to the repository."""
    from pathlib import Path

    from easier_kernels.data import find_root

    return find_root(Path(__file__).resolve().parents[2] / "shared" / "data")


_IMAGES: dict = {}


def real_images() -> tuple[torch.Tensor, torch.Tensor]:
    """Real labelled images, normalized float32 [N, 3, 32, 32]: the CIFAR-10 subset's training
    split where the shared data is here, else the Fashion-MNIST subset the package ships (its
    grey channel repeated to three, zero-padded to 32 px), so the method's tests run on every
    fresh clone. real_images_source() names which."""
    if not _IMAGES:
        from easier_kernels import data

        root = data_root()
        if root is not None and (root / "cifar10-subset").is_dir():
            images, labels = data.cifar10_subset(root, "train").tensors
            source = "cifar10-subset"
        else:
            images, labels = data.load("fashion-mnist-mini", augment=False).train.tensors
            images = torch.nn.functional.pad(images, (2, 2, 2, 2)).expand(-1, 3, -1, -1).contiguous()
            source = "fashion-mnist-mini as 3x32x32"
        _IMAGES.update(images=images, labels=labels, source=source)
    return _IMAGES["images"], _IMAGES["labels"]


def real_images_source() -> str | None:
    """Which images real_images() gave; None before it was called."""
    return _IMAGES.get("source")


def real_batches(batches: int, batch_size: int) -> list:
    """`batches` (images, labels) batches of real_images()."""
    images, labels = real_images()
    return [(images[i * batch_size:(i + 1) * batch_size], labels[i * batch_size:(i + 1) * batch_size]) for i in range(batches)]


# ---- models the tests share

TORCHVISION_MODELS = ["resnet18", "resnet50", "vgg16_bn", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
                      "regnet_x_400mf", "convnext_tiny", "swin_t", "vit_b_16"]


def torchvision_model(name):
    from easier_kernels.compat import import_torchvision

    tv = import_torchvision()
    kwargs = {"image_size": 32} if name == "vit_b_16" else {}  # ViT's position embedding fixes its input size
    torch.manual_seed(0)
    return getattr(tv.models, name)(num_classes=10, **kwargs)


def paper_or_torchvision(name):
    """"paper-<name>": the paper's CIFAR model at width 0.25; else a torchvision model."""
    if name.startswith("paper-"):
        import easier_kernels as ek

        torch.manual_seed(0)
        return ek.models.paper_model(name[6:], width=0.25)
    return torchvision_model(name)


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        if x.sum() > 0:
            return self.act(self.conv(x))
        return x


class WithGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.blocks = nn.Sequential(nn.Identity(), Gate())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.blocks(self.relu(self.stem(x))).mean((2, 3)))


def randomize_batch_norms(model, seed=0):
    """Batch norms that do something in eval mode (fresh ones are the identity); the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.5)
    return model.eval()


def fused_everywhere(net, x) -> dict:
    """`ek.fold(net, x, decide=...)`'s decisions that run every chain a fused block can as one."""
    import easier_kernels as ek
    from easier_kernels.fold import find_chains, fold_batch_norms
    from easier_kernels.fold.plans import plan_label, plans

    gm = ek.capture.capture(net).eval()
    fold_batch_norms(gm, (x,))
    replay = {}
    for chain in find_chains(gm):
        labels = [plan_label(p) for p in plans([gm.get_submodule(n.target) for n in chain.layers])]
        replay[chain.name] = next((label for label in labels if "fused" in label), "separate")
    return replay
