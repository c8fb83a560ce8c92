"""File digests for download checks, provenance and cache keys."""
from __future__ import annotations

import hashlib
import os
from typing import Optional, Union


def file_digest(path: Union[str, os.PathLike], algorithm: str) -> str:
    """Hex digest of a file, read in chunks (``algorithm``: ``"md5"``, ``"sha256"``, ...)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def hash_algorithm(file_hash: Optional[str]) -> Optional[str]:
    """The algorithm of a published hash, told by its length as Keras does: md5 (32 hex), sha256 (64)."""
    if file_hash is None:
        return None
    try:
        return {32: "md5", 64: "sha256"}[len(file_hash)]
    except KeyError:
        raise ValueError(f"{file_hash!r} is neither an md5 (32 hex digits) nor a sha256 (64)") from None
