"""Model families: one module per family, each registering its models with ``@keras_application``.

Every module of this package is imported (no list to keep): adding a family is adding a file.
Modules whose name starts with ``_`` are helpers and are not imported here.
"""
import importlib
import pkgutil

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
    importlib.import_module(f"{__name__}.{_module}")
