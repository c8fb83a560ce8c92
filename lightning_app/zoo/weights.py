"""Resolve zoo weights: local cache -> download (hash-checked, atomic) -> convert -> safetensors.

The cache directory is ``$KERAS_ZOO_CACHE`` if set, else ``~/.cache/keras_lightning_zoo``.
It holds the official Keras ``.h5`` files (``keras/``) and their conversions
(``converted/<KerasName>_<top|notop>.safetensors``).

Files are checked with the hash Keras publishes (md5, or sha256 for ConvNeXt). Where Keras
publishes none (MobileNet v1 / v2), the file is accepted as Keras accepts it and proven by its
conversion instead: every layer's name and shape must match the model's manifest, else the
file is refused (and a fresh download deleted); the converted file records its sha256.
"""
from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable, Optional, Union

import torch.nn as nn

from converters.digest import file_digest, hash_algorithm
from lightning_app.errors import WeightsProvenanceError, WeightsUnavailableError
from lightning_app.zoo.registry import WeightFile, ZooEntry

__all__ = ["CACHE_ENV", "WeightsUnavailableError", "cache_dir", "converted_path", "download", "file_digest",
           "is_cached", "keras_file_path", "load_weights", "resolve_imagenet", "state_dict_digest"]

CACHE_ENV = "KERAS_ZOO_CACHE"


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "keras_lightning_zoo"


def keras_file_path(entry: ZooEntry, include_top: bool) -> Path:
    """Where the official Keras file is (or would be) cached."""
    return cache_dir() / "keras" / entry.weight_file(include_top).filename


def converted_path(entry: ZooEntry, include_top: bool) -> Path:
    return cache_dir() / "converted" / f"{entry.keras_name}_{'top' if include_top else 'notop'}.safetensors"


def is_cached(name: str, include_top: bool) -> bool:
    """True if ImageNet weights for ``name`` are available without a download."""
    from lightning_app.zoo.registry import get_entry

    entry = get_entry(name)
    return converted_path(entry, include_top).is_file() or keras_file_path(entry, include_top).is_file()


def _progress(total: Optional[int], description: str) -> Callable[[int], None]:
    """A rich progress bar advanced by byte counts; a no-op when rich is unavailable."""
    try:
        from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn
    except ImportError:  # pragma: no cover
        return lambda n: None
    progress = Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), transient=True)
    task = progress.add_task(description, total=total)
    progress.start()

    def advance(n: int) -> None:
        if n < 0:
            progress.stop()
        else:
            progress.advance(task, n)

    return advance


