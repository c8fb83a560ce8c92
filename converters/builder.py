"""Building blocks for Keras -> timm mappings: put Keras layers into a timm state dict."""
from __future__ import annotations

import re
from typing import Dict, List, Optional

import numpy as np
import torch

from converters import layouts
from converters.errors import LayerMismatchError
from converters.spec import KerasLayers


class StateDictBuilder:
    """Collects timm parameters from Keras layers and checks every Keras layer was used once."""

    def __init__(self, layers: KerasLayers, model_name: str = ""):
        self.layers = layers
        self.model_name = model_name
        self.state_dict: Dict[str, torch.Tensor] = {}
        self._used: set[str] = set()

    def take(self, keras_name: str) -> Dict[str, np.ndarray]:
        if keras_name not in self.layers:
            raise LayerMismatchError(f"{self.model_name}: Keras layer {keras_name!r} not found in the weight file")
        if keras_name in self._used:
            raise LayerMismatchError(f"{self.model_name}: Keras layer {keras_name!r} mapped twice")
        self._used.add(keras_name)
        return self.layers[keras_name]

    def _put(self, prefix: str, tensors: Dict[str, torch.Tensor]) -> None:
        for key, value in tensors.items():
            full = f"{prefix}.{key}"
            if full in self.state_dict:
                raise LayerMismatchError(f"{self.model_name}: parameter {full} filled twice")
            self.state_dict[full] = value

    def conv(self, keras_name: str, prefix: str) -> Optional[np.ndarray]:
        """Conv2D -> ``prefix.weight`` (+ ``prefix.bias``). Returns the bias array, if any."""
        w = self.take(keras_name)
        tensors = {"weight": layouts.conv(w["kernel"])}
        if "bias" in w:
            tensors["bias"] = layouts.array(w["bias"])
        self._put(prefix, tensors)
        return w.get("bias")

    def conv_bias_into_bn(self, conv_name: str, conv_prefix: str, bn_name: str, bn_prefix: str) -> None:
        """Conv2D with bias followed by BatchNorm, into a bias-free conv: the bias folds into the BN mean."""
        w = self.take(conv_name)
        self._put(conv_prefix, {"weight": layouts.conv(w["kernel"])})
        self.bn(bn_name, bn_prefix, bias_before=w.get("bias"))

    def bn(self, keras_name: str, prefix: str, bias_before: Optional[np.ndarray] = None) -> None:
        self._put(prefix, layouts.batchnorm(self.take(keras_name), bias_before=bias_before))

    def dense(self, keras_name: str, prefix: str) -> None:
        w = self.take(keras_name)
        self._put(prefix, {"weight": layouts.dense(w["kernel"]),
                           "bias": layouts.array(w["bias"])})

    def depthwise(self, keras_name: str, prefix: str) -> None:
        """DepthwiseConv2D -> ``prefix.weight`` (a grouped conv, ``groups=C``) (+ ``prefix.bias``)."""
        w = self.take(keras_name)
        tensors = {"weight": layouts.depthwise(w["kernel"])}  # Keras 3 names it kernel (Keras 2: depthwise_kernel)
        if "bias" in w:
            tensors["bias"] = layouts.array(w["bias"])
        self._put(prefix, tensors)

    def conv_1x1_as_dense(self, keras_name: str, prefix: str) -> None:
        """A 1x1 Conv2D classifier on a pooled 1x1 map (MobileNet's ``conv_preds``, MobileNetV3's
        ``logits``) -> a Linear ``prefix.weight`` (out, in) and ``prefix.bias``."""
        w = self.take(keras_name)
        kernel = w["kernel"]
        if kernel.shape[:2] != (1, 1):
            raise LayerMismatchError(f"{self.model_name}: {keras_name!r} is a {kernel.shape[0]}x{kernel.shape[1]} "
                                     "conv, not a 1x1 classifier")
        self._put(prefix, {"weight": layouts.dense(kernel[0, 0]), "bias": layouts.array(w["bias"])})

    def separable(self, keras_name: str, depthwise_prefix: str, pointwise_prefix: str) -> None:
        """SeparableConv2D -> depthwise conv + pointwise conv (bias, if any, on the pointwise)."""
        w = self.take(keras_name)
        self._put(depthwise_prefix, {"weight": layouts.depthwise(w["depthwise_kernel"])})
        pointwise = {"weight": layouts.pointwise(w["pointwise_kernel"])}
        if "bias" in w:
            pointwise["bias"] = layouts.array(w["bias"])
        self._put(pointwise_prefix, pointwise)

    def raw(self, key: str, value: torch.Tensor) -> None:
        if key in self.state_dict:
            raise LayerMismatchError(f"{self.model_name}: parameter {key} filled twice")
        self.state_dict[key] = value

    def finish(self) -> Dict[str, torch.Tensor]:
        unused = [name for name in self.layers if name not in self._used]
        if unused:
            raise LayerMismatchError(f"{self.model_name}: Keras layers left unmapped: {unused[:10]}")
        return self.state_dict


def auto_named(layers: KerasLayers, base: str) -> List[str]:
    """Keras auto-named layers ``base``, ``base_1``, ``base_2``, ... sorted into creation order."""
    pattern = re.compile(rf"{re.escape(base)}(?:_(\d+))?$")
    found = [(int(m.group(1) or 0), name) for name in layers if (m := pattern.match(name))]
    return [name for _, name in sorted(found)]


def block_count(layers: KerasLayers, stage: int) -> int:
    """Number of ``conv{stage}_block{i}`` blocks (Keras ResNet / DenseNet naming)."""
    return max(int(m.group(1)) for n in layers if (m := re.match(rf"conv{stage}_block(\d+)_1_conv$", n)))


def pair_auto_named(b: StateDictBuilder, prefixes: List[str], conv: str = "conv", bn: str = "bn") -> None:
    """The i-th auto-named Keras ``conv2d`` / ``batch_normalization`` -> ``prefixes[i].conv`` / ``.bn``.

    For networks whose convs Keras leaves unnamed (InceptionV3, InceptionResNetV2): Keras creates
    them in the order timm registers its ``ConvNormAct`` modules.
    """
    convs, bns = auto_named(b.layers, "conv2d"), auto_named(b.layers, "batch_normalization")
    if not len(convs) == len(bns) == len(prefixes):
        raise LayerMismatchError(f"{b.model_name}: {len(convs)} unnamed Keras convs and {len(bns)} BatchNorms, "
                                 f"timm has {len(prefixes)} conv blocks")
    for conv_name, bn_name, prefix in zip(convs, bns, prefixes):
        b.conv(conv_name, f"{prefix}.{conv}")
        b.bn(bn_name, f"{prefix}.{bn}")
