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

Mapping (timm's VGG layout): ``blockB_convK`` -> ``features.i``, where ``i`` counts timm's ``Sequential``: each conv is followed by
a ReLU (2 modules) and each block ends with a max pool (1 module). With the top, ``fc1`` (a Dense on
Keras's channels-last Flatten of the 7x7x512 ``block5_pool``) becomes timm's 7x7 conv
``pre_logits.fc1`` (reshaped in channels-last order: a naive NCHW reshape scrambles it), ``fc2`` the
1x1 conv ``pre_logits.fc2`` and ``predictions`` the Linear ``head.fc``. The notop files have no
fc1/fc2, and neither has the notop model.
"""
from __future__ import annotations

import re
from typing import Any, List, Optional, Union

import torch.nn as nn
from timm.layers import ClassifierHead, get_device_dtype
from timm.models import build_model_with_cfg, register_model
from timm.models.vgg import VGG, ConvMlp, cfgs

from converters import layouts
from converters.builder import StateDictBuilder
from converters.errors import LayerMismatchError
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

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


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras VGG16 / VGG19 layers -> timm ``KerasVGG`` state dict."""
    b = StateDictBuilder(layers, "VGG")
    convs = [(int(m.group(1)), n) for n in layers if (m := re.fullmatch(r"block(\d+)_conv\d+", n))]
    index, block = 0, convs[0][0] if convs else 1
    channels = None
    for conv_block, name in convs:
        if conv_block != block:
            index += 1  # the previous block's max pool
            block = conv_block
        b.conv(name, f"features.{index}")
        channels = layers[name]["kernel"].shape[-1]
        index += 2  # conv + ReLU
    if include_top:
        fc1 = b.take("fc1")
        size = int(round((fc1["kernel"].shape[0] / channels) ** 0.5))
        if size * size * channels != fc1["kernel"].shape[0]:
            raise LayerMismatchError(f"VGG: fc1 kernel {fc1['kernel'].shape} is not a flattened square map "
                                     f"of {channels} channels")
        b.raw("pre_logits.fc1.weight", layouts.flatten_dense_to_conv(fc1["kernel"], size, size, channels))
        b.raw("pre_logits.fc1.bias", layouts.array(fc1["bias"]))
        fc2 = b.take("fc2")
        b.raw("pre_logits.fc2.weight", layouts.dense(fc2["kernel"])[:, :, None, None].contiguous())
        b.raw("pre_logits.fc2.bias", layouts.array(fc2["bias"]))
        b.dense("predictions", "head.fc")
    return b.finish()


_KERAS = dict(mode="caffe", mapping=to_timm, first_conv="features.0", classifier="head.fc",
              cfg=dict(pool_size=(7, 7)))


@register_model
@keras_application("VGG16", size=224, top1=71.268, top5=90.050, **_KERAS,
                   files=tf_kernels("vgg16/vgg16", "64373286793e3c8b2b4e3219cbf3544b", "6d6bbae143d832006294945121d1f1fc"))
def keras_vgg16(pretrained: bool = False, **kwargs: Any) -> KerasVGG:
    """Keras ``VGG16``."""
    return _create("keras_vgg16", pretrained, **kwargs)


@register_model
@keras_application("VGG19", size=224, top1=71.256, top5=89.988, **_KERAS,
                   files=tf_kernels("vgg19/vgg19", "cbe5617147190e668d6c5d5026f83318", "253f8cb515780f3b799900260a226db6"))
def keras_vgg19(pretrained: bool = False, **kwargs: Any) -> KerasVGG:
    """Keras ``VGG19`` (same layout as VGG16; ``to_timm`` handles both)."""
    return _create("keras_vgg19", pretrained, **kwargs)
