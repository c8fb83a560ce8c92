"""Weight resolution: cache, download (md5, atomic), conversion, and the offline error."""
import dataclasses
import hashlib
import http.server
import socket
import threading
from pathlib import Path

import pytest
import torch

from converters import parity
from converters.keras_models import build_keras_model, seed_keras
from lightning_app.zoo import create_backbone, get_entry
from lightning_app.zoo import weights as zoo_weights
from lightning_app.zoo.registry import MIRROR_ENV, KerasFiles, WeightFile

ENTRY = get_entry("DenseNet201")
SIZE = 32


@pytest.fixture(scope="module")
def notop_file(tmp_path_factory) -> Path:
    """A legacy notop DenseNet201 .h5 generated here, standing in for the official file."""
    seed_keras(3)
    model = build_keras_model(ENTRY, include_top=False, input_size=SIZE)
    return parity.save_legacy_h5(model, tmp_path_factory.mktemp("official") / ENTRY.notop.filename)


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        body, declared = self.routes.get(self.path, (None, None))
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(declared or len(body)))
        self.end_headers()
        self.wfile.write(body)  # a declared length above len(body) is a transfer cut off midway

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch, tmp_path):
    """A loopback HTTP server acting as the Keras weights host, and an empty cache."""
    _Handler.routes = {}
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{httpd.server_address[1]}/")
    monkeypatch.setenv(zoo_weights.CACHE_ENV, str(tmp_path / "cache"))
    yield _Handler.routes
    httpd.shutdown()


def _entry_for(data: bytes, md5: str | None = None):
    notop = WeightFile(ENTRY.notop.path, md5 or hashlib.md5(data).hexdigest())
    return dataclasses.replace(ENTRY, files=KerasFiles(ENTRY.top, notop))


def _cache_files(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())


def test_download_convert_and_cache(server, notop_file, tmp_path):
    data = notop_file.read_bytes()
    server["/" + ENTRY.notop.path] = (data, None)
    entry = _entry_for(data)
    path = zoo_weights.resolve_imagenet(entry, include_top=False)
    assert path == zoo_weights.converted_path(entry, False) and path.is_file()
    assert zoo_weights.keras_file_path(entry, False).read_bytes() == data
    # Second call: served from the cache, the server is not asked again.
    server.clear()
    assert zoo_weights.resolve_imagenet(entry, include_top=False) == path
    assert zoo_weights.is_cached("DenseNet201", include_top=False)
    assert not zoo_weights.is_cached("DenseNet201", include_top=True)


