"""Latency of folded networks: the original (eager), the original with batch norms folded
(`torch.fx.experimental.optimization.fuse`), linearized but not folded, `ek.fold`, and
torch.compile of the BN-folded original and of the folded model.

Targets (issue 5, DESIGN.md): the folded model is never slower than the BN-folded original;
torchvision MobileNetV2 at 224 px with 15 of 35 sites linearized <= 0.7x the BN-folded original
on CPU; on GPU, the 1.4-2.5x speed-ups published for depth-compressed MobileNetV2 (LayerMerge).

Sites are chosen by `ek.entropy_scores` on real CIFAR-10 images (resized to the model's input),
at the paper's counts: ResNet-18 8 of 17, MobileNetV2 15 of 35, VGG-16-bn 10 of 15, Swin-T 8 of
12. Weights are random (seeded): latency does not depend on their values. The variants run in
turns on the same input and the ratios are per-round quartiles against the BN-folded original.
With --benchmark-disable (CI) each case runs small (width 0.25 or 64 px, batch 2, no compile) and
only checks that every variant computes the same outputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels.benchmark import fold_variants, latency_ratios
from easier_kernels.compat import import_torchvision

# name -> (builder(small), input size (full, small), sites to linearize, batch sizes)
MODELS = {
    "mobilenet_v2-224": (lambda small: import_torchvision().models.mobilenet_v2(width_mult=0.25 if small else 1.0),
                         (224, 64), 15, (1, 16)),
    "resnet18-cifar": (lambda small: ek.models.resnet18(width=0.25 if small else 1.0), (32, 32), 8, (1, 128)),
    "vgg16_bn-cifar": (lambda small: ek.models.vgg16_bn(width=0.25 if small else 1.0), (32, 32), 10, (1, 128)),
    "swin_t-224": (lambda small: import_torchvision().models.swin_t(), (224, 64), 8, (1,)),
}
CASES = [(name, batch) for name, (_, _, _, batches) in MODELS.items() for batch in batches]


def chosen_sites(model, images, size, count) -> list[str]:
    """The `count` lowest-entropy sites on real images (train mode, as the paper scores)."""
    batches = [F.interpolate(images[i:i + 16], size=size, mode="bilinear") for i in range(0, 64, 16)]
    scores = ek.entropy_scores(model.train(), batches)
    return scores.ranking()[:count]


@pytest.mark.parametrize("name,batch", CASES, ids=[f"{n}-b{b}" for n, b in CASES])
def test_fold_latency(benchmark, record, real_images, steady_malloc, name, batch):
    build, (full, small_size), count, _ = MODELS[name]
    small = not benchmark.enabled
    torch.manual_seed(0)
    model = build(small)
    size = small_size if small else full
    sites = chosen_sites(model, real_images[0], size, count)
    example = torch.randn(2 if small else batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    variants = fold_variants(model, sites, example, compile=not small)
    benchmark.group, benchmark.name = "fold", f"{name}-b{batch}"
    with torch.no_grad():
        benchmark.pedantic(variants["folded"], args=(example,), rounds=3, warmup_rounds=1)
        outputs = {label: m(example) for label, m in variants.items()}
    for label, out in outputs.items():  # each variant computes its source's eval outputs
        source = outputs["original" if label == "original" or "bn_folded" in label else "linearized"]
        assert float((out - source).abs().max() / source.abs().max()) <= 1e-4, label
    if small:
        return
    rows = latency_ratios(variants, example)
    table = ek.format_decisions(ek.recipe(variants["folded"])["fold"]["decisions"])
    print(f"\n{name} batch {batch}: sites {sites}\n{table}")
    record({"model": name, "batch": batch, "linearized": f"{count}/{len(ek.find_sites(model, example))}",
            **{f"{label} ms": row["ms"] for label, row in rows.items()},
            **{f"{label} / bn_folded": row["ratio"] for label, row in rows.items() if label != "bn_folded"},
            "folded q1-q3": f"{rows['folded']['q1']:.2f}-{rows['folded']['q3']:.2f}",
            "plans": ", ".join(sorted({r["choice"] for r in ek.recipe(variants["folded"])["fold"]["decisions"]}))})
