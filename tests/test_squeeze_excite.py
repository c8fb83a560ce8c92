"""Squeeze-and-excitation gates applied in place (lightning_app.squeeze_excite): the module's own numbers, only
where nothing reads the gated input afterwards, the module's own forward under autograd, and the engine uses it."""
import copy

import torch
import torch.nn as nn
from timm.models._efficientnet_blocks import SqueezeExcite

from lightning_app.squeeze_excite import InPlaceSqueezeExcite, replace_squeeze_excite

from test_engine import restructured_and_plain


class Block(nn.Module):
    """conv -> SE -> conv; ``reuse``: the SE's input is read again after it (its output is added to it)."""

    def __init__(self, reuse: bool = False) -> None:
        super().__init__()
        self.conv, self.se, self.proj, self.reuse = nn.Conv2d(4, 8, 3, padding=1), SqueezeExcite(8), nn.Conv2d(8, 4, 1), reuse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        z = self.se(y)
        return self.proj(z + y if self.reuse else z)


def _net(reuse: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(Block(), Block(reuse)).eval()


def test_in_place_gate_gives_the_modules_output_in_its_input():
    se = SqueezeExcite(8).eval()
    x = torch.randn(3, 8, 5, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = se(x.clone())
        inp = x.clone()
        out = InPlaceSqueezeExcite(se)(inp)
    assert torch.equal(out, ref) and out.data_ptr() == inp.data_ptr()


def test_only_modules_whose_input_is_not_read_afterwards_are_replaced():
    net, x = _net(reuse=True), torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        ref = net(x)
        replaced = replace_squeeze_excite(net, x[:1])
        assert [n for n, _ in replaced] == ["0.se"]  # "1.se"'s input is added to its output
        assert isinstance(net[0].se, InPlaceSqueezeExcite) and type(net[1].se) is SqueezeExcite
        assert torch.equal(net(x), ref)


def test_autograd_runs_the_modules_own_forward():
    net, x = _net(), torch.randn(2, 4, 7, 7)
    plain = copy.deepcopy(net)
    replace_squeeze_excite(net, x[:1])
    assert isinstance(net[1].se, InPlaceSqueezeExcite)
    for p in list(net.parameters()) + list(plain.parameters()):
        p.requires_grad_(False)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    net(xa).square().sum().backward()
    plain(xb).square().sum().backward()
    assert torch.allclose(xa.grad, xb.grad, rtol=1e-6, atol=1e-7)
    leaf = torch.randn(2, 8, 5, 5, requires_grad=True)  # scaling a leaf in place is an autograd error
    InPlaceSqueezeExcite(net[1].se.se)(leaf).sum().backward()
    assert leaf.grad is not None


def test_engine_gates_efficientnet_in_place_with_the_same_output():
    _, _, engine, out, out_plain, _ = restructured_and_plain("EfficientNetB0")
    assert sum(isinstance(m, InPlaceSqueezeExcite) for m in engine._copy.net.modules()) == 16
    assert torch.equal(out, out_plain)
