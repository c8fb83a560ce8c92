"""Converter behaviour on generated Keras files: layouts, CLI, metadata and bad input."""
import json

import h5py
import numpy as np
import pytest
import torch

from converters import parity
from converters.__main__ import main as converters_main
from converters.convert import convert, load_converted, save_converted
from converters.errors import LayerMismatchError, WeightFileError
from converters.keras_models import build_keras_model, import_keras, seed_keras
from lightning_app.zoo import create_backbone, get_entry, list_models

SIZE = 64  # DenseNet's converter does not depend on the input size; small keeps the tests fast
ENTRY = get_entry("DenseNet201")


@pytest.fixture(scope="module")
def keras_densenet(tmp_path_factory):
    """A randomised Keras DenseNet201 (top) with its legacy .h5, .weights.h5 and full-model .h5."""
    seed_keras(1)
    model = build_keras_model(ENTRY, include_top=True, input_size=SIZE)
    parity.randomize_keras_model(model, parity.sample_images(SIZE, 4), ENTRY, seed=1)
    root = tmp_path_factory.mktemp("densenet")
    legacy = parity.save_legacy_h5(model, root / "densenet201_top.h5")
    weights_h5 = root / "densenet201.weights.h5"
    model.save_weights(weights_h5)
    full = root / "densenet201_full.h5"
    model.save(full)
    images = parity.sample_images(SIZE, 2)
    return dict(model=model, legacy=legacy, weights_h5=weights_h5, full=full, root=root, images=images,
                logits=parity.keras_outputs(model, images, ENTRY))


def _ours(path, images):
    model = create_backbone("DenseNet201", weights=path)
    return parity.timm_outputs(model, images, ENTRY, include_top=True)


def _assert_parity(keras_out, ours):
    report = parity.compare(ENTRY, keras_out, ours, True, SIZE)
    assert report.ok, str(report)


def test_cli_convert_then_create_backbone(keras_densenet, tmp_path, capsys):
    out = tmp_path / "dn.safetensors"
    assert converters_main(["convert", "--model", "DenseNet201", "--h5", str(keras_densenet["legacy"]),
                            "--out", str(out)]) == 0
    assert "top" in capsys.readouterr().out
    _, metadata = load_converted(out)
    assert metadata["keras_model"] == "DenseNet201"
    assert metadata["preprocessing_mode"] == "torch"
    assert metadata["include_top"] == "true"
    assert len(metadata["source_sha256"]) == 64 and metadata["converter_version"]
    assert json.loads(metadata["mean"]) == list(ENTRY.mean)
    _assert_parity(keras_densenet["logits"], _ours(out, keras_densenet["images"]))


def test_conversion_is_deterministic(keras_densenet, tmp_path):
    """Same file in, same tensors and metadata out (safetensors may order its header keys freely)."""
    a = load_converted(save_converted(convert(ENTRY, keras_densenet["legacy"]), tmp_path / "a.safetensors"))
    b = load_converted(save_converted(convert(ENTRY, keras_densenet["legacy"]), tmp_path / "b.safetensors"))
    assert a[1] == b[1] and list(a[0]) == list(b[0])
    assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_h5_path_loads_directly(keras_densenet):
    _assert_parity(keras_densenet["logits"], _ours(keras_densenet["legacy"], keras_densenet["images"]))


def test_keras3_weights_h5(keras_densenet):
    converted = convert(ENTRY, keras_densenet["weights_h5"])
    assert converted.metadata["source_layout"] == "keras3" and converted.include_top
    _assert_parity(keras_densenet["logits"], _ours(keras_densenet["weights_h5"], keras_densenet["images"]))


def test_full_model_h5_with_model_weights_group(keras_densenet):
    with h5py.File(keras_densenet["full"], "r") as f:
        assert "model_weights" in f
    _assert_parity(keras_densenet["logits"], _ours(keras_densenet["full"], keras_densenet["images"]))


def test_chunked_layer_names(keras_densenet, tmp_path):
    """Keras splits long attributes into layer_names0..N; the reader joins them."""
    path = tmp_path / "chunked.h5"
    path.write_bytes(keras_densenet["legacy"].read_bytes())
    with h5py.File(path, "a") as f:
        names = list(f.attrs["layer_names"])
        del f.attrs["layer_names"]
        for i, start in enumerate(range(0, len(names), 100)):
            f.attrs[f"layer_names{i}"] = names[start:start + 100]
    _assert_parity(keras_densenet["logits"], _ours(path, keras_densenet["images"]))


