"""1x1 average pools and the zero padding before them as strided copies (lightning_app.subsample): bit-identical
to pad + pool at every offset, in both layouts, NaN included; what is replaced; the engine uses it on NASNet."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lightning_app.subsample import Subsample, replace_subsamples, subsample

from test_engine import restructured_and_plain


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("pads", [None, (-1, 1, -1, 1), (0, 1, 0, 1), (1, 0, 2, 1), (-2, 0, 1, -1), (3, 3, 3, 3)])
@pytest.mark.parametrize("hw,stride", [((11, 11), 2), ((10, 9), 2), ((7, 8), 3), ((5, 5), 1), ((2, 3), 2)])
def test_subsample_equals_pad_then_one_pixel_average_pool(hw, stride, pads, channels_last):
    torch.manual_seed(0)
    x = torch.randn(2, 5, *hw)
    x[0, 1, 0, 0] = float("nan")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    ref = F.avg_pool2d(F.pad(x, pads) if pads else x, 1, stride)
    out = subsample(x, stride, pads)
    assert out.shape == ref.shape and torch.equal(out.nan_to_num(7.0), ref.nan_to_num(7.0))
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_replaces_one_pixel_pools_and_the_zero_pad_right_before_them():
    path = nn.Sequential(nn.ZeroPad2d((-1, 1, -1, 1)), nn.AvgPool2d(1, stride=2, count_include_pad=False),
                         nn.Conv2d(4, 4, 1))
    net = nn.Sequential(nn.AvgPool2d(1, 2), path, nn.ZeroPad2d(1), nn.Conv2d(4, 4, 3), nn.AvgPool2d(3, 2),
                        nn.AvgPool2d(1, 2, padding=0, ceil_mode=True), nn.ZeroPad2d(1)).eval()
    x = torch.randn(2, 4, 23, 23)
    with torch.no_grad():
        ref = net(x)
        replaced = replace_subsamples(net)
        assert [n for n, _ in replaced] == ["0", "1.0", "1.1"]  # not: a pad before a conv, a 3x3 pool, ceil_mode
        assert type(net[1][0]) is nn.Identity and net[1][1].pads == (-1, 1, -1, 1) and net[0].pads is None
        assert torch.equal(net(x), ref)
    assert isinstance(Subsample(2), nn.Module)


def test_engine_subsamples_nasnet_factorized_reductions_with_the_same_output():
    _, _, engine, out, out_plain, _ = restructured_and_plain("NASNetMobile")
    subs = [m for m in engine._copy.net.modules() if isinstance(m, Subsample)]
    assert len(subs) == 8 and sum(m.pads is not None for m in subs) == 4  # path_1 and path_2 of 4 cells
    assert torch.allclose(out, out_plain, rtol=1e-5, atol=1e-6)
