"""MobileNet, MobileNetV2 and MobileNetV3: what the per-model parity tests do not show.

* Every alpha and size variant converts a file laid out and named as the official files are (the
  parity tests run only a few of them, and they save with Keras 3's names): MobileNetV2's classifier
  is named ``Logits``, MobileNetV3 has TF-era names such as ``expanded_conv_1/squeeze_excite/Conv``,
  and Keras 2 stored a depthwise kernel as ``depthwise_kernel``.
* MobileNet v1 pads its strided depthwise convs with Keras's fixed ((0, 1), (0, 1)), which is not
  TF-same on odd feature maps: parity at an input size with odd maps.
* MobileNetV3's head follows Keras: ``num_classes=0`` is ``include_top=False, pooling="avg"`` (the
  ``conv_1`` features, without the ``conv_2`` head conv), and a fresh classifier sits on those features.
"""
import re

import h5py
import numpy as np
import pytest
import torch

from converters.manifest import load_manifest
from lightning_app.zoo import REGISTRY, create_backbone, get_entry

FAMILIES = ("mobilenet", "mobilenet_v2", "mobilenet_v3")
#: one entry per architecture (size variants share their model's manifest and mapping)
ARCHITECTURES = [name for name, e in REGISTRY.items() if e.family in FAMILIES and e.manifest == name]


def _tf_era_name(name: str) -> str:
    """The name TF-era Keras gave a MobileNetV3 layer that Keras 3 names ``name`` (keras-applications /
    tf.keras ``mobilenet_v3.py``: ``Conv/BatchNorm``, ``expanded_conv_3/squeeze_excite/Conv_1``, ``Logits``)."""
    top = {"conv": "Conv", "conv_bn": "Conv/BatchNorm", "conv_1": "Conv_1", "conv_1_bn": "Conv_1/BatchNorm",
           "conv_2": "Conv_2", "logits": "Logits"}
    if name in top:
        return top[name]
    block, part = re.fullmatch(r"(expanded_conv(?:_\d+)?)_(.+)", name).groups()
    part = {"squeeze_excite_conv": "squeeze_excite/Conv", "squeeze_excite_conv_1": "squeeze_excite/Conv_1"}.get(
        part, re.sub(r"_bn$", "/BatchNorm", part))
    return f"{block}/{part}"


def _official_name(family: str, name: str) -> str:
    if family == "mobilenet_v3":
        return _tf_era_name(name)
    if family == "mobilenet_v2" and name == "predictions":
        return "Logits"
    return name


def write_official_style_h5(entry, include_top: bool, path, seed: int = 0):
    """A legacy Keras 2 ``.h5`` with the manifest's shapes, named as the official files are; random values."""
    rng = np.random.default_rng(seed)
    specs = load_manifest(entry.manifest_path)["top" if include_top else "notop"]
    with h5py.File(path, "w") as f:
        names = []
        for spec in specs:
            name = _official_name(entry.family, spec.name)
            roles = ["depthwise_kernel" if spec.keras_class == "depthwise_conv2d" and r == "kernel" else r
                     for r in spec.roles]  # Keras 2's name for a depthwise kernel
            group = f.create_group(name)
            weight_names = [f"{name}/{role}:0" for role in roles]
            group.attrs["weight_names"] = [w.encode() for w in weight_names]
            for weight_name, shape in zip(weight_names, spec.shapes):
                group.create_dataset(weight_name, data=rng.normal(size=shape).astype(np.float32))
            names.append(name)
        f.attrs["layer_names"] = [n.encode() for n in names]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
    return path


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_official_style_files_convert_into_every_variant(name, tmp_path):
    entry = get_entry(name)
    for include_top in (True, False) if entry.variant_of is None else (True,):  # other alphas: top (a superset)
        h5 = write_official_style_h5(entry, include_top, tmp_path / f"{name}_{include_top}.h5")
        model = create_backbone(name, weights=h5, num_classes=None if include_top else 0)
        first = _official_name(entry.family, load_manifest(entry.manifest_path)["top"][0].name)
        with h5py.File(h5, "r") as f:  # one value followed through: the stem conv, HWIO -> OIHW
            kernel = np.asarray(f[first][f"{first}/kernel:0"])
        torch.testing.assert_close(model.conv_stem.weight, torch.from_numpy(kernel.transpose(3, 2, 0, 1)))


