"""Every zoo model's Keras -> timm mapping fills its timm model exactly, top and notop, from the manifest alone.

No Keras and no weight file: arrays of the manifest's shapes (never written, so never paged in) go
through the family's mapping, whose layouts give meta tensors of the converted shapes (no copies: a
350M-parameter model costs no memory); the mapping must use every Keras layer once
(``StateDictBuilder.finish``) and give exactly the timm model's keys with their shapes
(``check_against_model``, on the meta device). This is structural only; the
numbers are proven by the parity tests. It is what stands in CI for the models whose parity runs
only on demand for cost (``parity=False``: ConvNeXtBase/Large/XLarge, ``python -m converters verify``),
together with the manifest test (the manifests are what Keras builds).
"""
import numpy as np
import pytest
import torch

from converters import layouts
from converters.convert import check_against_model
from converters.manifest import load_manifest
from lightning_app.zoo import REGISTRY
from lightning_app.zoo.families import efficientnet

OWNERS = [name for name, entry in REGISTRY.items() if entry.manifest == entry.keras_name]


@pytest.mark.parametrize("include_top", [True, False], ids=["top", "notop"])
@pytest.mark.parametrize("name", OWNERS)
def test_mapping_fills_timm_model_from_manifest(name, include_top, monkeypatch):
    def meta(a: np.ndarray) -> torch.Tensor:  # the converted layout's shape, no data
        return torch.empty(a.shape, dtype=torch.float32, device="meta")

    monkeypatch.setattr(layouts, "array", meta)
    monkeypatch.setattr(layouts, "_t", meta)
    entry = REGISTRY[name]
    manifest = load_manifest(entry.manifest_path)["top" if include_top else "notop"]
    layers = {spec.name: {role: np.zeros(shape, np.float32) for role, shape in zip(spec.roles, spec.shapes)}
              for spec in manifest}
    if entry.family == "efficientnet":  # a value the mapping checks, not converts: the official files' statistics
        layers["normalization"].update(mean=np.asarray(efficientnet.IMAGENET_MEAN, np.float32),
                                       variance=np.asarray(efficientnet.IMAGENET_STD, np.float32))
    state_dict = check_against_model(entry.to_timm(layers, include_top), entry, include_top)
    assert len(state_dict) >= len(manifest)