def test_notop_file_gives_features(keras_densenet, tmp_path):
    keras = import_keras()
    model = keras_densenet["model"]
    features = keras.Model(model.inputs, model.get_layer("relu").output)
    path = parity.save_legacy_h5(features, tmp_path / "notop.h5")
    converted = convert(ENTRY, path)
    assert not converted.include_top and not any(k.startswith("classifier") for k in converted.state_dict)
    ours = create_backbone("DenseNet201", weights=path, num_classes=0)
    with torch.no_grad():
        pooled = ours.eval()(torch.zeros(1, 3, SIZE, SIZE))
    assert pooled.shape == (1, ENTRY.num_features)
    report = parity.compare(ENTRY, parity.keras_outputs(features, keras_densenet["images"], ENTRY),
                            parity.timm_outputs(ours, keras_densenet["images"], ENTRY, False), False, SIZE)
    assert report.ok, str(report)


def test_wrong_model_names_first_mismatching_layer(tmp_path):
    """A DenseNet121 file given as DenseNet201: the error names the layer and both shapes."""
    keras = import_keras()
    keras.utils.clear_session()
    other = keras.applications.DenseNet121(weights=None, input_shape=(SIZE, SIZE, 3), classifier_activation=None)
    path = parity.save_legacy_h5(other, tmp_path / "densenet121.h5")
    with pytest.raises(LayerMismatchError) as err:
        convert(ENTRY, path)
    message = str(err.value)
    assert "layer #" in message and "DenseNet201" in message
    assert "(1, 1, 1024, 512)" in message  # DenseNet121's pool4_conv, where DenseNet201 still has dense layers
    assert "(1, 1, 1024, 128)" in message


def test_not_hdf5_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.write_bytes(b"<html>404 Not Found</html>")
    with pytest.raises(WeightFileError, match="not an HDF5 file"):
        convert(ENTRY, path)


def test_empty_file(tmp_path):
    path = tmp_path / "weights.h5"
    path.touch()
    with pytest.raises(WeightFileError, match="empty"):
        convert(ENTRY, path)


def test_truncated_file(keras_densenet, tmp_path):
    data = keras_densenet["legacy"].read_bytes()
    path = tmp_path / "truncated.h5"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightFileError, match="truncated"):
        convert(ENTRY, path)


