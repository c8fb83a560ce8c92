"""The zoo table is derived from the family files: registry, README table, timm configs, no import cycle."""
import subprocess
import sys
from pathlib import Path

import pytest
import timm
from timm.models import register_model

from lightning_app.zoo import REGISTRY, create_backbone, get_entry, list_models, variants_of
from lightning_app.zoo.cli import README, readme_with_table
from lightning_app.zoo.registry import KerasFiles, WeightFile, keras_application

ROOT = Path(__file__).resolve().parents[1]


def test_converters_library_never_imports_lightning_app():
    """Dependencies point one way: importing every converters library module loads no lightning_app module."""
    code = (
        "import importlib, pkgutil, sys, converters\n"
        "mods = [m.name for m in pkgutil.iter_modules(converters.__path__) if m.name != '__main__']\n"
        "assert len(mods) >= 10, mods\n"
        "for m in mods: importlib.import_module('converters.' + m)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'lightning_app')\n"
        "assert not bad, bad\n"
        "print(len(mods))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr


def test_readme_zoo_table_is_generated():
    text = README.read_text()
    assert readme_with_table(text) == text, "README zoo table is stale: python -m converters list --update-readme"


def test_every_entry_is_complete_and_consistent():
    assert list_models() and set(list_models()) <= set(REGISTRY)
    for name, entry in REGISTRY.items():
        assert entry.keras_name == name
        assert entry.manifest_path.is_file(), f"{name}: python -m converters manifest --model {entry.manifest}"
        assert entry.top.file_hash is None or entry.top.hash_algorithm in ("md5", "sha256")
        assert entry.top.filename != entry.notop.filename
        cfg = timm.get_pretrained_cfg(entry.timm_arch)
        assert cfg.first_conv == entry.first_conv and tuple(cfg.mean) == entry.mean
        if entry.variant_of is None:
            assert cfg.input_size == (3, entry.input_size, entry.input_size)
        else:
            assert entry.variant_of in list_models() and name in variants_of(entry.variant_of)
    assert get_entry(REGISTRY[list_models()[0]].timm_arch).keras_name == list_models()[0]


def test_decorator_registers_model_and_size_variant():
    """The family-file API: one decorator under @register_model; size variants; no hash; pretrained_cfg."""
    from lightning_app.zoo import registry

    base = get_entry("ResNet50")
    files = KerasFiles(WeightFile("demo/demo_top.h5", None), WeightFile("demo/demo_notop.h5", None))
    before = dict(registry.REGISTRY)
    try:
        @register_model
        @keras_application("DemoNet", size=64, mode="tf", files=files, top1=None, mapping=base.mapping,
                           first_conv="conv1", classifier="fc", application="ResNet50",
                           sizes=[registry.SizeVariant(32, files, parity=True)])
        def keras_demonet_test(pretrained=False, **kwargs):
            return timm.create_model(base.timm_arch, pretrained=False, **kwargs)

        assert get_entry("demonet").variant_of == "ResNet50"  # a name other than the application's: a variant
        small = get_entry("DemoNet_32")
        assert (small.input_size, small.manifest, small.parity, small.timm_arch) == (32, "DemoNet", True,
                                                                                    "keras_demonet_test")
        assert timm.get_pretrained_cfg("keras_demonet_test").input_size == (3, 64, 64)
        assert create_backbone("DemoNet_32", weights=None).pretrained_cfg["input_size"] == (3, 32, 32)
        with pytest.raises(TypeError, match="below @register_model"):
            keras_application("Other", size=64, mode="tf", files=files, top1=None, mapping=base.mapping,
                              first_conv="conv1")(keras_demonet_test)
        with pytest.raises(KeyError, match="unknown preprocessing mode"):
            keras_application("Other", size=64, mode="bogus", files=files, top1=None, mapping=base.mapping,
                              first_conv="conv1")
    finally:
        registry.REGISTRY.clear()
        registry.REGISTRY.update(before)
        for table in (registry._BY_LOWER, registry._BY_ARCH):
            for key in [k for k, e in table.items() if e.timm_arch == "keras_demonet_test"]:
                del table[key]
