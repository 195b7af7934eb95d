"""The weight algebra of folding against the layers it replaces, in float64 on random weights."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

import easier_kernels as ek
from easier_kernels.fold import add_identity, compose_conv, compose_linear, dense_weight

CONV = {1: F.conv1d, 2: F.conv2d}


def weights(out_channels, in_per_group, kernel, dims, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_channels, in_per_group, *(kernel,) * dims, dtype=torch.float64, generator=g)
    return w, torch.randn(out_channels, dtype=torch.float64, generator=g) if bias else None


@pytest.mark.parametrize("dims", [1, 2])
@pytest.mark.parametrize("k1, k2", [(1, 3), (3, 1), (3, 3), (5, 3)])
@pytest.mark.parametrize("s1, s2", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False)])
def test_composed_dense_convs_equal_the_two_convs(dims, k1, k2, s1, s2, bias1, bias2):
    w1, b1 = weights(6, 4, k1, dims, bias1, seed=1)
    w2, b2 = weights(5, 6, k2, dims, bias2, seed=2)
    x = torch.randn(2, 4, *(17,) * dims, dtype=torch.float64)
    expected = CONV[dims](CONV[dims](x, w1, b1, stride=s1), w2, b2, stride=s2)
    w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1)
    assert groups == 1 and w.shape[2:] == (k1 + s1 * (k2 - 1),) * dims
    torch.testing.assert_close(CONV[dims](x, w, b, stride=s1 * s2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mult", [1, 2])
@pytest.mark.parametrize("s1", [1, 2])
def test_depthwise_then_depthwise_stays_depthwise(mult, s1):
    channels = 8
    w1, b1 = weights(channels * mult, 1, 3, 2, seed=3)      # depthwise, channel multiplier `mult`
    w2, b2 = weights(channels * mult, 1, 3, 2, seed=4)      # depthwise on conv1's channels
    x = torch.randn(2, channels, 15, 15, dtype=torch.float64)
    expected = F.conv2d(F.conv2d(x, w1, b1, stride=s1, groups=channels), w2, b2, groups=channels * mult)
    if mult == 1:
        w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1, groups1=channels, groups2=channels)
        assert groups == channels and w.shape[1] == 1
    else:  # conv2's groups differ from conv1's: the merge is dense
        w, b, groups = compose_conv(w1, b1, w2, b2, stride1=s1, groups1=channels, groups2=channels * mult)
        assert groups == 1
    torch.testing.assert_close(F.conv2d(x, w, b, stride=s1, groups=groups), expected, rtol=1e-12, atol=1e-12)


def test_grouped_convs_and_pointwise_then_depthwise():
    w1, b1 = weights(8, 2, 3, 2, seed=5)                   # groups 2: 4 -> 8
    w2, b2 = weights(6, 4, 3, 2, seed=6)                   # groups 2: 8 -> 6
    x = torch.randn(1, 4, 12, 12, dtype=torch.float64)
    w, b, groups = compose_conv(w1, b1, w2, b2, groups1=2, groups2=2)
    assert groups == 2
    torch.testing.assert_close(F.conv2d(x, w, b, groups=2), F.conv2d(F.conv2d(x, w1, b1, groups=2), w2, b2, groups=2),
                               rtol=1e-12, atol=1e-12)
    # MobileNetV2's expansion: pointwise 1x1 (dense) then depthwise 3x3 becomes a dense 3x3
    pw, pw_b = weights(24, 4, 1, 2, seed=7)
    dw, dw_b = weights(24, 1, 3, 2, seed=8)
    w, b, groups = compose_conv(pw, pw_b, dw, dw_b, groups2=24)
    assert groups == 1 and w.shape == (24, 4, 3, 3)
    torch.testing.assert_close(F.conv2d(x, w, b), F.conv2d(F.conv2d(x, pw, pw_b), dw, dw_b, groups=24),
                               rtol=1e-12, atol=1e-12)


def test_dense_weight_computes_what_the_grouped_conv_does():
    w, b = weights(6, 2, 3, 2, seed=9)
    x = torch.randn(1, 6, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(F.conv2d(x, dense_weight(w, 3), b), F.conv2d(x, w, b, groups=3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kernel, padding", [(3, 1), (1, 0), (5, 2), (3, 0)])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_identity_skip_folds_into_the_kernel(kernel, padding, groups):
    w, b = weights(6, 6 // groups, kernel, 2, seed=10)
    x = torch.randn(2, 6, 11, 11, dtype=torch.float64)
    y = F.conv2d(x, w, b, padding=padding, groups=groups)
    if y.shape != x.shape:  # a skip around a conv that shrinks the map cannot exist
        return
    w2, b2 = add_identity(w, b, padding=padding, groups=groups)
    torch.testing.assert_close(F.conv2d(x, w2, b2, padding=padding, groups=groups), y + x, rtol=1e-12, atol=1e-12)
    assert not torch.equal(w, w2)  # the input weight is left alone


def test_identity_errors():
    w, b = weights(6, 4, 3, 2)
    with pytest.raises(ValueError, match="as many output as input channels"):
        add_identity(w, b, padding=1)
    w, b = weights(4, 4, 3, 2)
    with pytest.raises(ValueError, match="outside the kernel"):
        add_identity(w, b, padding=3)
    with pytest.raises(ValueError, match="conv2 reads 6 channels but conv1 writes 4"):
        compose_conv(w, b, *weights(5, 6, 1, 2))


@pytest.mark.parametrize("bias1, bias2", [(True, True), (False, True), (True, False), (False, False)])
def test_composed_linears_equal_the_two_linears(bias1, bias2):
    g = torch.Generator().manual_seed(11)
    w1, w2 = torch.randn(32, 8, dtype=torch.float64, generator=g), torch.randn(8, 32, dtype=torch.float64, generator=g)
    b1 = torch.randn(32, dtype=torch.float64, generator=g) if bias1 else None
    b2 = torch.randn(8, dtype=torch.float64, generator=g) if bias2 else None
    x = torch.randn(3, 5, 8, dtype=torch.float64, generator=g)  # tokens: the transformer MLP with GELU linearized
    w, b = compose_linear(w1, b1, w2, b2)
    torch.testing.assert_close(F.linear(x, w, b), F.linear(F.linear(x, w1, b1), w2, b2), rtol=1e-12, atol=1e-12)


class ConvBnActConv(nn.Module):
    def __init__(self, stride):
        super().__init__()
        self.conv1, self.bn, self.act = nn.Conv2d(3, 8, 3, stride, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x):
        return self.conv2(self.act(self.bn(self.conv1(x))))


@pytest.mark.parametrize("stride", [1, 2])
def test_a_linearized_chain_folds_exactly_into_one_conv(stride):
    """linearize(exact_fold=True) moves the padding onto conv1; then batch norm folds into conv1
    (torch's fusion) and the two convs compose: one conv, equal to the chain at the borders too."""
    model = ConvBnActConv(stride).double()
    with torch.no_grad():  # a batch norm that does something
        model.bn.running_mean.uniform_(-1, 1), model.bn.running_var.uniform_(0.5, 2), model.bn.weight.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    net = ek.linearize(model, ["act"], x).eval()
    conv1, bn, conv2 = net.conv1, net.bn, net.conv2
    assert conv1.padding == (1 + stride, 1 + stride) and conv2.padding == (0, 0)
    w1, b1 = fuse_conv_bn_weights(conv1.weight, conv1.bias, bn.running_mean, bn.running_var, bn.eps, bn.weight, bn.bias)
    w, b, groups = compose_conv(w1, b1, conv2.weight, conv2.bias, stride1=stride)
    folded = F.conv2d(x, w, b, stride=stride, padding=conv1.padding)
    torch.testing.assert_close(folded, net(x), rtol=1e-12, atol=1e-12)
