"""Convolution + activation fusion (``lightning_app.conv_fusion``): same numbers as the unfused modules, only where
the activation alone reads the convolution's output, and the engine's CPU float32 path uses it."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import Conv2dSame

from lightning_app import conv_fusion
from lightning_app.conv_fusion import ConvAct2d, find_conv_act_pairs, fuse_conv_activations
from lightning_app.engine import InferenceEngine, relative_error
from lightning_app.zoo.families.mobilenet import ZeroPadConv2d

pytestmark = pytest.mark.skipif(not conv_fusion.available(), reason="this PyTorch build has no oneDNN fused conv")

ACTS = [nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Sigmoid, lambda: nn.Hardtanh(-1.5, 2.5), lambda: nn.ReLU(True)]


def _conv(kind: str) -> nn.Module:
    if kind == "same":  # TensorFlow "same" padding, stride 2: padded asymmetrically
        return Conv2dSame(6, 8, 3, stride=2)
    if kind == "same_depthwise":  # its uneven split pads the kernel, not the input
        return Conv2dSame(6, 6, 5, stride=2, groups=6)
    if kind == "zeropad_depthwise":  # Keras MobileNet's ZeroPadding2D(((0, 1), (0, 1))) + "valid"
        return ZeroPadConv2d(6, 6, 3, stride=2, groups=6)
    if kind == "zeropad_dense":
        return ZeroPadConv2d(6, 8, 3, stride=2, pad=(1, 0, 0, 1))
    if kind == "depthwise":
        return nn.Conv2d(6, 6, 3, padding=1, groups=6)
    return nn.Conv2d(6, 8, (1, 3), padding=(0, 1), bias=False)


@pytest.mark.parametrize("kind", ["plain", "same", "depthwise", "same_depthwise", "zeropad_depthwise",
                                  "zeropad_dense"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_pair_computes_what_the_two_modules_compute(kind, act, channels_last):
    torch.manual_seed(0)
    net = nn.Sequential(_conv(kind), act()).eval()
    x = torch.randn(3, 6, 12, 13) * 2  # "same" at stride 2: 12 splits unevenly, 13 evenly
    if channels_last:
        net, x = net.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net(x.clone())
        fused = copy.deepcopy(net)
        assert fuse_conv_activations(fused, x[:1].clone()) == 1
        assert isinstance(fused[0], ConvAct2d) and isinstance(fused[1], nn.Identity)
        out = fused(x.clone())
    assert out.shape == ref.shape
    assert relative_error(out, ref) < 1e-6


def test_only_sole_readers_are_fused():
    class Residual(nn.Module):  # the convolution's output is read twice: fusing would drop the pre-activation value
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.act = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.act(y) + y

    class SharedAct(nn.Module):  # one ReLU module applied twice
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2, self.act = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1), nn.ReLU()

        def forward(self, x):
            return self.act(self.c2(self.act(self.c1(x))))

    x = torch.randn(1, 4, 5, 5)
    assert find_conv_act_pairs(Residual().eval(), x) == []
    assert find_conv_act_pairs(SharedAct().eval(), x) == []
    chain = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Identity(), nn.SiLU(),
                          nn.Conv2d(4, 4, 1, padding_mode="reflect"), nn.ReLU()).eval()
    # an Identity between them reads nothing; a reflect-padded convolution is not fused
    assert find_conv_act_pairs(chain, x) == [("0", "1"), ("2", "4")]


def test_gradients_flow_through_the_unfused_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.SiLU()).eval().requires_grad_(False)
    fused = copy.deepcopy(net)
    fuse_conv_activations(fused, torch.randn(1, 3, 8, 8))
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (g_ref,) = torch.autograd.grad(net(x).square().sum(), x)
    (g,) = torch.autograd.grad(fused(x).square().sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_engine_fuses_on_the_cpu_in_float32_and_follows_weight_updates():
    torch.manual_seed(0)
    src = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.SiLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten()).eval()
    src[1].running_mean.uniform_(-1, 1)
    src[1].running_var.uniform_(0.5, 2)
    x = torch.rand(4, 3, 16, 16)
    engine = InferenceEngine(src, {"compile": False})
    out = engine(x)
    assert "2 convolution + activation pairs fused" in engine.status
    assert sum(isinstance(m, ConvAct2d) for m in engine._copy.net.modules()) == 2
    with torch.no_grad():
        assert relative_error(out, src(x)) < 1e-5
        src[3].weight.mul_(-0.5)  # an in-place update: the fused copy is refreshed
        assert relative_error(engine(x), src(x)) < 1e-5
    plain = InferenceEngine(src, {"compile": False, "fuse_activations": False})
    plain(x)
    assert "fused" not in plain.status and not any(isinstance(m, ConvAct2d) for m in plain._copy.net.modules())
