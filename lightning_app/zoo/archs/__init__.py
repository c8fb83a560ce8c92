"""timm architectures that reproduce Keras Applications models exactly.

Importing this package registers them with timm (``timm.create_model("keras_...")``).
"""
import importlib

for _module in ("inception_v3", "inception_resnet_v2", "nasnet", "xception", "densenet", "vgg", "resnet", "resnet_v2"):
    try:
        importlib.import_module(f"{__name__}.{_module}")
    except ModuleNotFoundError as err:  # family not written yet
        if err.name != f"{__name__}.{_module}":
            raise
