"""Keras Applications weights -> timm state dicts (safetensors), with parity checks."""

CONVERTER_VERSION = "1"
