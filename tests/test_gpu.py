"""The zoo on CUDA: every Keras-equivalent architecture gives the CPU's outputs on the GPU.

Runs where a CUDA device exists (the lent GPU machine); skipped, and reported as skipped, elsewhere.
"""
import pytest
import torch

from lightning_app.zoo import create_backbone, get_entry, list_models

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 would trade float32 fidelity for speed; parity is checked in true float32."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("name", list_models())
def test_cuda_matches_cpu_at_native_size(name):
    entry = get_entry(name)
    torch.manual_seed(0)
    model = create_backbone(name, weights=None).eval()
    x = torch.randn(2, 3, entry.input_size, entry.input_size)
    with torch.inference_mode():
        cpu_logits = model(x)
        cpu_features = model.forward_features(x)
        model = model.cuda()
        gpu_logits = model(x.cuda()).cpu()
        gpu_features = model.forward_features(x.cuda()).cpu()
    for cpu, gpu in ((cpu_logits, gpu_logits), (cpu_features, gpu_features)):
        rel = (cpu - gpu).abs().max() / cpu.abs().max()
        assert rel <= 1e-4, f"{name}: CUDA vs CPU relative difference {rel:.2e}"
