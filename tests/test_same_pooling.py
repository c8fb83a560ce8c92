"""TF-"same" pooling without the explicit pad (``lightning_app.same_pooling``): equal to the padded pools it replaces
at every parity of size, and used by the engine on Xception and NASNet."""
import pytest
import torch
import torch.nn.functional as F
from timm.layers.padding import pad_same
from timm.layers.pool2d_same import AvgPool2dSame, MaxPool2dSame

from lightning_app.engine import relative_error
from lightning_app.same_pooling import SamePool2d, replace_same_pools, same_pads
from lightning_app.zoo.families.nasnet import ZeroPadMaxPool2d
from test_engine import restructured_and_plain

SIZES = [(8, 8), (9, 9), (10, 11), (11, 10), (7, 12), (2, 3), (1, 1)]


@pytest.mark.parametrize("hw", SIZES)
@pytest.mark.parametrize("kernel,stride", [(3, 2), (3, 1), (2, 2), (5, 2), (2, 1), (4, 1)])
def test_same_pools_equal_the_explicitly_padded_ones(hw, kernel, stride):
    """Every kind, size parity, window and stride (even windows at stride 1 pad after only, which torch's implicit
    padding cannot express: those pad explicitly); 5 channels in channels_last take the separable max path."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, *hw) - 0.5  # many negatives: zero padding wins the max at the border
    x_cl = x.contiguous(memory_format=torch.channels_last)
    k, s = (kernel, kernel), (stride, stride)
    refs = {
        "max -inf": F.max_pool2d(pad_same(x, k, s, value=float("-inf")), k, s),
        "max 0": F.max_pool2d(pad_same(x, k, s, value=0.0), k, s),
        "avg": F.avg_pool2d(pad_same(x, k, s, value=0.0), k, s),
    }
    for inp in (x, x_cl):
        assert torch.equal(SamePool2d("max", k, s)(inp), refs["max -inf"])
        assert torch.equal(SamePool2d("max", k, s, pad_value=0.0)(inp), refs["max 0"])
        out = SamePool2d("avg", k, s)(inp)
        assert out.shape == refs["avg"].shape and torch.allclose(out, refs["avg"], rtol=1e-6, atol=1e-7)
    assert refs["max -inf"].shape[-2:] == tuple(-(-n // stride) for n in hw)  # ceil(H / s): TF's output size


@pytest.mark.parametrize("channels,separable", [(11, True), (22, True), (16, False), (40, False)])
def test_few_channels_last_max_pools_run_separably_and_equal(monkeypatch, channels, separable):
    """channels_last max pools over fewer than MAX_SEPARABLE_CHANNELS channels (not a multiple of 16) run as column
    then row maxima (torch's channels_last kernel fills its vectors poorly there), bit-identical, NaN included;
    other channel counts and NCHW keep torch's pool."""
    from lightning_app import same_pooling

    calls = []
    real = same_pooling.separable_max_pool2d
    monkeypatch.setattr(same_pooling, "separable_max_pool2d", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    x = torch.randn(2, channels, 15, 16) - 0.5
    x[1, 3, 7, 8] = float("nan")
    for pad_value in (0.0, float("-inf")):
        ref = F.max_pool2d(pad_same(x, (3, 3), (2, 2), value=pad_value), 3, 2)
        for inp in (x, x.contiguous(memory_format=torch.channels_last)):
            out = SamePool2d("max", (3, 3), (2, 2), pad_value=pad_value)(inp)
            assert torch.equal(out.nan_to_num(9.0), ref.nan_to_num(9.0)) and torch.equal(out.isnan(), ref.isnan())
            assert out.is_contiguous(memory_format=torch.channels_last) == (inp is not x)
    assert len(calls) == 2 * separable  # channels_last only, once per pad value


def test_zero_padding_wins_the_max_exactly_where_windows_reach_it():
    x = -torch.ones(1, 1, 8, 9)  # pads: rows (0, 1), columns (1, 1)
    out = SamePool2d("max", (3, 3), (2, 2), pad_value=0.0)(x)
    expected = -torch.ones(1, 1, 4, 5)
    expected[..., -1, :] = 0  # the last row of windows reaches the bottom padding
    expected[..., :, 0] = expected[..., :, -1] = 0  # the first and last columns reach the side padding
    assert torch.equal(out, expected)
    assert torch.equal(SamePool2d("max", (3, 3), (2, 2))(x), -torch.ones(1, 1, 4, 5))


def test_same_pads_split_like_tensorflow():
    assert same_pads(8, 3, 2) == (0, 1) and same_pads(9, 3, 2) == (1, 1) and same_pads(8, 3, 1) == (1, 1)
    assert same_pads(147, 3, 2) == (1, 1) and same_pads(74, 3, 2) == (0, 1)


def test_replace_same_pools_finds_the_three_kinds_and_leaves_others():
    net = torch.nn.Sequential(MaxPool2dSame(3, 2), ZeroPadMaxPool2d(3, 2), AvgPool2dSame(3, 2),
                              torch.nn.MaxPool2d(3, 2, 1), MaxPool2dSame(3, 2, dilation=2))
    x = torch.randn(1, 2, 40, 40)
    with torch.no_grad():
        ref = net(x)
    replaced = replace_same_pools(net)
    assert [name for name, _ in replaced] == ["0", "1", "2"]
    assert [m.pad_value if m.kind == "max" else "avg" for m in list(net)[:3]] == [float("-inf"), 0.0, "avg"]
    assert type(net[3]) is torch.nn.MaxPool2d and type(net[4]) is MaxPool2dSame  # symmetric already; dilated
    with torch.no_grad():
        assert relative_error(net(x), ref) <= 1e-6


def test_same_pool_gradients_reach_the_input():
    """The attacks differentiate through the engine: the input gradient equals the padded pool's."""
    x = torch.randn(1, 3, 9, 8, requires_grad=True)
    ref_pool, pool = ZeroPadMaxPool2d(3, 2), SamePool2d("max", (3, 3), (2, 2), pad_value=0.0)
    (g_ref,) = torch.autograd.grad(ref_pool(x).sum(), x)
    (g,) = torch.autograd.grad(pool(x).sum(), x)
    assert torch.equal(g, g_ref)


@pytest.mark.parametrize("name,count", [("Xception", 4), ("NASNetMobile", 12)])
def test_engine_pools_without_padding(name, count):
    _, _, engine, out, out_plain, ref = restructured_and_plain(name)
    pools = [m for m in engine._copy.net.modules() if isinstance(m, SamePool2d)]
    assert len(pools) == count
    assert relative_error(out, ref) <= 1e-4 and relative_error(out, out_plain) <= 1e-5
