"""The fused conv block (`ek.ops.conv_block`) against the same chain as separate torch
convolutions, per shape: time, effective GB/s (the bytes the fused op must move: input, output,
weights) and the ratio separate / fused (> 1: the fused kernel wins).

Shapes are MobileNetV2's inverted residuals at 224 px with one ReLU6 linearized: pointwise
expand then depthwise 3x3 (pw_dw, ReLU6 after it), or depthwise 3x3 then pointwise project
(dw_pw, residual add where the block has one), at batch 1 and 16. `ek.fold` makes the same
comparison per chain when it decides, so a loss here means fold keeps the separate convs.

On CUDA, cuDNN may round float32 convolutions through TF32 (torch's default for convolutions);
the fused kernel never does (its float32 dots are "ieee"). So the correctness check compares
with TF32 off, every row says so in its TF32 column, and the separate convolutions are timed both
ways: "separate" with TF32 off (the same arithmetic as the fused kernel) and "separate TF32"
with it on (what an unchanged torch program runs). EK_BENCH_QUICK=1 keeps four of the shapes.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import easier_kernels as ek

# name -> (pattern, Cin, Cout, H (input), stride, residual)
SHAPES = {
    "pw_dw 16->96 112px s2": ("pw_dw", 16, 96, 112, 2, False),
    "pw_dw 24->144 56px s1": ("pw_dw", 24, 144, 56, 1, False),
    "pw_dw 32->192 28px s1": ("pw_dw", 32, 192, 28, 1, False),
    "pw_dw 64->384 14px s1": ("pw_dw", 64, 384, 14, 1, False),
    "pw_dw 160->960 7px s1": ("pw_dw", 160, 960, 7, 1, False),
    "dw_pw 144->24 56px s1 +res": ("dw_pw", 144, 24, 56, 1, True),
    "dw_pw 192->32 28px s1 +res": ("dw_pw", 192, 32, 28, 1, True),
    "dw_pw 384->64 14px s1 +res": ("dw_pw", 384, 64, 14, 1, True),
    "dw_pw 576->96 14px s1 +res": ("dw_pw", 576, 96, 14, 1, True),
    "dw_pw 960->160 7px s1 +res": ("dw_pw", 960, 160, 7, 1, True),
}
QUICK_SHAPES = ("pw_dw 16->96 112px s2", "pw_dw 32->192 28px s1", "dw_pw 144->24 56px s1 +res", "dw_pw 384->64 14px s1 +res")
QUICK = os.environ.get("EK_BENCH_QUICK", "0") == "1"
CASES = [(shape, batch) for shape in SHAPES for batch in (1, 16) if not QUICK or shape in QUICK_SHAPES]


def inputs(pattern, cin, cout, h, stride, residual, batch, device):
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    x = rand(batch, cin, h, h)
    w1, b1, w2, b2 = ((rand(cout, cin, 1, 1), rand(cout), rand(cout, 1, 3, 3), rand(cout)) if pattern == "pw_dw"
                      else (rand(cin, 1, 3, 3), rand(cin), rand(cout, cin, 1, 1), rand(cout)))
    ho = (h + 2 - 3) // stride + 1
    return x, w1, b1, w2, b2, rand(batch, cout, ho, ho) if residual else None


@pytest.mark.parametrize("shape,batch", CASES, ids=[f"{s}-b{b}".replace(" ", "_") for s, b in CASES])
def test_conv_block(measure, tf32, device, impl, shape, batch):
    pattern, cin, cout, h, stride, residual = SHAPES[shape]
    x, w1, b1, w2, b2, r = inputs(pattern, cin, cout, h, stride, residual, batch, device)
    act = "identity" if residual else "relu6"
    groups = (w2 if pattern == "pw_dw" else w1).shape[0]

    def separate():
        if pattern == "pw_dw":
            out = F.conv2d(F.conv2d(x, w1, b1), w2, b2, stride=stride, padding=1, groups=groups)
        else:
            out = F.conv2d(F.conv2d(x, w1, b1, stride=stride, padding=1, groups=groups), w2, b2)
        out = out + r if r is not None else out
        return F.relu6(out) if act == "relu6" else out

    def fused():
        with ek.ops.use_backend(impl):
            return ek.ops.conv_block(x, w1, b1, w2, b2, pattern=pattern, stride=stride, padding=1, residual=r,
                                     activation=act)

    def separate_tf32():
        with tf32.allowed(True):
            return separate()

    fn = separate if impl == "torch" else fused
    cuda = device == "cuda"
    others = {"separate": separate, **({"separate TF32": separate_tf32} if cuda else {})}
    with torch.no_grad(), tf32.allowed(False) if cuda else contextlib.nullcontext():
        out = fn()
        expected = separate()
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
        times = measure(fn, device, group=f"conv_block {shape} b{batch} {device}", name=impl, others=others)
    if times is None:
        return
    moved = sum(t.numel() * t.element_size() for t in (x, out, w1, b1, w2, b2, *([r] if r is not None else [])))
    row = {"device": device, "shape": shape, "batch": batch, "ms": times["self"] * 1e3, "GB/s": moved / times["self"] / 1e9,
           "separate ms": times["separate"] * 1e3, "separate / this": times["separate"] / times["self"]}
    if cuda:
        row.update({"TF32": "off; separate TF32: cuDNN on", "separate TF32 ms": times["separate TF32"] * 1e3,
                    "separate TF32 / this": times["separate TF32"] / times["self"]})
    measure.record(row)
