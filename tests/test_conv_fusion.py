"""Convolution + activation fusion (``lightning_app.conv_fusion``): same numbers as the unfused modules, only where
the activation alone reads the convolution's output, and the engine's CPU float32 and bf16 paths use it."""
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
    engine = InferenceEngine(src, {"compile": False, "precision": "fp32"})
    out = engine(x)
    assert "2 convolution + activation pairs fused" in engine.status
    assert sum(isinstance(m, ConvAct2d) for m in engine._copy.net.modules()) == 2
    with torch.no_grad():
        assert relative_error(out, src(x)) < 1e-5
        src[3].weight.mul_(-0.5)  # an in-place update: the fused copy is refreshed
        assert relative_error(engine(x), src(x)) < 1e-5
    plain = InferenceEngine(src, {"compile": False, "precision": "fp32", "fuse_activations": False})
    plain(x)
    assert "fused" not in plain.status and not any(isinstance(m, ConvAct2d) for m in plain._copy.net.modules())


def _packed_shapes(m: ConvAct2d):
    return list(m.reordered._packed)


def test_convolution_reorders_its_weight_once_per_shape_and_follows_weight_changes():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1).eval()
    m = ConvAct2d(conv)  # no activation: the convolution alone
    cl = torch.channels_last
    xs = [torch.randn(b, 8, h, h).contiguous(memory_format=cl) for b, h in ((4, 9), (2, 9), (4, 7), (1, 5), (3, 9))]
    with torch.no_grad():
        for x in xs + xs[:1]:
            assert torch.equal(m(x), torch.ops.mkldnn._convolution_pointwise(
                x, conv.weight, conv.bias, [1, 1], [1, 1], [1, 1], 1, "none", [], None))
        assert _packed_shapes(m) == [xs[4].shape, xs[0].shape]  # per input shape, the oldest dropped
        assert all(p.is_mkldnn for p in m.reordered._packed.values())
        conv.weight.mul_(-2.0)  # an in-place change (the engine's refresh): reordered again
        assert torch.allclose(m(xs[0]), conv(xs[0]), rtol=1e-5, atol=1e-5)
        assert _packed_shapes(m) == [xs[0].shape]
        m(xs[0].contiguous())  # NCHW input: the weight as it is, nothing kept
        assert _packed_shapes(m) == [xs[0].shape]
        dw = ConvAct2d(nn.Conv2d(8, 8, 3, padding=1, groups=8))  # depthwise: not reordered
        assert torch.equal(dw(xs[0]), dw.conv(xs[0])) and _packed_shapes(dw) == []
    x = xs[0].clone().requires_grad_(True)  # autograd: the module itself
    m(x).sum().backward()
    assert x.grad is not None
    m2 = copy.deepcopy(m)  # the reordered weights are a cache, not state
    assert _packed_shapes(m2) == [] and torch.equal(m2.conv.weight, conv.weight)


def test_wrap_convolutions_wraps_the_rest_and_skips_what_calls_its_own():
    class Calls(nn.Module):  # calls its convolution's weight itself
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            return torch.nn.functional.conv2d(x, self.conv.weight, self.conv.bias)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), ConvAct2d(nn.Conv2d(4, 4, 1), nn.ReLU()), Calls(),
                        Conv2dSame(4, 4, 3, stride=2), nn.Conv2d(4, 4, 3, padding="same")).eval()
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = net(x)
        assert conv_fusion.wrap_convolutions(net, skip_inside=(Calls,)) == 2  # not: string padding, inside Calls
        assert type(net[0]) is ConvAct2d and net[0].act is None and type(net[1].conv) is nn.Conv2d
        assert type(net[2].conv) is nn.Conv2d and type(net[3]) is ConvAct2d and type(net[4]) is nn.Conv2d
        assert torch.allclose(net(x), ref, rtol=1e-6, atol=1e-6)


def test_engine_runs_every_convolution_with_a_reordered_weight_and_follows_the_source():
    from lightning_app.engine import InferenceOptions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 1),
                        nn.BatchNorm2d(8), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    engine = InferenceEngine(net, InferenceOptions(compile=False, precision="fp32"))
    x = torch.rand(2, 3, 10, 10)
    with torch.no_grad():
        assert relative_error(engine(x), net(x)) < 1e-6
        convs = [m for m in engine._copy.net.modules() if isinstance(m, ConvAct2d)]
        assert [m.attr for m in convs] == ["relu", "none"]
        assert [[s[0] for s in _packed_shapes(m)] for m in convs] == [[1, 2], [1, 2]]  # the build's 1-image trace
        net[3].weight.mul_(0.5)  # fine-tuning changed the source: the copy is refreshed and reordered again
        assert relative_error(engine(x), net(x)) < 1e-6
        assert [len(m.reordered._packed) for m in convs] == [1, 1]


