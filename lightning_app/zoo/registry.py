"""The zoo table: one row per Keras Applications model.

Each row says which timm architecture reproduces the Keras model exactly, its
native input size, its Keras preprocessing as a (mean, std) on [0, 1] RGB input
(``bgr``: Keras feeds BGR, folded into the first conv at conversion time), and
the official Keras weight files (URL and md5) with and without the top.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Dict, Tuple

KERAS_BASE_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"
#: Environment variable naming a mirror of KERAS_BASE_URL (same layout), e.g. an internal server.
MIRROR_ENV = "KERAS_APPLICATIONS_MIRROR"

#: Keras ``imagenet_utils.preprocess_input`` modes as (mean, std) on [0, 1] RGB input.
PREPROCESSING: Dict[str, Tuple[Tuple[float, float, float], Tuple[float, float, float], bool]] = {
    # caffe: RGB->BGR, subtract the BGR mean in 0..255 units, no scaling.
    "caffe": ((123.68 / 255, 116.779 / 255, 103.939 / 255), (1 / 255, 1 / 255, 1 / 255), True),
    # tf: x / 127.5 - 1
    "tf": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5), False),
    # torch: x / 255, then ImageNet mean / std
    "torch": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), False),
}


@dataclass(frozen=True)
class WeightFile:
    """One official Keras weight file."""

    path: str  # relative to KERAS_BASE_URL
    md5: str

    @property
    def url(self) -> str:
        base = os.environ.get(MIRROR_ENV) or KERAS_BASE_URL
        return base.rstrip("/") + "/" + self.path

    @property
    def filename(self) -> str:
        return self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class ZooEntry:
    """A Keras Applications model and its Keras-equivalent timm architecture."""

    keras_name: str  # name in keras.applications, e.g. "InceptionV3"
    timm_arch: str  # registered timm model name
    input_size: int  # native (square) input size
    mode: str  # Keras preprocessing mode: caffe | tf | torch
    top: WeightFile
    notop: WeightFile
    mapping: str  # module in converters.mappings holding the Keras -> timm layer mapping
    first_conv: str  # timm parameter prefix of the first conv (where a BGR flip is folded)
    num_features: int  # pooled feature width (include_top=False, pooling="avg")
    top1: float  # published Keras ImageNet top-1 (%)
    keras_kwargs: Dict[str, object] = field(default_factory=dict)  # extra args for parity builds

    @property
    def mean(self) -> Tuple[float, float, float]:
        return PREPROCESSING[self.mode][0]

    @property
    def std(self) -> Tuple[float, float, float]:
        return PREPROCESSING[self.mode][1]

    @property
    def bgr(self) -> bool:
        return PREPROCESSING[self.mode][2]

    def weight_file(self, include_top: bool) -> WeightFile:
        return self.top if include_top else self.notop


def _files(stem: str, top_md5: str, notop_md5: str) -> Dict[str, WeightFile]:
    return {
        "top": WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels.h5", top_md5),
        "notop": WeightFile(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5", notop_md5),
    }


_ENTRIES = [
    ZooEntry(
        "NASNetLarge", "keras_nasnetalarge", 331, "tf",
        top=WeightFile("nasnet/NASNet-large.h5", "11577c9a518f0070763c2b964a382f17"),
        notop=WeightFile("nasnet/NASNet-large-no-top.h5", "d81d89dc07e6e56530c4e77faddd61b5"),
        mapping="nasnet", first_conv="conv0.conv", num_features=4032, top1=82.5,
    ),
    ZooEntry(
        "InceptionResNetV2", "keras_inception_resnet_v2", 299, "tf",
        **_files("inception_resnet_v2/inception_resnet_v2",
                 "e693bd0210a403b3192acc6073ad2e96", "d19885ff4a710c122648d3b5c3b684e4"),
        mapping="inception_resnet_v2", first_conv="conv2d_1a.conv", num_features=1536, top1=80.3,
    ),
    ZooEntry(
        "InceptionV3", "keras_inception_v3", 299, "tf",
        **_files("inception_v3/inception_v3",
                 "9a0d58056eeedaa3f26cb7ebd46da564", "bcbd6486424b2319ff4ef7d526e38f63"),
        mapping="inception_v3", first_conv="Conv2d_1a_3x3.conv", num_features=2048, top1=77.9,
    ),
    ZooEntry(
        "DenseNet201", "keras_densenet201", 224, "torch",
        **_files("densenet/densenet201",
                 "1ceb130c1ea1b78c3bf6114dbdfd8807", "c13680b51ded0fb44dff2d8f86ac8bb1"),
        mapping="densenet", first_conv="features.conv0", num_features=1920, top1=77.3,
    ),
    ZooEntry(
        "ResNet152V2", "keras_resnet152v2", 224, "tf",
        **_files("resnet/resnet152v2",
                 "a49b44d1979771252814e80f8ec446f9", "ed17cf2e0169df9d443503ef94b23b33"),
        mapping="resnet_v2", first_conv="stem.conv", num_features=2048, top1=78.0,
    ),
    ZooEntry(
        "Xception", "keras_xception", 299, "tf",
        **_files("xception/xception",
                 "0a58e3b7378bc2990ea3b43d5981f1f6", "b0042744bf5b25fce3cb969f33bebb97"),
        mapping="xception", first_conv="conv1", num_features=2048, top1=79.0,
    ),
    ZooEntry(
        "VGG16", "keras_vgg16", 224, "caffe",
        **_files("vgg16/vgg16",
                 "64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc"),
        mapping="vgg", first_conv="features.0", num_features=512, top1=71.3,
    ),
    ZooEntry(
        "ResNet50", "keras_resnet50", 224, "caffe",
        **_files("resnet/resnet50",
                 "2cb95161c43110f7111970584f804107", "4d473c1dd8becc155b73f8504c6f6626"),
        mapping="resnet", first_conv="conv1", num_features=2048, top1=74.9,
    ),
]

REGISTRY: Dict[str, ZooEntry] = {e.keras_name: e for e in _ENTRIES}
_BY_LOWER = {name.lower(): e for name, e in REGISTRY.items()}
_BY_LOWER.update({e.timm_arch: e for e in _ENTRIES})


def list_models() -> list[str]:
    """Keras names of every model in the zoo, in table order."""
    return list(REGISTRY)


def get_entry(name: str) -> ZooEntry:
    """Look up a zoo entry by Keras name (case-insensitive) or timm architecture name."""
    entry = _BY_LOWER.get(name.lower())
    if entry is None:
        from lightning_app.errors import UnknownModelError

        raise UnknownModelError(f"unknown model {name!r}; the zoo has: {', '.join(REGISTRY)}")
    return entry
