"""A ResNet bottleneck's last convolution + residual add + activation as one oneDNN call:
:mod:`lightning_app.residual_fusion`."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from lightning_app import conv_fusion, residual_fusion
from lightning_app.engine import InferenceEngine, InferenceOptions, fold_batchnorm
from lightning_app.residual_fusion import FusedBottleneck, fusable_bottleneck, fuse_residual_blocks
from lightning_app.zoo import create_backbone

pytestmark = pytest.mark.skipif(not conv_fusion.available(), reason="this PyTorch build has no fused oneDNN op")


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = residual_fusion.conv_add_act_

    def spy(*args, **kwargs):
        calls.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(residual_fusion, "conv_add_act_", spy)
    return calls


def _backbone(name: str = "ResNet50") -> nn.Module:
    torch.manual_seed(0)
    net = create_backbone(name, weights=None, num_classes=0).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net


@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_blocks_equal_the_folded_network(fused_calls, channels_last):
    """Every bottleneck of a folded ResNet50 (4 with a projection shortcut, 12 with the identity) fuses; the output
    is bit-identical to the unfused folded copy's and each block runs one fused call. Called on its own, an
    identity block writes its output over its input."""
    net = _backbone()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=fmt)
    folded = fold_batchnorm(net, x[:1], channels_last=channels_last)
    with torch.no_grad():
        ref = folded(x)
        block_in = torch.randn(2, 256, 16, 16).contiguous(memory_format=fmt)
        block_ref = folded.layer1[1](block_in.clone())
        replaced = fuse_residual_blocks(folded, x[:1])
        assert len(replaced) == 16 and sum(isinstance(m, FusedBottleneck) for m in folded.modules()) == 16
        out = folded(x)
        block_out = folded.layer1[1](block_in)
    assert fused_calls == ["relu"] * 17
    assert torch.equal(out, ref)
    assert block_out.data_ptr() == block_in.data_ptr() and torch.equal(block_out, block_ref)


class _ReadsBlockInputAfter(nn.Module):
    """A bottleneck whose input is read again after it: it must not be overwritten."""

    def __init__(self, stem: nn.Module, block: nn.Module) -> None:
        super().__init__()
        self.stem, self.block = stem, block

    def forward(self, x):
        h = self.stem(x)
        return self.block(h) + h


def test_identity_blocks_whose_input_is_read_later_are_left_alone(fused_calls):
    folded = fold_batchnorm(_backbone(), torch.randn(1, 3, 64, 64))
    stem = nn.Conv2d(3, 256, 3, padding=1).eval().requires_grad_(False)
    net = _ReadsBlockInputAfter(stem, folded.layer1[1])
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        ref = net(x)
        assert fuse_residual_blocks(net, x[:1]) == []
        direct = nn.Sequential(folded.layer1[1])  # the network's own input is never overwritten
        assert fuse_residual_blocks(direct, torch.randn(1, 256, 8, 8)) == []
        torch.testing.assert_close(net(x), ref, rtol=0, atol=0)
    assert fused_calls == []


def test_only_folded_plain_bottlenecks_fuse(fused_calls):
    net = _backbone()
    assert not any(fusable_bottleneck(m) for m in net.modules())  # BatchNorm not folded: bn3 is still there
    folded = fold_batchnorm(net, torch.randn(1, 3, 64, 64))
    block = folded.layer2[0]
    assert fusable_bottleneck(block) and fusable_bottleneck(folded.layer2[1])
    block.act3 = nn.SiLU()  # oneDNN takes only a ReLU after the add
    assert not fusable_bottleneck(block)


def test_falls_back_to_the_blocks_forward_with_gradients(fused_calls):
    net = _backbone()
    folded = fold_batchnorm(net, torch.randn(1, 3, 64, 64))
    block = folded.layer3[0]
    fused = FusedBottleneck(block)
    x = torch.randn(2, 512, 8, 8, requires_grad=True)
    fused(x).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    block(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x.detach())
    assert fused_calls == []
    with torch.no_grad():
        fused(x.detach().clone())  # eval (the block's mode): fused
        fused.train()  # training mode (drop-path, BatchNorm statistics): the block's own forward
        fused(x.detach().clone())
    assert fused_calls == ["relu"]


@pytest.mark.parametrize("name, attr", [("ResNet50", "relu"), ("ResNet50V2", None)])
def test_engine_fuses_resnet_blocks(fused_calls, name, attr):
    """Through the engine: ResNet50's 16 bottlenecks with their ReLU, and Keras ResNetV2's 16 blocks without an
    activation after the add (projection, strided max-pool and identity shortcuts)."""
    net = _backbone(name)
    engine = InferenceEngine(net, InferenceOptions(compile=False, precision="fp32"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = net(x)
        engine(x)
        fused_calls.clear()
        out = engine(x)
    assert "16 residual adds fused" in engine.status
    assert fused_calls == [attr] * 16
    assert (out - ref).abs().max() <= 1e-4 * ref.abs().max()
    blocks = [m for m in engine._copy.net.modules() if isinstance(m, FusedBottleneck)]
    assert all(any(s[0] == 2 for s in b.reordered._packed) for b in blocks)  # conv3's weight reordered once
    with torch.no_grad():  # a last convolution changes in the source: the engine follows it
        next(m for m in net.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)
             and m.out_channels == 2048 and m.in_channels == 512).weight.mul_(-3.0)
        ref2, out2 = net(x), engine(x)
    assert (ref2 - ref).abs().max() > 1e-3 * ref.abs().max()
    assert (out2 - ref2).abs().max() <= 1e-4 * ref2.abs().max()