def test_mobilenet_v3_tf_era_names_are_checked_not_ignored(tmp_path):
    """The TF-era names are understood, not ignored: two same-shape layers swapped in the file are refused."""
    from converters.errors import LayerMismatchError

    entry = get_entry("MobileNetV3Small")
    h5 = write_official_style_h5(entry, False, tmp_path / "swapped.h5")
    with h5py.File(h5, "a") as f:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        i, j = names.index("expanded_conv_1/depthwise/BatchNorm"), names.index("expanded_conv_1/expand/BatchNorm")
        names[i], names[j] = names[j], names[i]
        f.attrs["layer_names"] = [n.encode() for n in names]
    with pytest.raises(LayerMismatchError, match="expanded_conv_1/expand/BatchNorm|expanded_conv_1_expand_bn"):
        create_backbone("MobileNetV3Small", weights=h5, num_classes=0)


@pytest.mark.slow
def test_mobilenet_v1_equals_keras_on_odd_feature_maps(tmp_path, parity_reports):
    """Input 97: maps of 49, 25, 13 and 7 before the strided depthwise convs, where Keras's fixed
    ((0, 1), (0, 1)) padding is not TF-same (timm's ``pad_type='same'`` gives other output sizes)."""
    from converters import parity
    from lightning_app.zoo.cli import load_zoo_model

    reports = parity.run_random_parity(get_entry("MobileNet_025"), tmp_path, input_size=97, load_model=load_zoo_model)
    parity_reports.extend(reports)
    assert [r.include_top for r in reports] == [True, False]
    for report in reports:
        assert report.ok, str(report)


@pytest.mark.slow
def test_mobilenet_v3_head_follows_keras_include_top_false(tmp_path):
    """``num_classes=0``: Keras ``include_top=False, pooling="avg"`` (576 pooled ``conv_1`` features);
    ``num_classes=10``: a Linear on those features, as ``include_top=False`` + ``Dense(10)``; the 1024-wide
    ``conv_2`` head conv exists only with the ImageNet top."""
    from converters import parity
    from converters.keras_models import import_keras

    keras = import_keras()
    keras.utils.clear_session()
    entry = get_entry("MobileNetV3Small")
    size = 97
    pooled = keras.applications.MobileNetV3Small(weights=None, include_top=False, pooling="avg",
                                                 input_shape=(size, size, 3))
    parity.randomize_keras_model(pooled, parity.sample_images(size, 4), entry)
    h5 = parity.save_legacy_h5(pooled, tmp_path / "notop.h5")
    images = parity.sample_images(size, 2)
    expected = parity.keras_outputs(pooled, images, entry)

    ours = create_backbone("MobileNetV3Small", weights=h5, num_classes=0).eval()
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) - 0.5) / 0.5
    with torch.no_grad():
        got = ours(x).numpy()
    assert got.shape == expected.shape == (2, 576) and ours.num_features == ours.head_hidden_size == 576
    assert np.abs(got - expected).max() <= 1e-4 * np.abs(expected).max()

    fresh = create_backbone("MobileNetV3Small", weights=h5, num_classes=10).eval()
    dense = keras.layers.Dense(10)
    dense.build((None, 576))
    assert isinstance(fresh.conv_head, torch.nn.Identity)
    assert tuple(fresh.classifier.weight.shape[::-1]) == tuple(dense.kernel.shape)
    with torch.no_grad():
        pre_logits = fresh.forward_head(fresh.forward_features(x), pre_logits=True)
    torch.testing.assert_close(pre_logits, torch.from_numpy(got))
    top = create_backbone("MobileNetV3Small", weights=None)
    assert top.conv_head.out_channels == 1024 and top.classifier.in_features == 1024
    fresh.reset_classifier(0)
    assert fresh.head_hidden_size == 576 and isinstance(fresh.conv_head, torch.nn.Identity)
