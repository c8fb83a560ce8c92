"""The inference engine on CUDA (skipped, and reported as skipped, without a GPU): every zoo model at its native size
through the engine's float32 path agrees with float32 eager to 1e-4; the shipped default (bf16, compiled, CUDA
graphs) for one model per family; float32 compiled; fine-tuned weights never served stale by a CUDA-graph engine.
"""
import pytest
import torch

from lightning_app.engine import InferenceEngine, relative_error
from lightning_app.zoo import get_entry, list_models
from test_engine import check_bf16_against_autocast, check_fp32_engine, family_smallest, parity_photos, zoo_net
from test_gpu import exact_fp32  # noqa: F401  (autouse: the float32 reference without TF32)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name", list_models())
def test_fp32_engine_on_cuda_at_native_size(name):
    """Every zoo model at its native size: the engine's float32 path (folded, channels_last, no TF32) against plain
    float32 eager, max relative error <= 1e-4."""
    size = get_entry(name).input_size
    net = zoo_net(name, size).cuda()
    x = parity_photos(size, 2).cuda()
    with torch.no_grad():
        ref = net(x)
        out = InferenceEngine(net, {"precision": "fp32", "compile": False}, name=name)(x)
    check_fp32_engine(name, size, net, x, out, ref)


@pytest.mark.parametrize("name", sorted(set(family_smallest().values())))
def test_default_engine_on_cuda_agrees_with_fp32_eager(name):
    """The shipped default on CUDA (bf16 autocast, compiled, CUDA graphs), one model per family (each compilation
    costs about a minute): no more error than bf16 autocast of the plain module and of equivalent copies (plus
    half; test_engine.check_bf16_against_autocast), and clear top-1 classes kept (see
    test_engine.test_bf16_engine_adds_no_error_to_bf16_autocast for why the bound is relative)."""
    size = get_entry(name).input_size
    net = zoo_net(name, size, top=True).cuda()
    x = parity_photos(size).cuda()
    with torch.no_grad():
        ref = net(x)
        eager = InferenceEngine(net, {"precision": "bf16", "compile": False}, name=name)(x)  # folded, channels_last
        engine = InferenceEngine(net, name=name)  # the shipped default: bf16, compiled, CUDA graphs
        out = engine(x)
        again = engine(x[:3])  # padded to the compiled batch
    assert engine._compile_state == "compiled", engine.status
    print(check_bf16_against_autocast(name, out, net, x, ref,
                                      f"; engine uncompiled (folded, channels_last) {relative_error(eager, ref):.2e}"))
    assert relative_error(again, out[:3]) <= 1e-2


@pytest.mark.parametrize("name", ["ResNet50", "InceptionResNetV2"])
def test_fp32_compiled_engine_on_cuda(name):
    size = get_entry(name).input_size
    net = zoo_net(name, size).cuda()
    x = parity_photos(size, 2).cuda()
    engine = InferenceEngine(net, {"precision": "fp32", "compile": True}, name=name)
    with torch.no_grad():
        ref = net(x)
        out = engine(x)
    assert engine._compile_state == "compiled", engine.status
    assert relative_error(out, ref) <= 1e-4


def test_cuda_graph_engine_serves_updated_weights():
    net = zoo_net("ResNet50", 64).cuda()
    x = torch.rand(8, 3, 64, 64, device="cuda")
    engine = InferenceEngine(net, {"precision": "fp32", "compile": True, "mode": "reduce-overhead"}, name="ResNet50")
    with torch.no_grad():
        for _ in range(3):  # warm-up, recording, replay
            before = engine(x)
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    net.train()
    net(x).square().mean().backward()
    opt.step()
    net.eval()
    with torch.no_grad():
        ref = net(x)
        after = engine(x)
    assert relative_error(ref, before) > 1e-3
    assert relative_error(after, ref) <= 1e-4, "stale weights served after an optimizer step"

