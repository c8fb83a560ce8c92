"""TF-"same" convolutions without a zero-filled copy of the input (lightning_app.same_conv): the padded
convolution's results, no copy where the split is even, and where the engine uses them."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Conv2dSame, pad_same

from lightning_app.conv_fusion import ConvAct2d
from lightning_app.engine import InferenceEngine, InferenceOptions
from lightning_app.same_conv import SameConv2d, padded_conv_operands, replace_same_convs, same_conv_operands
from lightning_app.zoo.families.mobilenet import ZeroPadConv2d

from test_engine import restructured_and_plain


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,stride,dilation", [(3, 2, 1), (5, 2, 1), (7, 2, 1), (3, 1, 1), (1, 2, 1), (3, 2, 2),
                                                    (4, 2, 1)])
@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (9, 12), (16, 15), (2, 3)])
def test_dense_same_conv_gives_the_padded_convolution(hw, kernel, stride, dilation, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 6, *hw)
    w, b = torch.randn(4, 6, kernel, kernel), torch.randn(4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.conv2d(pad_same(x, (kernel, kernel), (stride, stride), (dilation, dilation)), w, b, stride, 0, dilation)
    inp, weight, padding = same_conv_operands(x, w, (stride, stride), (dilation, dilation))
    assert weight is w
    out = F.conv2d(inp, w, b, stride, padding, dilation)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    pads = [pad_same(torch.zeros(1, 1, *hw), (kernel, kernel), (stride, stride), (dilation, dilation)).shape[i] - hw[j]
            for i, j in ((2, 0), (3, 1))]
    if pads[0] % 2 == 0 and pads[1] % 2 == 0:
        assert inp is x  # an even split: the convolution pads implicitly, no copy
    else:
        assert inp.shape[-2:] == (hw[0] + pads[0] % 2, hw[1] + pads[1] % 2)
        assert inp.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("kernel,stride", [(3, 2), (5, 2), (4, 1), (2, 2), (3, 1)])
@pytest.mark.parametrize("hw", [(7, 7), (8, 8), (9, 12), (16, 15), (2, 3)])
def test_depthwise_same_conv_pads_its_kernel_not_its_input(hw, kernel, stride, channels_last):
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 6, *hw), torch.randn(6, 1, kernel, kernel), torch.randn(6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ks, ss = (kernel, kernel), (stride, stride)
    ref = F.conv2d(pad_same(x, ks, ss), w, b, stride, 0, 1, 6)
    inp, weight, padding = same_conv_operands(x, w, ss, (1, 1), 6)
    out = F.conv2d(inp, weight, b, stride, padding, 1, 6)
    assert inp is x and out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    extra = [(pad_same(torch.zeros(1, 1, *hw), ks, ss).shape[i] - hw[i - 2]) % 2 for i in (2, 3)]
    assert tuple(weight.shape[-2:]) == (kernel + extra[0], kernel + extra[1])  # a leading zero tap where uneven
    assert torch.equal(weight[:, :, extra[0]:, extra[1]:], w) and not weight[:, :, :extra[0]].any()
    assert not weight[:, :, :, :extra[1]].any()


@pytest.mark.parametrize("weight_shape,groups,dilation", [((4, 6, 3, 3), 1, 1), ((6, 1, 3, 3), 6, 2),
                                                          ((6, 2, 3, 3), 3, 1)])
def test_other_same_convs_append_the_row_to_their_input(weight_shape, groups, dilation):
    x, w = torch.randn(2, 6, 8, 8), torch.randn(*weight_shape)
    inp, weight, padding = same_conv_operands(x, w, (2, 2), (dilation, dilation), groups)
    assert weight is w and inp.shape[-2:] == (9, 9)  # a zero row and column appended
    ref = F.conv2d(pad_same(x, (3, 3), (2, 2), (dilation, dilation)), w, None, 2, 0, dilation, groups)
    assert torch.allclose(F.conv2d(inp, weight, None, 2, padding, dilation, groups), ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("depthwise", [True, False])
@pytest.mark.parametrize("pads", [((0, 1), (0, 1)), ((1, 0), (1, 0)), ((1, 1), (0, 1)), ((2, 1), (1, 1)),
                                  ((0, 2), (1, 1)), ((0, 0), (0, 0))])
def test_padded_conv_operands_give_the_padded_convolution(pads, depthwise):
    """Fixed pads ((top, bottom), (left, right)): a depthwise convolution takes a zero tap on the side padded less
    (leading or trailing) where the two differ by one; otherwise the input is padded."""
    torch.manual_seed(0)
    (top, bottom), (left, right) = pads
    x = torch.randn(2, 6, 9, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 1, 3, 3) if depthwise else torch.randn(4, 6, 3, 3)
    groups = 6 if depthwise else 1
    ref = F.conv2d(F.pad(x, (left, right, top, bottom)), w, None, 2, 0, 1, groups)
    inp, weight, padding = padded_conv_operands(x, w, pads, (1, 1), groups)
    out = F.conv2d(inp, weight, None, 2, padding, 1, groups)
    assert out.shape == ref.shape and torch.allclose(out, ref, rtol=1e-6, atol=1e-6)
    taps = depthwise and abs(bottom - top) <= 1 and abs(right - left) <= 1
    assert (inp is x) == (taps or (top == bottom and left == right))
    assert (weight is w) == (not taps or (top == bottom and left == right))


def test_zero_pad_convolutions_are_replaced_and_compute_the_same():
    net = nn.Sequential(ZeroPadConv2d(6, 6, 3, stride=2, groups=6), ZeroPadConv2d(6, 4, 3, stride=2)).eval()
    x = torch.randn(2, 6, 12, 13)
    with torch.no_grad():
        ref = net(x)
        assert [n for n, _ in replace_same_convs(net)] == ["0", "1"]
        assert torch.allclose(net(x), ref, rtol=1e-6, atol=1e-6)


def test_same_conv2d_equals_timms_conv2d_same_and_keeps_its_parameters():
    conv = Conv2dSame(8, 8, 5, stride=2, groups=8).eval()
    new = SameConv2d(conv)
    x = torch.randn(3, 8, 20, 21)
    with torch.no_grad():
        assert torch.allclose(new(x), conv(x), rtol=1e-6, atol=1e-6)
    assert new.conv is conv and [p for p in new.parameters()] == [p for p in conv.parameters()]
    xg = x.clone().requires_grad_(True)
    new(xg).sum().backward()
    xr = x.clone().requires_grad_(True)
    conv(xr).sum().backward()
    assert torch.allclose(xg.grad, xr.grad, atol=1e-6)


def test_replace_same_convs_leaves_fused_convolutions_to_their_own_padding():
    net = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), ConvAct2d(Conv2dSame(4, 4, 3, stride=2), nn.ReLU()),
                        nn.Conv2d(4, 4, 3))
    replaced = replace_same_convs(net, skip_inside=(ConvAct2d,))
    assert [n for n, _ in replaced] == ["0"] and isinstance(net[0], SameConv2d)
    assert type(net[1].conv) is Conv2dSame and type(net[2]) is nn.Conv2d
    assert [n for n, _ in replace_same_convs(nn.Sequential(ConvAct2d(Conv2dSame(4, 4, 3, stride=2), nn.ReLU())))] \
        == ["0.conv"]  # without skip_inside it would replace the fused one's too


def test_engine_uses_them_on_nasnet_with_the_same_output():
    _, x, engine, out, out_plain, ref = restructured_and_plain("NASNetMobile")
    # the fused path pads in ConvAct2d (every convolution is one, activation or not); SameConv2d without it
    assert sum(isinstance(m, ConvAct2d) and m.padded for m in engine._copy.net.modules()) == 16
    unfused = InferenceEngine(engine.source, InferenceOptions(compile=False, fuse_activations=False, precision="fp32"))
    with torch.no_grad():
        assert torch.allclose(unfused(x), out_plain, rtol=1e-5, atol=1e-6)
    assert sum(isinstance(m, SameConv2d) for m in unfused._copy.net.modules()) == 16
    assert torch.allclose(out, out_plain, rtol=1e-5, atol=1e-6)
