"""Keras InceptionResNetV2: timm's InceptionResnetV2 given Keras's BatchNorm.

timm's ``inception_resnet_v2`` is the same network as Keras's (same TF-slim origin): the
``mixed_5b`` average pool already excludes padding (``count_include_pad=False``), the
residual scales (0.17, 0.1, 0.2, final block8 1.0 without ReLU) and the biased "up"
convs (Keras ``block*_conv``, timm ``*.conv2d``) agree. Only the BatchNorm needs Keras's
settings: ``scale=False`` (the converter sets gamma = 1), eps 1e-3, momentum 0.99 (PyTorch 0.01).
"""
from functools import partial

from timm.layers import BatchNormAct2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.inception_resnet_v2 import InceptionResnetV2

from lightning_app.zoo.archs._cfg import keras_cfg

KERAS_BN_EPS = 1e-3
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


def _create(variant: str, pretrained: bool = False, **kwargs) -> InceptionResnetV2:
    kwargs.setdefault("norm_eps", KERAS_BN_EPS)
    kwargs.setdefault("norm_layer", partial(BatchNormAct2d, momentum=KERAS_BN_MOMENTUM))
    return build_model_with_cfg(InceptionResnetV2, variant, pretrained, **kwargs)


default_cfgs = generate_default_cfgs({
    "keras_inception_resnet_v2.keras_in1k": keras_cfg("InceptionResNetV2", classifier="classif", pool_size=(8, 8)),
})


@register_model
def keras_inception_resnet_v2(pretrained: bool = False, **kwargs) -> InceptionResnetV2:
    """Keras ``InceptionResNetV2``."""
    return _create("keras_inception_resnet_v2", pretrained, **kwargs)
