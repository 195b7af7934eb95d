"""Latency of folded networks in the runtime they are planned for: eager PyTorch, torch.compile
(inductor) and ONNX Runtime. Per case, in that runtime and side by side in turns: the original,
the original with batch norms folded (the baseline), the network with the sites linearized but
not folded, and `ek.fold` of it (planned by `ek.linearize(runtime=...)`, folded with
`ek.fold(runtime=..., original=...)`, so the whole-network check ran in that runtime too).

Targets (issue 14, DESIGN.md): every folded/BN-folded ratio <= 1.00 (median of paired rounds)
for every site set; the linearized network never slower than the original; torchvision
MobileNetV2 at 224 px with its first 15 of 35 sites linear <= 0.5x eager, <= 0.85x inductor
and ONNX Runtime.

Site sets per model: "entropy" (the lowest-entropy sites on real images, at the paper's counts:
ResNet-18 8 of 17, MobileNetV2 15 of 35, VGG-16-bn 10 of 15, Swin-T 8 of 12), "first" (as many,
from the input end), "first-half", "every-other" and "all". Weights are random (seeded): latency does not depend on their values.
With --benchmark-disable (CI) each runtime runs one small case and checks the outputs only.
`EK_BENCH_RUNTIMES=eager,onnxruntime`, `EK_BENCH_MODELS=mobilenet_v2-224`, `EK_BENCH_BATCHES=1`,
`EK_BENCH_SETS=entropy,first` pick a part of the matrix.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek
from easier_kernels import runtimes
from easier_kernels.benchmark import bn_folded
from easier_kernels.compat import import_torchvision
from easier_kernels.timing import compare

# name -> (builder(small), input size (full, small), entropy's count, batch sizes)
MODELS = {
    "mobilenet_v2-224": (lambda small: import_torchvision().models.mobilenet_v2(width_mult=0.25 if small else 1.0),
                         (224, 64), 15, (1, 16)),
    "resnet18-cifar": (lambda small: ek.models.resnet18(width=0.25 if small else 1.0), (32, 32), 8, (1, 128)),
    "vgg16_bn-cifar": (lambda small: ek.models.vgg16_bn(width=0.25 if small else 1.0), (32, 32), 10, (1, 128)),
    "swin_t-224": (lambda small: import_torchvision().models.swin_t(), (224, 64), 8, (1,)),
}
SITE_SETS = ("entropy", "first", "first-half", "every-other", "all")


def _picked(variable: str, default) -> list:
    return os.environ[variable].split(",") if os.environ.get(variable) else list(default)


CASES = [(name, batch, sites, runtime) for runtime in _picked("EK_BENCH_RUNTIMES", runtimes.RUNTIMES)
         for name in _picked("EK_BENCH_MODELS", MODELS) for batch in MODELS[name][3]
         if str(batch) in _picked("EK_BENCH_BATCHES", map(str, MODELS[name][3])) for sites in _picked("EK_BENCH_SETS", SITE_SETS)]
SMALL = [("mobilenet_v2-224", 1, "first-half", runtime) for runtime in runtimes.RUNTIMES]


def pytest_generate_tests(metafunc):
    """The full matrix with the benchmarks enabled; one small case per runtime otherwise (CI)."""
    if "runtime" in metafunc.fixturenames:
        cases = SMALL if metafunc.config.getoption("benchmark_disable") else CASES
        metafunc.parametrize("name,batch,sites,runtime", cases, ids=["-".join(map(str, c)) for c in cases])


def site_set(model, which: str, example, images, size, count) -> list[str]:
    names = [s.name for s in ek.find_sites(model, example)]
    if which == "entropy":  # on real images, in train mode, as the paper scores
        batches = [F.interpolate(images[i:i + 16], size=size, mode="bilinear") for i in range(0, 64, 16)]
        return ek.entropy_scores(model.train(), batches).ranking()[:count]
    return {"first": names[:count], "first-half": names[: len(names) // 2], "every-other": names[::2], "all": names}[which]


def test_fold_latency(benchmark, record, real_images, steady_malloc, name, batch, sites, runtime):
    if runtime == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed (pip install '.[onnx]')")
    build, (full, small_size), count, _ = MODELS[name]
    small = not benchmark.enabled
    torch.manual_seed(0)
    model = build(small).eval()
    size = small_size if small else full
    example = torch.randn(2 if small else batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    chosen = site_set(model, sites, example, real_images[0], size, count)
    model.eval()
    net = ek.linearize(model, chosen, example, runtime=runtime).eval()
    folded = ek.fold(net, example, runtime=runtime, original=model)
    variants = {"original": model, "bn_folded": bn_folded(model), "linearized": net, "folded": folded}
    benchmark.group, benchmark.name = f"fold {runtime}", f"{name}-b{batch}-{sites}"
    with torch.no_grad():
        benchmark.pedantic(folded, args=(example,), rounds=3, warmup_rounds=1)
        outputs = {label: m(example) for label, m in variants.items()}
    for label, out in outputs.items():  # each variant computes its source's eval outputs
        source = outputs["original" if label in ("original", "bn_folded") else "linearized"]
        assert float((out - source).abs().max() / source.abs().max()) <= 1e-4, label
    if small:
        return
    calls = {label: runtimes.runner(m, (example,), runtime) for label, m in variants.items()}
    rows = compare(calls, "bn_folded", example.device, seconds=12.0, max_rounds=40)
    linear = compare({k: calls[k] for k in ("original", "linearized")}, "original", example.device, seconds=6.0)
    record_fold = ek.recipe(folded)["fold"]
    print(f"\n{name} batch {batch} {sites} ({runtime}): {len(chosen)} sites\n"
          + ek.format_decisions(record_fold["decisions"], record_fold["latency"]))
    plans = [r["choice"] for r in record_fold["decisions"]]
    record({"model": name, "batch": batch, "sites": f"{sites} ({len(chosen)})", "runtime": runtime,
            "bn_folded ms": rows["bn_folded"]["ms"], "folded ms": rows["folded"]["ms"],
            "folded / bn_folded": rows["folded"]["ratio"], "q1-q3": f"{rows['folded']['q1']:.2f}-{rows['folded']['q3']:.2f}",
            "linearized / original": linear["linearized"]["ratio"],
            "lin q1-q3": f"{linear['linearized']['q1']:.2f}-{linear['linearized']['q3']:.2f}",
            "plans": f"{sum(p != 'separate' for p in plans)}/{len(plans)} changed",
            "fallbacks": len(record_fold["latency"]["fallbacks"]) if record_fold["latency"] else 0})
