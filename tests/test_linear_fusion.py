"""Linear layers (+ the activation that alone reads them) as one oneDNN call: :mod:`lightning_app.linear_fusion`."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers.activations import GELU as TimmGELU, GELUTanh as TimmGELUTanh

from lightning_app import linear_fusion
from lightning_app.engine import InferenceEngine, InferenceOptions
from lightning_app.linear_fusion import LinearAct, find_linear_act_pairs, fuse_linears
from lightning_app.zoo import create_backbone

pytestmark = pytest.mark.skipif(not linear_fusion.available(), reason="this PyTorch build has no oneDNN linear op")


@pytest.fixture
def onednn_calls(monkeypatch):
    """Records the post-op of every oneDNN linear call."""
    calls = []
    real = linear_fusion.linear

    def spy(*args, **kwargs):
        calls.append(args[3] if len(args) > 3 else kwargs.get("attr", "none"))
        return real(*args, **kwargs)

    monkeypatch.setattr(linear_fusion, "linear", spy)
    return calls


ACTS = [nn.ReLU(), nn.ReLU6(), nn.Hardtanh(-0.5, 2.0), nn.GELU(), nn.GELU(approximate="tanh"), TimmGELU(),
        TimmGELUTanh(), nn.SiLU(), nn.Hardswish(), nn.Sigmoid(), None]


@pytest.mark.parametrize("act", ACTS, ids=lambda a: type(a).__name__ + getattr(a, "approximate", ""))
@pytest.mark.parametrize("shape", [(37, 48), (2, 5, 7, 48)], ids=["2d", "4d"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_act_equals_the_unfused_layers(onednn_calls, act, shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24, bias=bias)
    x = torch.randn(*shape)
    with torch.no_grad():
        ref = act(lin(x)) if act is not None else lin(x)
        out = LinearAct(lin, act)(x)
    assert onednn_calls == [LinearAct(lin, act).attr]
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_linear_act_falls_back_where_the_op_does_not_apply(onednn_calls):
    torch.manual_seed(0)
    lin, act = nn.Linear(16, 8), nn.GELU()
    fused = LinearAct(lin, act)
    x = torch.randn(4, 16, requires_grad=True)
    out = fused(x)  # input gradient: autograd through the plain layers
    out.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    act(lin(x2)).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x.detach())
    with torch.no_grad():
        fused.to(torch.bfloat16)(x.detach().bfloat16())
    assert onednn_calls == []


class _Mlp(nn.Module):
    """fc1 -> GELU (sole reader: fused); fc2 -> ReLU whose input is also read by the skip (not fused)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1, self.fc2, self.act2 = nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12), nn.ReLU()

    def forward(self, x):
        y = self.fc2(self.act1(self.fc1(x)))
        return self.act2(y) + y


def test_fuse_linears_takes_only_sole_reader_activations(onednn_calls):
    torch.manual_seed(0)
    net, x = _Mlp().eval(), torch.randn(3, 12)
    assert find_linear_act_pairs(net, x) == [("fc1", "act1")]
    with torch.no_grad():
        ref = net(x)
        assert fuse_linears(net, x) == 2
        out = net(x)
    assert isinstance(net.fc1, LinearAct) and net.fc1.attr == "gelu" and isinstance(net.act1, nn.Identity)
    assert isinstance(net.fc2, LinearAct) and net.fc2.attr == "none" and isinstance(net.act2, nn.ReLU)
    assert onednn_calls[-2:] == ["gelu", "none"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_calibration_is_a_cached_bool_and_leaves_the_global_stream_alone():
    linear_fusion.onednn_linear_faster.cache_clear()
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    faster = linear_fusion.onednn_linear_faster()
    assert isinstance(faster, bool)
    assert torch.equal(torch.rand(4), expected)
    assert linear_fusion.onednn_linear_faster.cache_info().hits == 0
    assert linear_fusion.onednn_linear_faster() is faster
    assert linear_fusion.onednn_linear_faster.cache_info().hits == 1


@pytest.mark.parametrize("faster", [True, False])
def test_engine_runs_convnext_linears_on_onednn_where_faster(monkeypatch, onednn_calls, faster):
    """ConvNeXtTiny's 36 MLP Linears go to oneDNN, fc1 with its GELU, where the calibration says so; the
    output stays within the fold tolerance of the network's, and a source weight change is followed."""
    monkeypatch.setattr(linear_fusion, "onednn_linear_faster", lambda: faster)
    torch.manual_seed(0)
    net = create_backbone("ConvNeXtTiny", weights=None, num_classes=0).eval()
    with torch.no_grad():  # layer scale at 1 instead of its 1e-6 init: the MLPs' outputs count
        for name, p in net.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
    n_lin = sum(type(m) is nn.Linear for m in net.modules())
    engine = InferenceEngine(net, InferenceOptions(compile=False, precision="fp32"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        engine(x)  # builds (its checks run the copy too)
        onednn_calls.clear()
        out = engine(x)
    assert (f"{n_lin} linear layers on oneDNN" in engine.status) is faster
    assert len(onednn_calls) == n_lin * faster
    assert onednn_calls.count("gelu") == n_lin // 2 * faster
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    lin = next(m for m in net.modules() if type(m) is nn.Linear)
    with torch.no_grad():
        lin.weight.mul_(1.5)
        ref2 = net(x)
        out2 = engine(x)
    assert (ref2 - ref).abs().max() > 1e-3 * ref.abs().max()
    assert (out2 - ref2).abs().max() <= 1e-4 * ref2.abs().max()

