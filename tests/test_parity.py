"""Equivalence proof: for every zoo model, top and notop, Keras and ours agree at the native size.

Keras model (weights=None, explicit input shape) -> random kernels and biases, random BN affine,
BN statistics calibrated on a batch -> legacy .h5 (the official files' layout) -> our converter
-> create_backbone(weights=file) -> same real images -> max |diff| <= 1e-4 * max |Keras output|.
"""
import pytest

from converters import parity
from converters.keras_models import build_keras_model
from converters.manifest import load_manifest, manifest_from_keras_model
from lightning_app.zoo import get_entry, list_models

pytest.importorskip("keras")

@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_parity_native_size(name, tmp_path, parity_reports):
    reports = parity.run_random_parity(get_entry(name), tmp_path)
    parity_reports.extend(reports)
    assert [r.include_top for r in reports] == [True, False]
    for report in reports:
        assert report.ok, str(report)
    assert reports[0].top1_agree == 1.0

@pytest.mark.parametrize("name", list_models())
def test_manifest_matches_keras(name):
    """The committed layer manifests are what Keras itself builds (order, names, shapes)."""
    entry = get_entry(name)
    committed = load_manifest(name)
    for kind in ("top", "notop"):
        built = manifest_from_keras_model(build_keras_model(entry, kind == "top"))
        assert built == committed[kind], f"{name} {kind}: regenerate with python -m converters manifest --model {name}"
