"""Keras VGG16 / VGG19: timm's VGG, with the head that Keras has.

The convolutional body is timm's as is: Keras's 3x3 ``same`` convs (with bias, ReLU) and
2x2/2 ``valid`` max pools are timm's ``features`` (padding 1, ``MaxPool2d(2, 2)``), at any input size.

The head is where they differ:

* With the Keras top (``include_top=True``) Keras runs ``Flatten -> fc1 (4096, ReLU) -> fc2 (4096,
  ReLU) -> predictions``. timm's ``pre_logits`` ``ConvMlp`` (a 7x7 conv, then a 1x1 conv) followed
  by ``head`` is exactly that at the native 224 input (7x7 ``block5_pool``), provided ``fc1``'s
  kernel is reshaped in Keras's channels-last flatten order (``converters.layouts.flatten_dense_to_conv``).
  Keras has no dropout there; neither do we (``drop_rate=0``).
* Without the top, Keras's features are ``block5_pool`` (``forward_features``) and its pooled
  features (``include_top=False, pooling='avg'``) are their global average: 512 wide, no fc1 / fc2.
  timm's VGG would instead run the 4096-wide ``ConvMlp`` in every head. So ``KerasVGG`` has the
  ``pre_logits`` MLP only with the Keras top: ``keras_top=None`` (default) means "the Keras top iff
  ``num_classes == 1000``", the same rule ``create_backbone`` uses to pick the top or notop weight
  file. ``num_classes=0`` then gives the 512-d Keras pooled features, and any other ``num_classes``
  a fresh ``Linear(512, num_classes)`` on them (the usual Keras transfer-learning head).
  ``reset_classifier(num_classes)`` follows the same rule, so a reset model has exactly the
  structure (and state-dict keys) of one created with that ``num_classes``.
"""
from __future__ import annotations

from typing import Any, List, Optional, Union

import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vgg import VGG, ConvMlp, cfgs

from lightning_app.zoo.archs._cfg import keras_cfg

KERAS_TOP_CLASSES = 1000
KERAS_HIDDEN = 4096  # fc1 / fc2 width
KERAS_TOP_KERNEL = 7  # block5_pool is 7x7 at 224: fc1 as a 7x7 conv


class KerasVGG(VGG):
    """timm's VGG whose ``pre_logits`` (Keras ``fc1``, ``fc2``) exists only with the Keras top.

    Args:
        keras_top: build Keras's ``fc1``/``fc2`` before the classifier. ``None`` (default): iff
            ``num_classes == 1000`` (Keras ``include_top=True``); otherwise the head pools
            ``block5_pool`` globally (Keras ``pooling='avg'``) and applies a ``Linear(512, num_classes)``
            (none if ``num_classes == 0``).
        Other arguments are timm's ``VGG``'s.
    """

    def __init__(self, cfg: List[Any], num_classes: int = KERAS_TOP_CLASSES, keras_top: Optional[bool] = None,
                 global_pool: str = "avg", drop_rate: float = 0.0, mlp_ratio: float = 1.0, **kwargs: Any):
        keras_top = num_classes == KERAS_TOP_CLASSES if keras_top is None else bool(keras_top)
        if not keras_top:
            # timm's VGG always builds the MLP head (25088 x 4096 for fc1); it is replaced right below,
            # so build it as small as possible (hidden width 1) instead of allocating ~400 MB for nothing.
            mlp_ratio = 1.0 / KERAS_HIDDEN
        super().__init__(cfg, num_classes=num_classes, global_pool=global_pool, drop_rate=drop_rate,
                         mlp_ratio=mlp_ratio, **kwargs)
        self.keras_top = True
        if not keras_top:
            self._set_head(num_classes, global_pool, keras_top=False)

    def _set_head(self, num_classes: int, global_pool: Optional[str], keras_top: bool) -> None:
        dd = get_device_dtype(self)
        if global_pool is None:
            global_pool = self.head.global_pool.pool_type
        if keras_top and not self.keras_top:
            pre_logits = ConvMlp(self.num_features, KERAS_HIDDEN, KERAS_TOP_KERNEL, drop_rate=self.drop_rate, **dd)
            for m in pre_logits.modules():  # timm VGG's init
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                    nn.init.constant_(m.bias, 0)
            self.pre_logits = pre_logits.train(self.training)
        elif not keras_top:
            self.pre_logits = nn.Identity()
        in_features = KERAS_HIDDEN if keras_top else self.num_features
        if keras_top == self.keras_top and self.head.in_features == in_features:
            self.head.reset(num_classes, global_pool, **dd)  # timm's behaviour: fresh classifier only
        else:
            self.head = ClassifierHead(in_features, num_classes, pool_type=global_pool, drop_rate=self.drop_rate,
                                       **dd).train(self.training)
            if num_classes > 0:
                nn.init.normal_(self.head.fc.weight, 0, 0.01)
                nn.init.constant_(self.head.fc.bias, 0)
        self.keras_top = keras_top
        self.num_classes = num_classes
        self.head_hidden_size = self.head.num_features

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None,
                         keras_top: Optional[bool] = None) -> None:
        """New classifier; ``keras_top`` as in the constructor (default: Keras top iff 1000 classes).

        Keeping the Keras top keeps the current ``fc1``/``fc2`` and replaces ``predictions`` only;
        dropping it leaves the classifier on the 512-d global average of ``block5_pool``.
        """
        keras_top = num_classes == KERAS_TOP_CLASSES if keras_top is None else bool(keras_top)
        self._set_head(num_classes, global_pool, keras_top)

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if isinstance(self.pre_logits, nn.Identity):
            self.keras_top = False
        return take_indices


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> KerasVGG:
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3, 4, 5))  # as timm's VGG: 5 stage outputs + final pool
    return build_model_with_cfg(
        KerasVGG, variant, pretrained, model_cfg=cfgs[variant.removeprefix("keras_")],
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **kwargs,
    )


default_cfgs = generate_default_cfgs({
    "keras_vgg16.keras_in1k": keras_cfg("VGG16", classifier="head.fc", pool_size=(7, 7)),
    # VGG19 has VGG16's input size and preprocessing; it is not in the zoo table (no parity entry yet).
    "keras_vgg19.keras_in1k": keras_cfg("VGG16", classifier="head.fc", pool_size=(7, 7),
                                        notes=("Keras VGG19, preprocessing mode 'caffe'",)),
})


@register_model
def keras_vgg16(pretrained: bool = False, **kwargs: Any) -> KerasVGG:
    """Keras ``VGG16``."""
    return _create("keras_vgg16", pretrained, **kwargs)


@register_model
def keras_vgg19(pretrained: bool = False, **kwargs: Any) -> KerasVGG:
    """Keras ``VGG19`` (same layout as VGG16; the ``vgg`` mapping handles both)."""
    return _create("keras_vgg19", pretrained, **kwargs)
