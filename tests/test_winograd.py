"""NNPACK's Winograd 3x3 convolutions in the inference engine (lightning_app.winograd): the same results as the
direct convolution, used only where they apply (layers, share of the work, batch size, eager float32 on the CPU),
and put back when they would change the output."""
import logging
from unittest import mock

import pytest
import torch
import torch.nn as nn

from lightning_app import winograd
from lightning_app.conv_fusion import ConvAct2d
from lightning_app.engine import InferenceEngine, InferenceOptions, relative_error
from lightning_app.winograd import WinogradConv2d, apply_winograd, undo_winograd, winograd_layers, winograd_plan
from lightning_app.zoo import get_entry

from test_engine import zoo_net

pytestmark = pytest.mark.skipif(not winograd.available(), reason="NNPACK's Winograd path needs an AVX2 CPU with NNPACK")

FP32 = InferenceOptions(precision="fp32", compile=False)


def _counting():
    """``torch._nnpack_spatial_convolution`` patched to count its calls (the real op still runs)."""
    return mock.patch.object(torch, "_nnpack_spatial_convolution", wraps=torch._nnpack_spatial_convolution)


def _conv(cin, cout, padding=1):
    torch.manual_seed(cin + cout + padding)
    conv = nn.Conv2d(cin, cout, 3, padding=padding).eval().requires_grad_(False)
    with torch.no_grad():
        conv.bias.normal_()
    return conv


@pytest.mark.parametrize("batch,cin,cout,size,padding,relu", [
    (8, 16, 24, 28, 1, False), (9, 32, 16, 33, 1, True), (16, 24, 40, 30, 0, True), (8, 64, 64, 29, 1, False)])
def test_winograd_conv_equals_the_direct_convolution(batch, cin, cout, size, padding, relu):
    conv = _conv(cin, cout, padding)
    inner = ConvAct2d(conv, nn.ReLU()) if relu else conv
    layer = WinogradConv2d(inner)
    x = torch.randn(batch, cin, size, size)
    ref = torch.relu(conv(x)) if relu else conv(x)
    with _counting() as nnpack, torch.no_grad():
        out = layer(x)
        out_cl = layer(x.contiguous(memory_format=torch.channels_last))
    assert nnpack.call_count == 2
    assert out.shape == ref.shape and out.is_contiguous()
    assert relative_error(out, ref) <= 1e-5 and torch.equal(out, out_cl)
    if relu:
        assert out.min() == 0


def test_winograd_conv_runs_the_direct_convolution_where_nnpack_does_not_apply():
    conv = _conv(16, 16)
    layer = WinogradConv2d(ConvAct2d(conv, nn.ReLU()))
    x = torch.randn(8, 16, 28, 28)
    with _counting() as nnpack:
        with torch.no_grad():
            small = layer(x[: winograd.MIN_BATCH - 1])  # a batch below MIN_BATCH
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = layer(x)
        conv.weight.requires_grad_(True)  # training the weights: PyTorch's own convolution
        trained = layer(x)
        trained.sum().backward()
        conv.weight.requires_grad_(False)
    assert nnpack.call_count == 0
    assert torch.equal(small, torch.relu(conv(x[: winograd.MIN_BATCH - 1])))
    assert bf16.dtype == torch.bfloat16 and conv.weight.grad is not None


def test_winograd_conv_gives_the_attacks_the_direct_convolutions_input_gradient():
    conv = _conv(16, 24)
    layer = WinogradConv2d(ConvAct2d(conv, nn.ReLU()))
    x = torch.randn(8, 16, 28, 28)
    xg = x.clone().requires_grad_(True)
    with _counting() as nnpack:
        (layer(xg) * torch.linspace(-1, 1, 24).view(1, -1, 1, 1)).sum().backward()
    assert nnpack.call_count == 1  # the forward runs NNPACK; autograd differentiates it as a convolution
    xr = x.clone().requires_grad_(True)
    (torch.relu(conv(xr)) * torch.linspace(-1, 1, 24).view(1, -1, 1, 1)).sum().backward()
    assert relative_error(xg.grad, xr.grad) <= 1e-5


class _Toy(nn.Module):
    """One layer of each kind: only ``big`` is NNPACK's (3x3, stride 1, dense, >= 16 channels in, >= 28 px out)."""

    def __init__(self, big_channels=32, tail_channels=16):
        super().__init__()
        c, t = big_channels, tail_channels
        self.rgb = nn.Conv2d(3, 16, 3, padding=1)              # 3 channels in: stays direct
        self.big = ConvAct2d(nn.Conv2d(16, c, 3, padding=1), nn.ReLU())
        self.depthwise = nn.Conv2d(c, c, 3, padding=1, groups=c)
        self.strided = nn.Conv2d(c, t, 3, stride=2, padding=1)  # 30 -> 15 px
        self.small = nn.Conv2d(t, t, 3, padding=1)              # 15 px out
        self.pointwise = nn.Conv2d(t, 8, 1)

    def forward(self, x):
        x = self.depthwise(self.big(self.rgb(x)))
        return self.pointwise(self.small(self.strided(x)))