def download(url: str, dest: Path, file_hash: Optional[str], timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` atomically: a partial or corrupt transfer never lands at ``dest``.

    ``file_hash``: md5 (32 hex digits) or sha256 (64) the file must have; None: no check.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            total = response.headers.get("Content-Length")
            total = int(total) if total else None
            advance = _progress(total, f"downloading {dest.name}")
            received = 0
            try:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    received += len(block)
                    advance(len(block))
            finally:
                advance(-1)
            if total is not None and received != total:
                raise WeightsUnavailableError(f"download of {url} was cut off after {received} of {total} bytes")
        algorithm = hash_algorithm(file_hash)
        if file_hash is not None and (got := file_digest(tmp, algorithm)) != file_hash:
            raise WeightsUnavailableError(f"{url}: {algorithm} {got} does not match the expected {file_hash}; "
                                          "the file is corrupt or not the official one, nothing was cached")
        os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as err:
        raise WeightsUnavailableError(f"could not download {url}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _offline_message(entry: ZooEntry, include_top: bool, reason: str) -> str:
    wf: WeightFile = entry.weight_file(include_top)
    kind = "top" if include_top else "notop"
    return (
        f"Keras ImageNet weights for {entry.keras_name} ({kind}) are not cached and could not be downloaded "
        f"({reason}).\n"
        f"  Either download {wf.url} ({_hash_text(wf)})\n"
        f"  and put it at {keras_file_path(entry, include_top)}\n"
        f"  or convert a local file: python -m converters convert --model {entry.keras_name} "
        f"--h5 FILE --out {converted_path(entry, include_top)}\n"
        f"  (set ${CACHE_ENV} to use another cache directory), or pass weights=None for random init."
    )


def _hash_text(wf: WeightFile) -> str:
    return f"{wf.hash_algorithm} {wf.file_hash}" if wf.file_hash else "Keras publishes no hash for it"


def resolve_imagenet(entry: ZooEntry, include_top: bool) -> Path:
    """Path to converted ImageNet weights, converting or downloading as needed."""
    from converters.convert import convert, save_converted
    from converters.errors import LayerMismatchError, WeightFileError

    out = converted_path(entry, include_top)
    if out.is_file():
        check_provenance(out, entry, include_top)
        return out
    h5 = keras_file_path(entry, include_top)
    wf = entry.weight_file(include_top)
    downloaded = False
    if h5.is_file():
        if wf.file_hash is not None and (got := file_digest(h5, wf.hash_algorithm)) != wf.file_hash:
            raise WeightsUnavailableError(
                f"{h5} has {wf.hash_algorithm} {got}, not the official {wf.file_hash}: delete it (it will be "
                f"downloaded again) or convert it explicitly with python -m converters convert"
            )
    else:
        try:
            download(wf.url, h5, wf.file_hash)
            downloaded = True
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(_offline_message(entry, include_top, str(err))) from err
    try:
        converted = convert(entry, h5)
    except (LayerMismatchError, WeightFileError) as err:
        if wf.file_hash is not None:
            raise
        if downloaded:
            h5.unlink(missing_ok=True)  # no hash to check: a file that does not convert is not the official one
        raise WeightsUnavailableError(
            f"{wf.url} ({h5}) is not {entry.keras_name}'s official file: {err}"
            + (" The download was deleted." if downloaded else " Delete it; it will be downloaded again.")
        ) from err
    return save_converted(converted, out)


def check_provenance(path: Path, entry: ZooEntry, include_top: bool) -> None:
    """A cached conversion stands for ``weights="imagenet"`` only if it was converted from the official Keras file:
    its recorded source digest (sha256, or md5 from this version on) is the published hash of that file. A conversion
    recorded before the md5 was, against an md5-published file, is compared by sha256 with the official file when
    that is cached, else accepted by its source file name with a warning. Files Keras ships without a hash are
    accepted (the conversion proved their structure). Raises :class:`WeightsProvenanceError` otherwise."""
    from safetensors import safe_open

    wf = entry.weight_file(include_top)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001 - a broken cache file: say which and how to fix it
        raise WeightsProvenanceError(f"{path} is not a readable converted weight file ({err}): delete it, it is "
                                     f"rebuilt from the official {wf.filename}") from err
    source = meta.get("source_file", "an unknown file")
    fix = (f"delete {path} (it is rebuilt from the official file), or load that file explicitly with "
           f"weights={str(path)!r} instead of 'imagenet'")
    if meta.get("keras_model") not in (None, entry.keras_name) or meta.get("include_top") not in (
            None, "true" if include_top else "false"):
        raise WeightsProvenanceError(f"{path} holds {meta.get('keras_model')} weights (include_top="
                                     f"{meta.get('include_top')}), not {entry.keras_name}'s: {fix}")
    algorithm = wf.hash_algorithm
    if algorithm is None:
        return
    recorded = meta.get(f"source_{algorithm}")
    if recorded is not None:
        if recorded == wf.file_hash:
            return
        raise WeightsProvenanceError(f"{path} was converted from {source!r} ({algorithm} {recorded}), not from the "
                                     f"official {wf.filename} ({algorithm} {wf.file_hash}), so it is not the Keras "
                                     f"ImageNet weights: {fix}")
    official = keras_file_path(entry, include_top)
    if official.is_file() and file_digest(official, algorithm) == wf.file_hash:
        sha = file_digest(official, "sha256")
        if meta.get("source_sha256") == sha:
            return
        raise WeightsProvenanceError(f"{path} records source sha256 {meta.get('source_sha256')}, not the official "
                                     f"{wf.filename}'s ({sha}), so it is not the Keras ImageNet weights: {fix}")
    if source == wf.filename:
        warnings.warn(f"{path} was converted by an older version that did not record the source {algorithm}, and "
                      f"the official {wf.filename} is not cached to compare with: it is used as the Keras ImageNet "
                      f"weights because its source file has the official name (delete it to rebuild it and be sure)")
        return
    raise WeightsProvenanceError(f"{path} was converted from {source!r}, not from the official {wf.filename}: {fix}")


def load_weights(model: nn.Module, weights: Union[str, os.PathLike], entry: Optional[ZooEntry],
                 include_top: bool = True) -> None:
    """Load ``"imagenet"``, a converted ``.safetensors`` or a Keras ``.h5`` into ``model``.

    Without the top (``include_top=False``), classifier weights in the file are ignored
    and the model keeps its own (fresh or absent) classifier.
    """
    from converters.convert import convert, load_converted

    if isinstance(weights, str) and weights == "imagenet":
        state_dict, _ = load_converted(resolve_imagenet(entry, include_top))
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {path} does not exist")
        if path.suffix == ".h5":
            if entry is None:
                raise ValueError(f"{path}: Keras .h5 files can only be loaded into zoo models")
            state_dict = convert(entry, path).state_dict
        else:
            state_dict, metadata = load_converted(path)
            if entry is not None and metadata.get("keras_model") not in (None, entry.keras_name):
                raise ValueError(f"{path} holds weights for {metadata['keras_model']}, not {entry.keras_name}")
    _load_state_dict(model, state_dict, path_hint=str(weights))


def _load_state_dict(model: nn.Module, state_dict: dict, path_hint: str) -> None:
    own = model.state_dict()
    classifier = set(own) ^ set(state_dict)
    # Keys only the file has (its classifier) or only the model has (a fresh classifier) are allowed
    # when they belong to the head; everything in the body must match exactly.
    head_prefixes = _head_prefixes(model)
    stray = [k for k in classifier if not any(k.startswith(p) for p in head_prefixes)]
    if stray:
        raise ValueError(f"{path_hint} does not fit {type(model).__name__}: mismatched keys {sorted(stray)[:8]}")
    filtered = {}
    for key, value in state_dict.items():
        if key not in own:
            continue
        if own[key].shape != value.shape:
            if any(key.startswith(p) for p in head_prefixes):
                continue  # a classifier of another width: keep the model's fresh one
            raise ValueError(f"{path_hint}: {key} has shape {tuple(value.shape)}, the model expects {tuple(own[key].shape)}")
        filtered[key] = value
    model.load_state_dict(filtered, strict=False)
    missing = [k for k in own if k not in filtered and not any(k.startswith(p) for p in head_prefixes)]
    if missing:
        raise ValueError(f"{path_hint}: no weights for {missing[:8]}")


def _head_prefixes(model: nn.Module) -> tuple:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifier = cfg.get("classifier", "classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    return tuple(f"{n}." for n in names) + ("head.", "fc.", "classifier.", "last_linear.", "pre_logits.")


def state_dict_digest(state_dict: dict) -> str:
    """Content hash of a state dict (used in feature-cache keys)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        digest.update(key.encode())
        digest.update(state_dict[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