def _bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("kind", ["plain", "same", "same_depthwise", "zeropad_dense"])
@pytest.mark.parametrize("act", [nn.ReLU, nn.SiLU, nn.Hardswish])
def test_fused_pair_under_bf16_autocast_matches_autocast_with_operands_cast_once(kind, act):
    """Under CPU bf16 autocast a fused pair runs the fused op in bf16 (bf16 out, as autocast's convolution), close
    to the two modules under autocast; its weight and bias are cast once (and reordered once) and cast again after
    an in-place change; float32 without autocast still matches float32."""
    torch.manual_seed(0)
    net = nn.Sequential(_conv(kind), act()).eval()
    x = (torch.randn(3, 6, 12, 13) * 2).contiguous(memory_format=torch.channels_last)
    net = net.to(memory_format=torch.channels_last)
    fused = copy.deepcopy(net)
    with torch.no_grad():
        assert fuse_conv_activations(fused, x[:1].clone()) == 1
    with torch.inference_mode(), _bf16_autocast():
        ref = net(x)
        out = fused(x)
        cast = fused[0].bf16._cast
        out2 = fused(x)
        assert fused[0].bf16._cast[0] is cast[0]  # cast once
    assert out.dtype == ref.dtype == torch.bfloat16 and torch.equal(out, out2)
    assert relative_error(out.float(), ref.float()) < 2e-2
    assert cast[0].dtype == torch.bfloat16 and not cast[0].is_inference()
    with torch.no_grad():
        fused[0].conv.weight.mul_(-1.5)  # the engine's in-place refresh
        net[0].weight.mul_(-1.5)
    with torch.inference_mode(), _bf16_autocast():
        after, ref_after = fused(x), net(x)
    assert fused[0].bf16._cast[0] is not cast[0]
    assert relative_error(after.float(), ref_after.float()) < 2e-2
    with torch.no_grad():  # no autocast: the float32 fused op, float32 numbers
        assert relative_error(fused(x), net(x)) < 1e-6


def test_bf16_fused_path_uses_the_fused_op_and_steps_aside_for_other_autocast_and_compile(monkeypatch):
    torch.manual_seed(0)
    m = ConvAct2d(nn.Conv2d(6, 8, 3, padding=1).eval(), nn.ReLU())
    x = torch.randn(2, 6, 9, 9).contiguous(memory_format=torch.channels_last)
    calls = []
    real = torch.ops.mkldnn._convolution_pointwise

    class Ops:  # counts the fused op's calls
        @staticmethod
        def _convolution_pointwise(*args):
            calls.append(args[0].dtype)
            return real(*args)

        _reorder_convolution_weight = staticmethod(torch.ops.mkldnn._reorder_convolution_weight)

    monkeypatch.setattr(conv_fusion.torch.ops, "mkldnn", Ops)
    with torch.inference_mode():
        with _bf16_autocast():
            m(x)
        assert calls == [torch.bfloat16]
        with torch.autocast("cpu", dtype=torch.float16):  # another autocast dtype: the modules themselves
            m(x)
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)  # inductor fuses by itself
        with _bf16_autocast():
            m(x)
    assert calls == [torch.bfloat16]


def test_engine_in_bf16_fuses_and_restructures_on_the_cpu_but_keeps_dense_blocks_unbuffered():
    """The bf16 engine on a CPU: convolutions fused (status), TF-"same" convolutions restructured, DenseNet blocks
    without the float32 buffer; its output within bf16 rounding of the bf16 engine without fusing /
    restructuring, and it follows an in-place change of the source."""
    from lightning_app import dense_blocks
    from lightning_app.engine import InferenceOptions
    from test_engine import zoo_net

    for name in ("EfficientNetB0", "DenseNet121"):
        net = zoo_net(name, 64)
        x = torch.rand(2, 3, 64, 64)
        engine = InferenceEngine(net, InferenceOptions(compile=False, precision="bf16"), name=name)
        plain = InferenceEngine(net, InferenceOptions(compile=False, precision="bf16", fuse_activations=False,
                                                      restructure=False), name=name)
        with torch.no_grad():
            out, ref, f32 = engine(x), plain(x), net(x)
        assert "convolution + activation pairs fused" in engine.status and "restructured" in engine.status
        assert relative_error(out, f32) < 1.5 * relative_error(ref, f32) + 1e-2, name
        assert not any(isinstance(m, dense_blocks.BufferedDenseBlock) for m in engine._copy.net.modules()), name
        if name == "EfficientNetB0":
            assert any(isinstance(m, ConvAct2d) and m.padded for m in engine._copy.net.modules())
        with torch.no_grad():
            first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
            first.weight.mul_(0.5)
            out2, f32_2 = engine(x), net(x)
        assert relative_error(out2, f32_2) < 1.5 * relative_error(ref, f32) + 1e-2, name
        assert relative_error(out2, out) > 1e-3, name  # it followed the change


def test_engine_in_bf16_runs_unfused_when_the_bf16_fused_path_disagrees(monkeypatch, caplog):
    """The bf16 check can fail: a fused op that is right in float32 but wrong under bf16 autocast is undone."""
    import logging

    from lightning_app.engine import InferenceOptions
    from test_engine import zoo_net

    real = ConvAct2d._fused

    def wrong_in_bf16(self, x, weight, bias, reordered):
        out = real(self, x, weight, bias, reordered)
        return out * 1.5 if out.dtype == torch.bfloat16 else out

    monkeypatch.setattr(ConvAct2d, "_fused", wrong_in_bf16)
    net = zoo_net("MobileNetV2", 64)
    engine = InferenceEngine(net, InferenceOptions(compile=False, precision="bf16"), name="MobileNetV2")
    with caplog.at_level(logging.INFO), torch.no_grad():
        engine(torch.rand(2, 3, 64, 64))
    assert "fused" not in engine.status and not any(isinstance(m, ConvAct2d) for m in engine._copy.net.modules())
    assert "in bf16; running them unfused" in caplog.text
