"""Atomic file writes: a crash or a full disk never leaves a half-written file at the target path."""
from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Union


def atomic_write(path: Union[str, os.PathLike], data: Union[bytes, str]) -> Path:
    """Write ``data`` to ``path`` through a synced temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def save_figure(fig, path: Union[str, os.PathLike], dpi: int = 110) -> Path:
    """Render a matplotlib ``Figure`` on the Agg canvas (no pyplot, no display) and write it as PNG atomically."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write(path, buf.getvalue())
