"""DenseNet blocks restructured for the engine's eager CPU path (``lightning_app.dense_blocks``): same outputs, no
per-layer concatenation, transitions pooling first, and the engine using it only where it holds."""
import copy

import pytest
import torch
import torch.nn as nn
from timm.models.densenet import DenseBlock, DenseTransition

from lightning_app import conv_fusion, dense_blocks
from lightning_app.dense_blocks import (BatchNormAffine, BufferedDenseBlock, pool_before_pointwise_conv,
                                        restructure_dense_blocks)
from lightning_app.engine import InferenceEngine, InferenceOptions, relative_error
from test_engine import restructured_and_plain, zoo_net

FP32 = InferenceOptions(precision="fp32", compile=False)


def _block(layers: int = 4, channels: int = 16, growth: int = 8) -> DenseBlock:
    torch.manual_seed(0)
    block = DenseBlock(layers, channels, bn_size=2, growth_rate=growth)
    with torch.no_grad():  # BatchNorm statistics and affines away from their identity defaults
        for m in block.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return block.eval()


def _no_cat(fn):
    """Run ``fn`` and return its result and the number of ``torch.cat`` calls it made."""
    calls = []
    real = torch.cat

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    torch.cat = counting
    try:
        return fn(), len(calls)
    finally:
        torch.cat = real


@pytest.mark.parametrize("channels_last", [False, True])
def test_buffered_block_equals_the_block_without_concatenating(channels_last):
    block = _block()
    x = torch.randn(2, 16, 9, 7)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    buffered = BufferedDenseBlock(block)
    with torch.no_grad():
        ref, cats = _no_cat(lambda: block(x))
        out, buffered_cats = _no_cat(lambda: buffered(x))
    assert cats == 5 and buffered_cats == 0  # the block concatenates before every layer and at the end
    assert out.shape == ref.shape == (2, 16 + 4 * 8, 9, 7)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert relative_error(out, ref) <= 1e-6


def test_buffered_block_runs_the_block_where_gradients_are_wanted():
    """The attacks differentiate through the engine: the input gradient is the block's own."""
    block = _block().requires_grad_(False)
    buffered = BufferedDenseBlock(block)
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    (g_ref,) = torch.autograd.grad(block(x).square().sum(), x)
    out, cats = _no_cat(lambda: buffered(x))
    (g,) = torch.autograd.grad(out.square().sum(), x)
    assert cats == 5 and torch.equal(g, g_ref)


def test_batchnorm_affine_follows_in_place_changes():
    """The engine refreshes its copy in place (optimizer steps, load_state_dict): the affine is recomputed."""
    bn = _block().denselayer1.norm1
    affine = BatchNormAffine(bn)
    x = torch.randn(2, 16, 4, 4)
    ref = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert relative_error(affine(x), ref) <= 1e-6
    with torch.no_grad():
        bn.running_var.mul_(4.0)
        bn.bias.add_(1.0)
    ref = nn.functional.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    assert relative_error(affine(x), ref) <= 1e-6


def test_pool_before_pointwise_conv_swaps_only_pairs_that_commute():
    torch.manual_seed(0)
    transition = DenseTransition(16, 8).eval()
    x = torch.randn(2, 16, 10, 7)  # odd width: the pool drops the last column either way
    swapped = pool_before_pointwise_conv(transition)
    assert [type(m) for m in swapped] == [type(transition.norm), nn.AvgPool2d, nn.Conv2d]
    with torch.no_grad():
        assert relative_error(swapped(x), transition(x)) <= 1e-6
    assert swapped.conv is transition.conv  # the same module: the engine's refresh still reaches it
    conv = nn.Conv2d(4, 4, 1)
    for seq in (nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.AvgPool2d(2)),  # a spatial convolution
                nn.Sequential(nn.Conv2d(4, 4, 1, stride=2), nn.AvgPool2d(2)),  # strided: different pixels
                nn.Sequential(conv, nn.AvgPool2d(2, padding=1)),  # zero padding is not averaged through conv
                nn.Sequential(conv, nn.AvgPool2d(2, divisor_override=3)),  # weights no longer sum to one
                nn.Sequential(conv, nn.ReLU(), nn.AvgPool2d(2))):  # not adjacent
        assert pool_before_pointwise_conv(seq) is None, seq


