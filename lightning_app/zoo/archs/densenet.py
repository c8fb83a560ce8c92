"""Keras DenseNet121/169/201: timm's DenseNet is Keras's, given Keras's BatchNorm eps (1.001e-5).

Keras zero-pads before the stem max pool; the pool follows a ReLU, so zero padding and
timm's -inf padding give the same maximum.
"""
from functools import partial

from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.densenet import DenseNet

from lightning_app.zoo.archs._cfg import keras_cfg

KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


def _create(variant: str, block_config, pretrained: bool = False, **kwargs) -> DenseNet:
    kwargs.setdefault("norm_layer", partial(BatchNormAct2d, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM))
    return build_model_with_cfg(
        DenseNet, variant, pretrained, growth_rate=32, block_config=block_config,
        feature_cfg=dict(flatten_sequential=True), **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "keras_densenet201.keras_in1k": keras_cfg("DenseNet201"),
})


@register_model
def keras_densenet201(pretrained: bool = False, **kwargs) -> DenseNet:
    """Keras ``DenseNet201``."""
    return _create("keras_densenet201", (6, 12, 48, 32), pretrained, **kwargs)
