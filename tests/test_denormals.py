"""Float32 denormals flushed to zero on every CPU thread, as Keras's XLA and TensorFlow backends compute."""
import numpy as np
import pytest
import torch

from lightning_app import denormals
from lightning_app.denormals import denormal_tensor, flush_denormals


def _denormal_results() -> int:
    """Non-zero results of ``1e-39 * 1.5`` over a tensor split across every thread of torch's pool."""
    return int((denormal_tensor(1 << 21) * 1.5).count_nonzero())


@pytest.fixture
def restore_denormals():
    yield
    flush_denormals(True)  # what a TransferModule sets up anyway; later tests see the same state either way


def test_flush_reaches_the_threads_of_an_existing_pool(restore_denormals):
    """``torch.set_flush_denormal`` alone sets the calling thread only: with the OpenMP pool already running, the
    other threads' share of a kernel keeps denormals. ``flush_denormals`` reaches every pool thread."""
    assert flush_denormals(False)
    assert _denormal_results() == 1 << 21  # the pool exists now, every thread keeps denormals
    torch.set_flush_denormal(True)
    if torch.get_num_threads() > 1:
        assert 0 < _denormal_results() < 1 << 21  # the calling thread only: why a plain set_flush_denormal is not enough
    assert flush_denormals(True)
    assert _denormal_results() == 0
    assert flush_denormals(True)  # idempotent
    assert flush_denormals(False) and _denormal_results() == 1 << 21


def test_keep_by_environment(monkeypatch, restore_denormals):
    monkeypatch.setenv("LIGHTNING_APP_DENORMALS", "keep")
    assert flush_denormals(True)  # the request (keep) holds everywhere
    assert _denormal_results() == 1 << 21


def test_partial_flush_is_undone(monkeypatch, restore_denormals):
    """Where the pool threads cannot be reached, denormals are kept everywhere (never flushed on some threads only:
    results would depend on how a kernel is split) and the call says so."""
    if torch.get_num_threads() < 2:
        pytest.skip("needs a pool of 2+ threads")
    monkeypatch.setattr(denormals, "_openmp_runtimes", lambda: [])
    flush_denormals(False)
    assert flush_denormals(True) is False
    assert _denormal_results() == 1 << 21


def test_torchs_own_openmp_runtime_is_used_beside_scikit_learns(restore_denormals):
    """scikit-learn maps its own libgomp (its own thread pool): the setting must reach torch's pool, not that one
    (the full suite imports scikit-learn before this test ran; alone it passed)."""
    import os

    import sklearn.cluster  # noqa: F401 - maps scikit-learn's libgomp

    runtimes = denormals._openmp_runtimes()
    torch_dir = os.path.dirname(os.path.realpath(torch.__file__))
    assert runtimes and os.path.realpath(runtimes[0]._name).startswith(torch_dir)
    flush_denormals(False)
    assert _denormal_results() == 1 << 21
    assert flush_denormals(True) and _denormal_results() == 0


def test_fit_flushes_denormals_like_keras(tmp_path, restore_denormals):
    """A Trainer stage sets it up (the module's ``setup``): tiny values vanish as in Keras instead of slowing
    every kernel that meets them."""
    import pytorch_lightning as pl

    from lightning_app.data.features import FeatureDataModule, FeatureSet
    from lightning_app.module import TransferModule

    flush_denormals(False)
    rng = np.random.default_rng(0)
    feats, labels = rng.random((16, 96), dtype=np.float32), np.arange(16) % 2
    model = TransferModule("test_resnet", 2, weights=None, stage="extract")
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, FeatureDataModule(FeatureSet(feats, labels, None), num_classes=2, batch_size=8))
    assert _denormal_results() == 0