def test_create_backbone_imagenet_from_cache(server, notop_file, monkeypatch):
    data = notop_file.read_bytes()
    server["/" + ENTRY.notop.path] = (data, None)
    monkeypatch.setattr("lightning_app.zoo.factory.get_entry", lambda name: _entry_for(data))
    model = create_backbone("DenseNet201", weights="imagenet", num_classes=7).eval()
    reference = create_backbone("DenseNet201", weights=notop_file, num_classes=0).eval()
    x = torch.rand(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert model(x).shape == (1, 7)
        assert torch.equal(model.forward_features(x), reference.forward_features(x))


def test_md5_mismatch_refused_and_nothing_cached(server, notop_file, tmp_path):
    data = notop_file.read_bytes()
    server["/" + ENTRY.notop.path] = (data, None)
    entry = _entry_for(data, md5="0" * 32)
    with pytest.raises(zoo_weights.WeightsUnavailableError, match="md5"):
        zoo_weights.resolve_imagenet(entry, include_top=False)
    assert _cache_files(tmp_path) == []


def test_cut_off_transfer_leaves_no_partial_file(server, notop_file, tmp_path):
    data = notop_file.read_bytes()
    half = data[: len(data) // 2]
    server["/" + ENTRY.notop.path] = (half, len(data))
    with pytest.raises(zoo_weights.WeightsUnavailableError):
        zoo_weights.resolve_imagenet(_entry_for(data), include_top=False)
    assert _cache_files(tmp_path) == []


def test_offline_error_names_url_and_path(monkeypatch, tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv(MIRROR_ENV, f"http://127.0.0.1:{port}/")
    monkeypatch.setenv(zoo_weights.CACHE_ENV, str(tmp_path / "cache"))
    with pytest.raises(zoo_weights.WeightsUnavailableError) as err:
        create_backbone("DenseNet201", weights="imagenet", num_classes=0)
    message = str(err.value)
    assert ENTRY.notop.url in message
    assert str(tmp_path / "cache" / "keras" / ENTRY.notop.filename) in message
    assert "python -m converters convert" in message
    assert _cache_files(tmp_path) == []


def test_corrupt_cached_h5_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv(zoo_weights.CACHE_ENV, str(tmp_path / "cache"))
    path = zoo_weights.keras_file_path(ENTRY, include_top=False)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"partial")
    with pytest.raises(zoo_weights.WeightsUnavailableError, match="md5"):
        create_backbone("DenseNet201", weights="imagenet", num_classes=0)


def test_random_init_and_feature_api():
    model = create_backbone("DenseNet201", weights=None, num_classes=0).eval()
    assert model.pretrained_cfg["mean"] == ENTRY.mean
    with torch.no_grad():
        assert model(torch.rand(1, 3, SIZE, SIZE)).shape == (1, ENTRY.num_features)
    import timm
    features = timm.create_model(ENTRY.timm_arch, features_only=True)
    assert features.feature_info.channels()[-1] == ENTRY.num_features


def test_weights_for_another_model_refused(tmp_path, notop_file):
    from converters.convert import convert, save_converted
    converted = save_converted(convert(ENTRY, notop_file), tmp_path / "dn.safetensors")
    with pytest.raises(ValueError, match="holds weights for DenseNet201, not InceptionV3"):
        create_backbone("InceptionV3", weights=converted, num_classes=0)


def test_non_zoo_model_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="not a zoo model"):
        create_backbone("resnet18", weights="imagenet")


def _entry_with_notop_hash(file_hash):
    return dataclasses.replace(ENTRY, files=KerasFiles(ENTRY.top, WeightFile(ENTRY.notop.path, file_hash)))


def test_sha256_published_hash_is_checked(server, notop_file, tmp_path):
    """ConvNeXt's files are published with sha256 (64 hex digits) rather than md5."""
    data = notop_file.read_bytes()
    server["/" + ENTRY.notop.path] = (data, None)
    with pytest.raises(zoo_weights.WeightsUnavailableError, match="sha256"):
        zoo_weights.resolve_imagenet(_entry_with_notop_hash("0" * 64), include_top=False)
    assert _cache_files(tmp_path) == []
    assert zoo_weights.resolve_imagenet(_entry_with_notop_hash(hashlib.sha256(data).hexdigest()), False).is_file()


def test_no_published_hash_is_proven_by_conversion(server, notop_file):
    """MobileNet v1/v2 files have no published hash: the conversion (names, shapes) is the check."""
    from converters.convert import load_converted

    data = notop_file.read_bytes()
    server["/" + ENTRY.notop.path] = (data, None)
    path = zoo_weights.resolve_imagenet(_entry_with_notop_hash(None), include_top=False)
    assert load_converted(path)[1]["source_sha256"] == hashlib.sha256(data).hexdigest()


def test_no_published_hash_wrong_file_is_deleted(server, tmp_path):
    server["/" + ENTRY.notop.path] = (b"<html>not the weights</html>", None)
    with pytest.raises(zoo_weights.WeightsUnavailableError, match="not DenseNet201's official file"):
        zoo_weights.resolve_imagenet(_entry_with_notop_hash(None), include_top=False)
    assert _cache_files(tmp_path) == []


def test_cached_conversion_of_another_file_is_not_loaded_as_imagenet(server, notop_file, tmp_path):
    """Issue 9, case 5: a converted file in the cache whose source is not the official file (a fine-tuned .h5
    converted to the cache path, say) is refused for weights='imagenet', naming both files and the fix."""
    from converters.convert import convert, save_converted
    from lightning_app.errors import WeightsProvenanceError

    data = notop_file.read_bytes()
    entry = _entry_for(data)
    other = tmp_path / "finetuned_notop.h5"
    other.write_bytes(data + b"\0")  # not the official bytes (HDF5 ignores trailing bytes)
    save_converted(convert(ENTRY, other), zoo_weights.converted_path(entry, False))
    with pytest.raises(WeightsProvenanceError, match=r"converted from 'finetuned_notop.h5' .* not from the official"):
        zoo_weights.resolve_imagenet(entry, include_top=False)
    # the official file's conversion passes (its source md5 is the registry's)
    save_converted(convert(ENTRY, notop_file), zoo_weights.converted_path(entry, False))
    assert zoo_weights.resolve_imagenet(entry, include_top=False) == zoo_weights.converted_path(entry, False)


def test_older_conversion_checked_by_sha256_against_the_cached_official_file(server, notop_file, tmp_path):
    """A conversion made before the source md5 was recorded: its source sha256 must be the cached official file's."""
    import json

    from safetensors.torch import load_file, save_file

    from converters.convert import convert, save_converted
    from lightning_app.errors import WeightsProvenanceError

    data = notop_file.read_bytes()
    entry = _entry_for(data)
    out = zoo_weights.converted_path(entry, False)
    save_converted(convert(ENTRY, notop_file), out)
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = dict(f.metadata())
    meta.pop("source_md5")
    meta["source_sha256"] = "0" * 64
    save_file(load_file(str(out)), str(out), metadata=meta)
    official = zoo_weights.keras_file_path(entry, False)
    official.parent.mkdir(parents=True, exist_ok=True)
    official.write_bytes(data)
    with pytest.raises(WeightsProvenanceError, match="records source sha256 0000"):
        zoo_weights.resolve_imagenet(entry, include_top=False)
    assert json.dumps(meta)  # plain strings
