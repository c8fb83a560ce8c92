"""Keras preprocessing modes as ``(mean, std)`` on [0, 1] RGB input (see REFERENCE §1)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

Triple = Tuple[float, float, float]


@dataclass(frozen=True)
class Preprocessing:
    """``(x - mean) / std`` on [0, 1] RGB; ``bgr``: Keras feeds BGR (folded into the first conv)."""

    mean: Triple
    std: Triple
    bgr: bool = False


PREPROCESSING: Dict[str, Preprocessing] = {
    # caffe: RGB->BGR, subtract the BGR mean in 0..255 units, no scaling (VGG, ResNet v1).
    "caffe": Preprocessing((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255, 1 / 255, 1 / 255), bgr=True),
    # tf: x / 127.5 - 1 (Inception, Xception, NASNet, MobileNet v1/v2, ResNetV2; built into MobileNetV3).
    "tf": Preprocessing((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    # torch: x / 255, then ImageNet mean / std (DenseNet; built into EfficientNet, EfficientNetV2 B*, ConvNeXt).
    "torch": Preprocessing((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    # tf128: x / 128 - 1 (built into EfficientNetV2 S/M/L: Rescaling(1/128, offset=-1)).
    "tf128": Preprocessing((128 / 255,) * 3, (128 / 255,) * 3),
}


def preprocessing(mode: str) -> Preprocessing:
    """The named mode; a clear error for an unknown one."""
    try:
        return PREPROCESSING[mode]
    except KeyError:
        raise KeyError(f"unknown preprocessing mode {mode!r}; known: {', '.join(PREPROCESSING)}") from None
