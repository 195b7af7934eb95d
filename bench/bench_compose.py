"""Time to compose a depthwise conv with a dense one (what `ek.fold` does to merge a separable
conv's pair): per channel (`compose_conv` now) against the depthwise kernel made dense first
(what it did before, and still does for other groupings). Shapes of timm's Xception-41, whose
728-channel separable convs took minutes to fold (issue 17). With --benchmark-disable (CI) the
two routes run on small shapes and must give the same weights."""

from __future__ import annotations

import pytest
import torch

from easier_kernels.fold.algebra import compose_conv, dense_weight

# name -> (channels, other side's channels, depthwise kernel, dense kernel, depthwise first)
CASES = {
    "pointwise-then-depthwise-728": (728, 728, 3, 1, False),
    "depthwise-then-pointwise-728": (728, 728, 3, 1, True),
    # a 3x3 merged from a separable pair, then the next depthwise 3x3 (Xception's middle flow)
    "dense3x3-then-depthwise-728": (728, 728, 3, 3, False),
}


def weights(channels, other, k_dw, k_dense, depthwise_first, generator):
    dw = torch.randn(channels, 1, k_dw, k_dw, generator=generator)
    if depthwise_first:
        return dw, torch.randn(other, channels, k_dense, k_dense, generator=generator), channels, 1
    return torch.randn(channels, other, k_dense, k_dense, generator=generator), dw, 1, channels


def routes(w1, w2, groups1, groups2) -> dict:
    return {
        "per channel": lambda: compose_conv(w1, None, w2, None, groups1=groups1, groups2=groups2)[0],
        "dense first": lambda: compose_conv(dense_weight(w1, groups1), None, dense_weight(w2, groups2), None)[0],
    }


@pytest.mark.parametrize("case", list(CASES))
def test_compose_depthwise_with_dense(measure, case, request):
    small = request.config.getoption("benchmark_disable")
    channels, other, k_dw, k_dense, depthwise_first = CASES[case]
    if small:
        channels, other = 16, 12
    w1, w2, groups1, groups2 = weights(channels, other, k_dw, k_dense, depthwise_first, torch.Generator().manual_seed(0))
    ours, dense = routes(w1, w2, groups1, groups2).values()
    torch.testing.assert_close(ours(), dense(), rtol=1e-4, atol=1e-4)
    times = measure(ours, "cpu", group=f"compose {case}", name="per channel", others={"dense first": dense})
    if times is None:
        return
    measure.record({"ms per channel": times["self"] * 1e3, "ms dense first": times["dense first"] * 1e3,
                    "ratio": times["self"] / times["dense first"]})
