"""NASNet normal cells written into their output (lightning_app.nasnet_cells): bit-identical to the cells, in both
layouts; the cell itself under autograd; the engine uses them."""
import copy

import pytest
import torch
from timm.models.nasnet import FirstCell, NormalCell

from lightning_app.nasnet_cells import BufferedCell, replace_cells
from lightning_app.zoo import create_backbone

from test_engine import restructured_and_plain


@pytest.fixture(scope="module")
def nasnet():
    torch.manual_seed(0)
    net = create_backbone("NASNetMobile", weights=None, num_classes=0).eval()
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: inputs.setdefault(n, args))
             for n, m in net.named_modules() if type(m) in (NormalCell, FirstCell)]
    with torch.no_grad():
        net(torch.rand(2, 3, 64, 64))
    for h in hooks:
        h.remove()
    return net, inputs


@pytest.mark.parametrize("name", ["cell_0", "cell_1", "cell_4", "cell_11"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_buffered_cell_equals_the_cell(nasnet, name, channels_last):
    net, inputs = nasnet
    cell = net.get_submodule(name)
    x, x_prev = (t.contiguous(memory_format=torch.channels_last) if channels_last else t for t in inputs[name])
    with torch.no_grad():
        ref, out = cell(x, x_prev), BufferedCell(cell)(x, x_prev)
    assert isinstance(cell, FirstCell if name in ("cell_0", "cell_4") else NormalCell)
    assert out.shape == ref.shape and torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_autograd_runs_the_cell(nasnet):
    net, inputs = nasnet
    cell = copy.deepcopy(net.cell_1).requires_grad_(False)
    x, x_prev = (t.clone().requires_grad_(True) for t in inputs["cell_1"])
    BufferedCell(cell)(x, x_prev).square().sum().backward()
    x2, x_prev2 = (t.clone().requires_grad_(True) for t in inputs["cell_1"])
    cell(x2, x_prev2).square().sum().backward()
    assert torch.equal(x.grad, x2.grad) and torch.equal(x_prev.grad, x_prev2.grad)


def test_replaces_normal_and_first_cells_only(nasnet):
    net = copy.deepcopy(nasnet[0])
    names = [n for n, _ in replace_cells(net)]
    assert names == [f"cell_{i}" for i in range(12)]  # not the stem or reduction cells


def test_engine_buffers_nasnet_cells_with_the_same_output():
    _, _, engine, out, out_plain, _ = restructured_and_plain("NASNetMobile")
    assert sum(isinstance(m, BufferedCell) for m in engine._copy.net.modules()) == 12
    assert torch.allclose(out, out_plain, rtol=1e-5, atol=1e-6)
