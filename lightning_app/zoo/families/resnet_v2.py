"""Keras ResNet50V2/101V2/152V2: timm's pre-activation ResNetV2, rearranged as Keras builds it.

Differences from timm's ``resnetv2_50/101/152`` and how they are handled:

1. Stem: Keras does conv (7x7/2, with bias) -> zero-pad 1 -> 3x3/2 max pool, with no
   BatchNorm or activation before the pool, so the padded zeros take part in the max. timm's
   ``stem_type='fixed'`` stem is exactly conv -> ``ConstantPad2d(1, 0)`` -> unpadded max pool;
   its conv gets a bias here.
2. Biases: Keras's ``conv1_conv``, ``*_0_conv`` (projection shortcut) and ``*_3_conv`` have
   biases (``*_1_conv`` and ``*_2_conv`` do not, and no BatchNorm follows the biased ones in
   the pre-activation block, so the biases stay as conv biases).
3. Stride placement: Keras strides the LAST block of stages 2-4 (its 3x3 conv, zero-pad 1 +
   valid conv = PyTorch padding 1); timm strides the first block of the next stage. The
   projection shortcut (``*_0_conv``, on the pre-activated input) sits in the FIRST block of
   every stage and is never strided.
4. The strided blocks have an identity shortcut subsampled by ``MaxPool2d(1, stride 2)`` of the
   raw (not pre-activated) input.
5. BatchNorm eps 1.001e-5 (Keras) and momentum 0.01 (= 1 - Keras's 0.99); final ``post_bn`` +
   ReLU is timm's ``norm`` (a ``BatchNormAct2d``).

Stage outputs therefore sit at strides 8, 16, 32, 32 (Keras's ``conv{2..5}_block*_out``), and
``feature_info`` says so. Only ``output_stride=32`` is supported.

Mapping (``KerasResNetV2`` layout): Keras ``conv{s}_block{b}_*`` -> ``stages.{s-2}.blocks.{b-1}.*``: ``preact_bn`` -> ``norm1``,
``1_conv`` -> ``conv1``, ``1_bn`` -> ``norm2``, ``2_conv`` -> ``conv2``, ``2_bn`` -> ``norm3``,
``3_conv`` -> ``conv3`` (with bias), ``0_conv`` -> ``downsample.conv`` (with bias). The stem
``conv1_conv`` (with bias) -> ``stem.conv``, ``post_bn`` -> ``norm``, and the ``predictions``
Dense -> timm's 1x1 conv classifier ``head.fc``.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
from timm.layers import BatchNormAct2d, calculate_drop_path_rates, create_conv2d, get_act_layer, get_norm_act_layer
from timm.models import build_model_with_cfg, register_model
from timm.models.resnetv2 import DownsampleConv, PreActBottleneck, ResNetStage, ResNetV2

from converters import layouts
from converters.builder import StateDictBuilder, block_count
from converters.spec import KerasLayers
from lightning_app.zoo.registry import keras_application, tf_kernels

KERAS_BN_EPS = 1.001e-5
KERAS_BN_MOMENTUM = 0.01  # PyTorch momentum = 1 - Keras momentum (0.99)


def _keras_norm_act():
    """Keras BatchNormalization (+ ReLU where timm's BatchNormAct2d applies one)."""
    return partial(BatchNormAct2d, eps=KERAS_BN_EPS, momentum=KERAS_BN_MOMENTUM)


class KerasPreActBottleneck(PreActBottleneck):
    """Keras ``residual_block_v2``: timm's PreActBottleneck with Keras's biases and strided shortcut.

    With a projection (``proj_layer``) the shortcut is a biased 1x1 conv of the pre-activated
    input; without one and ``stride > 1`` it is ``MaxPool2d(1, stride)`` of the raw input.
    """

    def __init__(
            self,
            in_chs: int,
            out_chs: Optional[int] = None,
            bottle_ratio: float = 0.25,
            stride: int = 1,
            dilation: int = 1,
            first_dilation: Optional[int] = None,
            groups: int = 1,
            act_layer: Optional[Callable] = None,
            conv_layer: Optional[Callable] = None,
            norm_layer: Optional[Callable] = None,
            proj_layer: Optional[Callable] = None,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        dd = {"device": device, "dtype": dtype}
        conv_layer = conv_layer or create_conv2d  # Keras convs: plain (not weight-standardised)
        norm_layer = norm_layer or _keras_norm_act()
        super().__init__(
            in_chs, out_chs, bottle_ratio=bottle_ratio, stride=stride, dilation=dilation,
            first_dilation=first_dilation, groups=groups, act_layer=act_layer, conv_layer=conv_layer,
            norm_layer=norm_layer, proj_layer=proj_layer, drop_path_rate=drop_path_rate, **dd,
        )
        out_chs = self.conv3.out_channels
        # Keras's *_3_conv and *_0_conv have biases.
        self.conv3 = conv_layer(self.conv3.in_channels, out_chs, 1, bias=True, **dd)
        if self.downsample is not None:
            self.downsample.conv = conv_layer(in_chs, out_chs, 1, stride=stride, bias=True, **dd)
            self.shortcut_pool = nn.Identity()
        elif stride > 1:
            self.shortcut_pool = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            if in_chs != out_chs:
                raise ValueError(f"identity shortcut needs in_chs == out_chs, got {in_chs} and {out_chs}")
            self.shortcut_pool = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_preact = self.norm1(x)
        shortcut = self.downsample(x_preact) if self.downsample is not None else self.shortcut_pool(x)
        x = self.conv1(x_preact)
        x = self.conv2(self.norm2(x))
        x = self.conv3(self.norm3(x))
        x = self.drop_path(x)
        return x + shortcut


class KerasResNetStage(ResNetStage):
    """Keras ``stack_residual_blocks_v2``: projection in the first block, stride in the last."""

    def __init__(
            self,
            in_chs: int,
            out_chs: int,
            stride: int,
            depth: int,
            bottle_ratio: float = 0.25,
            block_dpr: Optional[Sequence[float]] = None,
            act_layer: Optional[Callable] = None,
            conv_layer: Optional[Callable] = None,
            norm_layer: Optional[Callable] = None,
            device=None,
            dtype=None,
    ):
        nn.Module.__init__(self)  # ResNetStage's own __init__ strides the first block
        if depth < 2:
            raise ValueError("a Keras ResNetV2 stage has at least 2 blocks")
        self.grad_checkpointing = False
        self.blocks = nn.Sequential()
        prev_chs = in_chs
        for block_idx in range(depth):
            self.blocks.add_module(str(block_idx), KerasPreActBottleneck(
                prev_chs,
                out_chs,
                bottle_ratio=bottle_ratio,
                stride=stride if block_idx == depth - 1 else 1,
                proj_layer=DownsampleConv if block_idx == 0 else None,
                drop_path_rate=block_dpr[block_idx] if block_dpr else 0.,
                act_layer=act_layer,
                conv_layer=conv_layer,
                norm_layer=norm_layer,
                device=device,
                dtype=dtype,
            ))
            prev_chs = out_chs


class KerasResNetV2(ResNetV2):
    """timm's ResNetV2 with Keras's stem biases, stage layout and strided-block shortcuts."""

    def __init__(
            self,
            layers: List[int],
            channels=(256, 512, 1024, 2048),
            num_classes: int = 1000,
            in_chans: int = 3,
            global_pool: str = "avg",
            output_stride: int = 32,
            stem_chs: int = 64,
            act_layer: Callable = nn.ReLU,
            norm_layer: Optional[Callable] = None,
            conv_layer: Callable = create_conv2d,
            drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            device=None,
            dtype=None,
    ):
        if output_stride != 32:
            raise ValueError("Keras ResNetV2 architectures support output_stride=32 only")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or _keras_norm_act()
        # Build timm's stem (type 'fixed': conv -> zero pad 1 -> max pool), post-norm and head
        # around one-block placeholder stages; the Keras stages replace them below.
        super().__init__(
            [1] * len(layers), channels=channels, num_classes=num_classes, in_chans=in_chans,
            global_pool=global_pool, stem_chs=stem_chs, stem_type="fixed", preact=True, act_layer=act_layer,
            norm_layer=norm_layer, conv_layer=conv_layer, drop_rate=drop_rate, zero_init_last=False, **dd,
        )
        norm_act_layer = get_norm_act_layer(norm_layer, act_layer=get_act_layer(act_layer))
        self.stem.conv = conv_layer(in_chans, stem_chs, kernel_size=7, stride=2, bias=True, **dd)

        self.feature_info = [dict(num_chs=stem_chs, reduction=2, module="stem.conv")]
        self.stages = nn.Sequential()
        prev_chs, curr_stride = stem_chs, 4
        block_dprs = calculate_drop_path_rates(drop_path_rate, layers, stagewise=True)
        for stage_idx, (depth, out_chs, dpr) in enumerate(zip(layers, channels, block_dprs)):
            stride = 2 if stage_idx < len(layers) - 1 else 1  # Keras: stride in the last block of stages 2-4
            self.stages.add_module(str(stage_idx), KerasResNetStage(
                prev_chs, out_chs, stride=stride, depth=depth, block_dpr=dpr,
                act_layer=act_layer, conv_layer=conv_layer, norm_layer=norm_act_layer, **dd,
            ))
            prev_chs, curr_stride = out_chs, curr_stride * stride
            self.feature_info.append(dict(num_chs=out_chs, reduction=curr_stride, module=f"stages.{stage_idx}"))
        self.init_weights(zero_init_last=False)


def _create(variant: str, layers, pretrained: bool = False, **kwargs) -> KerasResNetV2:
    return build_model_with_cfg(
        KerasResNetV2, variant, pretrained, layers=layers,
        feature_cfg=dict(flatten_sequential=True), **kwargs,
    )


def to_timm(layers: KerasLayers, include_top: bool) -> dict:
    """Keras ResNetV2 layers -> timm ``KerasResNetV2`` state dict."""
    b = StateDictBuilder(layers, "ResNetV2")
    b.conv("conv1_conv", "stem.conv")
    for stage in (2, 3, 4, 5):
        for i in range(1, block_count(layers, stage) + 1):
            keras, timm = f"conv{stage}_block{i}", f"stages.{stage - 2}.blocks.{i - 1}"
            b.bn(f"{keras}_preact_bn", f"{timm}.norm1")
            if f"{keras}_0_conv" in layers:
                b.conv(f"{keras}_0_conv", f"{timm}.downsample.conv")
            b.conv(f"{keras}_1_conv", f"{timm}.conv1")
            b.bn(f"{keras}_1_bn", f"{timm}.norm2")
            b.conv(f"{keras}_2_conv", f"{timm}.conv2")
            b.bn(f"{keras}_2_bn", f"{timm}.norm3")
            b.conv(f"{keras}_3_conv", f"{timm}.conv3")
    b.bn("post_bn", "norm")
    if include_top:
        w = b.take("predictions")
        b.raw("head.fc.weight", layouts.dense(w["kernel"])[:, :, None, None].contiguous())
        b.raw("head.fc.bias", layouts.array(w["bias"]))
    return b.finish()


_KERAS = dict(mode="tf", mapping=to_timm, first_conv="stem.conv", classifier="head.fc")


@register_model
@keras_application("ResNet50V2", size=224, top1=75.960, top5=93.034, published_size=299, **_KERAS,
                   files=tf_kernels("resnet/resnet50v2", "3ef43a0b657b3be2300d5770ece849e0",
                                    "fac2f116257151a9d068a22e544a4917"))
def keras_resnet50v2(pretrained: bool = False, **kwargs) -> KerasResNetV2:
    """Keras ``ResNet50V2``."""
    return _create("keras_resnet50v2", (3, 4, 6, 3), pretrained, **kwargs)


@register_model
@keras_application("ResNet101V2", size=224, top1=77.234, top5=93.816, published_size=299, **_KERAS,
                   files=tf_kernels("resnet/resnet101v2", "6343647c601c52e1368623803854d971",
                                    "c0ed64b8031c3730f411d2eb4eea35b5"))
def keras_resnet101v2(pretrained: bool = False, **kwargs) -> KerasResNetV2:
    """Keras ``ResNet101V2``."""
    return _create("keras_resnet101v2", (3, 4, 23, 3), pretrained, **kwargs)


@register_model
@keras_application("ResNet152V2", size=224, top1=78.032, top5=94.162, published_size=299,
                   **_KERAS, parity_float64=True,
                   files=tf_kernels("resnet/resnet152v2", "a49b44d1979771252814e80f8ec446f9",
                                    "ed17cf2e0169df9d443503ef94b23b33"))
def keras_resnet152v2(pretrained: bool = False, **kwargs) -> KerasResNetV2:
    """Keras ``ResNet152V2``."""
    return _create("keras_resnet152v2", (3, 8, 36, 3), pretrained, **kwargs)
