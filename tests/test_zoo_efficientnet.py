"""EfficientNet's built-in Normalization: the converter accepts only values that normalise as ours does."""
import numpy as np
import pytest

from converters.builder import StateDictBuilder
from converters.errors import LayerMismatchError
from lightning_app.zoo.families.efficientnet import IMAGENET_MEAN, IMAGENET_STD, _check_normalization, keras_blocks


def _layers(mean, variance):
    return {"normalization": {"mean": np.asarray(mean, np.float32), "variance": np.asarray(variance, np.float32),
                              "count": np.asarray(0, np.int64)}}


@pytest.mark.parametrize("variance", [IMAGENET_STD, np.square(IMAGENET_STD)], ids=["official", "weights_none_graph"])
def test_imagenet_normalization_is_accepted(variance):
    b = StateDictBuilder(_layers(IMAGENET_MEAN, variance), "EfficientNetB0")
    _check_normalization(b)
    assert b.finish() == {}  # taken (no parameters: our Normalize applies it)


@pytest.mark.parametrize("mean, variance", [((0, 0, 0), (1, 1, 1)), (IMAGENET_MEAN, (1, 1, 1)),
                                            ((0.5, 0.5, 0.5), IMAGENET_STD)])
def test_other_normalization_is_refused(mean, variance):
    with pytest.raises(LayerMismatchError, match="Normalization layer 'normalization' holds mean"):
        _check_normalization(StateDictBuilder(_layers(mean, variance), "EfficientNetB0"))


def test_keras_blocks_in_stage_then_repeat_order():
    layers = {n: {} for n in ("block10a_dwconv", "block2b_bn", "block2a_bn", "block1a_dwconv", "top_conv")}
    assert keras_blocks(layers) == [("block1a_", "blocks.0.0"), ("block2a_", "blocks.1.0"),
                                    ("block2b_", "blocks.1.1"), ("block10a_", "blocks.9.0")]