def test_hdf5_but_not_keras(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(WeightFileError, match="not a Keras weight file"):
        convert(ENTRY, path)


def test_list_cli(capsys):
    assert converters_main(["list"]) == 0
    out = capsys.readouterr().out
    for name in list_models():
        entry = get_entry(name)
        line = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert str(entry.input_size) in line and entry.mode in line
        assert entry.top.filename in line and entry.notop.filename in line
    assert f"{len(list_models())} models, {len(list_models(variants=True))} entries counting variants" in out
    assert converters_main(["list", "--variants"]) == 0
    out = capsys.readouterr().out
    assert all(any(line.startswith(name + " ") for line in out.splitlines()) for name in list_models(variants=True))


def test_cli_verify_compares_keras_loading_the_same_file(keras_densenet, capsys):
    """`python -m converters verify --h5 FILE`: Keras loads the file itself; ours converts it."""
    code = converters_main(["verify", "--model", "DenseNet201", "--h5", str(keras_densenet["legacy"]),
                            "--size", str(SIZE)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "DenseNet201 top @64" in out and "(ok" in out


def test_cli_reports_errors_cleanly(tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"nope")
    assert converters_main(["convert", "--model", "DenseNet201", "--h5", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "not an HDF5 file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- the name check beside the order check --------------------------------------------------------

def test_swapped_layers_of_equal_shapes_are_refused(keras_densenet, tmp_path):
    """Two layers with the same shapes in swapped order: shapes cannot tell, the names do."""
    path = tmp_path / "swapped.h5"
    path.write_bytes(keras_densenet["legacy"].read_bytes())
    a, b = "conv2_block1_2_conv", "conv2_block2_2_conv"  # both (3, 3, 128, 32)
    with h5py.File(path, "a") as f:
        names = [n.decode() if isinstance(n, bytes) else n for n in f.attrs["layer_names"]]
        assert f[a][f[a].attrs["weight_names"][0]].shape == f[b][f[b].attrs["weight_names"][0]].shape
        i, j = names.index(a), names.index(b)
        names[i], names[j] = names[j], names[i]
        f.attrs["layer_names"] = [n.encode() for n in names]
    with pytest.raises(LayerMismatchError) as err:
        convert(ENTRY, path)
    message = str(err.value)
    assert f"named '{b}' where Keras has '{a}'" in message and "wrong layers" in message


def _spec(name, cls, roles, shapes):
    from converters.manifest import LayerSpec

    return LayerSpec(name, cls, tuple(roles), tuple(tuple(s) for s in shapes))


def _layer(name, roles, shapes):
    from converters.h5 import LayerWeights

    return LayerWeights(name, [np.zeros(s, np.float32) for s in shapes], list(roles))


def _align(layers, specs, legacy_name=None):
    from converters.align import align
    from converters.h5 import KerasWeights

    return align(KerasWeights("file.h5", "legacy", layers), {"top": specs, "notop": specs[:-1]}, "Demo", legacy_name)


_BN = ["gamma", "beta", "moving_mean", "moving_variance"]
#: a manifest in model.layers order whose auto-named convs are not in creation order (as InceptionV3's)
_SPECS = [_spec("conv2d", "conv2d", ["kernel"], [(3, 3, 3, 8)]),
          _spec("conv2d_2", "conv2d", ["kernel"], [(1, 1, 8, 8)]),
          _spec("conv2d_1", "conv2d", ["kernel"], [(1, 1, 8, 8)]),
          _spec("block_bn", "batch_normalization", _BN, [(8,)] * 4),
          _spec("predictions", "dense", ["kernel", "bias"], [(8, 10), (10,)])]


def _file(names, roles=None):
    return [_layer(n, (roles or {}).get(n, s.roles), s.shapes) for n, s in zip(names, _SPECS)]


def test_keras2_auto_names_shifted_by_one_are_accepted():
    """Official Keras 2 files count from 1 (conv2d_1 for Keras 3's conv2d): same order, other numbers."""
    layers, include_top = _align(_file(["conv2d_1", "conv2d_3", "conv2d_2", "block_bn", "predictions"]), _SPECS)
    assert include_top and list(layers) == [s.name for s in _SPECS]


def test_permuted_auto_names_are_refused():
    with pytest.raises(LayerMismatchError, match="numbers its conv2d layers in another order"):
        _align(_file(["conv2d_1", "conv2d_2", "conv2d_3", "block_bn", "predictions"]), _SPECS)


def test_other_class_in_place_of_auto_named_layer_is_refused():
    with pytest.raises(LayerMismatchError, match="named 'dense_4' where Keras has its auto-named conv2d"):
        _align(_file(["conv2d", "dense_4", "conv2d_1", "block_bn", "predictions"]), _SPECS)


def test_keras1_weight_names_are_understood():
    """VGG16's official files name weights Keras-1 style: block1_conv1_W_1:0, block1_conv1_b_1:0."""
    from converters.h5 import _role

    roles = {"predictions": [_role("predictions_W_1:0"), _role("predictions_b_1:0")],
             "block_bn": [_role(f"block_bn/block_bn_{r}:0") for r in ("gamma", "beta", "running_mean", "running_std")]}
    layers, _ = _align(_file(["conv2d", "conv2d_2", "conv2d_1", "block_bn", "predictions"], roles), _SPECS)
    assert set(layers["block_bn"]) == set(_BN)


def test_weights_stored_in_another_order_are_refused():
    """BatchNorm's four vectors have one shape: only the weight names tell gamma from the moving variance."""
    roles = {"block_bn": ["moving_variance", "beta", "moving_mean", "gamma"]}
    with pytest.raises(LayerMismatchError, match="'block_bn' stores weights"):
        _align(_file(["conv2d", "conv2d_2", "conv2d_1", "block_bn", "predictions"], roles), _SPECS)


def test_layers_renamed_by_keras_are_matched_through_the_models_legacy_names():
    """Official files saved by an older Keras name some layers otherwise (MobileNetV3's ``expanded_conv/
    depthwise/BatchNorm``, MobileNetV2's ``Logits``): the model's ``legacy_layer_name`` maps them to Keras 3's
    names before the check, and a layer still out of place is refused."""
    legacy = {"Block/BatchNorm": "block_bn", "Logits": "predictions"}.get
    names = ["conv2d_1", "conv2d_3", "conv2d_2", "Block/BatchNorm", "Logits"]
    with pytest.raises(LayerMismatchError, match="named 'BatchNorm' where Keras has 'block_bn'"):
        _align(_file(names), _SPECS)
    layers, include_top = _align(_file(names), _SPECS, lambda n: legacy(n, n))
    assert include_top and list(layers) == [s.name for s in _SPECS]
    with pytest.raises(LayerMismatchError, match="named 'Logits' where Keras has 'block_bn'"):
        _align(_file(["conv2d_1", "conv2d_3", "conv2d_2", "Logits", "Block/BatchNorm"]), _SPECS, lambda n: n)
