"""Keras Applications weights -> timm state dicts (safetensors), with parity checks: a library.

``h5`` reads Keras weight files with h5py alone, ``manifest`` records Keras's layer order,
``align`` pairs a file's layers with it (by order, names checked), ``layouts`` and ``builder``
put Keras arrays into timm state dicts, ``convert`` does a whole file, ``parity`` proves a
conversion against Keras itself. Models are described by the caller (``spec.KerasModelSpec``,
e.g. a ``lightning_app.zoo`` entry); the library never imports ``lightning_app``.
"""

CONVERTER_VERSION = "2"  # 2: a conv bias folded into a BatchNorm mean is subtracted in float64, rounded once
