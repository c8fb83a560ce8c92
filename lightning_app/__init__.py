"""Transfer learning on Keras-equivalent timm backbones with PyTorch Lightning."""

__version__ = "0.1.0"