def test_restructure_dense_blocks_on_densenet121_and_undo():
    net = zoo_net("DenseNet121", 64).eval()
    x = torch.rand(2, 3, 64, 64)
    work = copy.deepcopy(net)
    with torch.no_grad():
        ref = net(x)
        replaced = restructure_dense_blocks(work)
        out, cats = _no_cat(lambda: work(x))
    kinds = sorted(type(original).__name__ for _, original in replaced)
    assert kinds == ["DenseBlock"] * 4 + ["DenseTransition"] * 3
    assert cats == 0 and relative_error(out, ref) <= 1e-5
    for name, original in replaced:
        work.set_submodule(name, original)
    assert not any(isinstance(m, BufferedDenseBlock) for m in work.modules())
    with torch.no_grad():
        assert torch.equal(work(x), ref)


def test_engine_restructures_densenet_on_the_cpu_in_float32_and_stays_fresh():
    net = zoo_net("DenseNet121", 64)
    x = torch.rand(2, 3, 64, 64)
    engine = InferenceEngine(net, FP32, name="DenseNet121")
    plain = InferenceEngine(net, InferenceOptions(precision="fp32", compile=False, restructure=False))
    with torch.no_grad():
        ref, out_plain = net(x), plain(x)
        engine(x)  # built on the first call
        out, cats = _no_cat(lambda: engine(x))
    assert cats == 0  # the restructured blocks are what runs
    assert "7 modules restructured" in engine.status
    assert "restructured" not in plain.status
    assert any(isinstance(m, BufferedDenseBlock) for m in engine._copy.net.modules())
    assert relative_error(out, ref) <= 1e-4 and relative_error(out_plain, ref) <= 1e-4
    with torch.no_grad():  # a first BatchNorm of a dense layer changes in the source (fine-tuning, a new checkpoint)
        bn = net.backbone.features.denseblock2.denselayer3.norm1
        bn.running_var.mul_(3.0)
        bn.weight.mul_(-1.0)
        ref2, out2 = net(x), engine(x)
    assert relative_error(ref2, ref) > 1e-3  # the change matters ...
    assert relative_error(out2, ref2) <= 1e-4  # ... and the engine follows it


def test_engine_puts_the_blocks_back_when_restructuring_changes_the_output(monkeypatch):
    def broken(net, buffers=True):
        replaced = restructure_dense_blocks(net, buffers)
        for m in net.modules():
            if isinstance(m, BufferedDenseBlock):
                m.forward = lambda x, m=m: BufferedDenseBlock.forward(m, x) * 1.01
        return replaced

    monkeypatch.setattr(dense_blocks, "restructure_dense_blocks", broken)
    net = zoo_net("DenseNet121", 64)
    x = torch.rand(2, 3, 64, 64)
    engine = InferenceEngine(net, FP32, name="DenseNet121")
    with torch.no_grad():
        ref, out = net(x), engine(x)
    assert "restructured" not in engine.status
    assert not any(isinstance(m, BufferedDenseBlock) for m in engine._copy.net.modules())
    assert relative_error(out, ref) <= 1e-4


def test_engine_only_pools_first_where_it_does_not_run_float32_eagerly_on_the_cpu():
    """bf16 (as on a GPU, where the engine compiles: inductor plans the concatenations itself; on a CPU the float32
    buffer would cast every bf16 layer output) keeps the blocks and still pools before the transitions'
    convolutions, which saves multiply-adds compiled or not."""
    _, _, engine, out, out_plain, ref = restructured_and_plain("DenseNet121", "bf16")
    assert "3 modules restructured" in engine.status
    copy_net = engine._copy.net
    assert not any(isinstance(m, BufferedDenseBlock) for m in copy_net.modules())
    # the convolution wrapped for oneDNN's bf16 call with its weight cast and reordered once on the CPU
    conv = "ConvAct2d" if conv_fusion.available() else "Conv2d"
    assert [type(m).__name__ for m in copy_net.backbone.features.transition1] == ["BatchNormAct2d", "AvgPool2d", conv]
    # no further from float32 than bf16 without the swap (the engine's rule for two bf16 paths)
    assert relative_error(out, ref) <= 1.5 * relative_error(out_plain, ref) + 1e-3