def _macs(h, cout, cin, k):
    return h * h * cout * cin * k * k


def test_winograd_layers_are_the_large_3x3_convolutions_and_their_share():
    net = _Toy().eval()
    chosen, share = winograd_layers(net, torch.rand(1, 3, 30, 30))
    assert chosen == ["big"]
    macs = {"rgb": _macs(30, 16, 3, 3), "big": _macs(30, 32, 16, 3), "depthwise": _macs(30, 32, 1, 3),
            "strided": _macs(15, 16, 32, 3), "small": _macs(15, 16, 16, 3), "pointwise": _macs(15, 8, 16, 1)}
    assert share == pytest.approx(macs["big"] / sum(macs.values()))
    assert winograd_layers(net, torch.rand(1, 3, 26, 26))[0] == []  # 26 px < MIN_SIZE


def test_apply_winograd_changes_a_network_only_above_the_share_and_can_be_undone():
    x = torch.rand(1, 3, 30, 30)
    below = _Toy(big_channels=32, tail_channels=128).eval().to(memory_format=torch.channels_last)
    assert winograd_layers(below, x)[1] < winograd.MIN_SHARE
    assert winograd_plan(below, x) == [] and apply_winograd(below, []) == []
    assert below.big.conv.weight.is_contiguous(memory_format=torch.channels_last)

    above = _Toy(big_channels=256).eval().to(memory_format=torch.channels_last)
    assert winograd_layers(above, x)[1] >= winograd.MIN_SHARE
    big, weight = above.big, above.big.conv.weight
    replaced = apply_winograd(above, winograd_plan(above, x))
    assert [n for n, _ in replaced] == ["big"] and isinstance(above.big, WinogradConv2d)
    assert above.big.conv.weight is weight and weight.is_contiguous()  # the same Parameter, now NCHW
    undo_winograd(above, replaced, channels_last=True)
    assert above.big is big and weight.is_contiguous(memory_format=torch.channels_last)


def _engines(size=112, batch=8, name="VGG16"):
    net = zoo_net(name, size)
    x = torch.rand(batch, 3, size, size)
    on = InferenceEngine(net, FP32, name=name)
    off = InferenceEngine(net, InferenceOptions(precision="fp32", compile=False, winograd=False), name=name)
    return net, x, on, off


@pytest.mark.parametrize("name", ["VGG16", "VGG19"])
def test_engine_runs_the_vggs_through_winograd_convolutions_in_nchw_at_native_size(name):
    net, x, on, off = _engines(get_entry(name).input_size, name=name)
    with _counting() as nnpack, torch.no_grad():
        out = on(x)
        calls_at_build = nnpack.call_count
        on(x)
    assert "Winograd" in on.status and "Winograd" not in off.status
    n = sum(isinstance(m, WinogradConv2d) for m in on._copy.net.modules())
    assert n == int(on.status.split(" convolutions Winograd")[0].rsplit(" ", 1)[-1]) >= 4
    assert nnpack.call_count - calls_at_build == n  # every replaced layer ran NNPACK on the batch
    with torch.no_grad():
        plain, ref = off(x), net(x)
    assert relative_error(out, plain) <= 1e-4 and relative_error(out, ref) <= 1e-4
    # its compile='auto' decision: eager, however long the run
    on.planned_batches = 10 ** 6
    assert "Winograd" in on._compile_decision(torch.device("cpu"), 1.0)
    # follows a change of the source's weights (the NCHW copy is refreshed in place)
    with torch.no_grad():
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.in_channels >= 64)
        first.weight.mul_(1.5)
        assert relative_error(on(x), off(x)) <= 1e-4 and relative_error(on(x), out) > 1e-3


def test_engine_keeps_direct_convolutions_for_small_batches_other_networks_and_bf16():
    _, x, on, _ = _engines(batch=winograd.MIN_BATCH - 1)
    with torch.no_grad():
        on(x)
    assert "Winograd" not in on.status and on._channels_last
    resnet = InferenceEngine(zoo_net("ResNet50", 112), FP32, name="ResNet50")
    bf16 = InferenceEngine(zoo_net("VGG16", 112), InferenceOptions(precision="bf16", compile=False), name="VGG16")
    with torch.no_grad():
        resnet(torch.rand(8, 3, 112, 112)), bf16(torch.rand(8, 3, 112, 112))
    assert "Winograd" not in resnet.status and "Winograd" not in bf16.status


def test_engine_puts_the_direct_convolutions_back_when_winograd_changes_the_output(caplog):
    net, x, on, off = _engines()
    wrong = lambda x, w, b, padding: torch.nn.functional.conv2d(x, w, b, padding=padding) * 1.01  # noqa: E731
    with mock.patch.object(torch, "_nnpack_spatial_convolution", wrong), torch.no_grad(), \
            caplog.at_level(logging.INFO):
        out = on(x)
    assert "Winograd" not in on.status and on._channels_last
    assert not any(isinstance(m, WinogradConv2d) for m in on._copy.net.modules())
    assert "Winograd convolutions changed VGG16's output" in caplog.text
    with torch.no_grad():
        assert relative_error(out, off(x)) <= 1e-5
