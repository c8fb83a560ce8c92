"""Freed CPU memory kept for reuse (``lightning_app.host_memory``): process-wide, so each case runs in a fresh
interpreter."""
import subprocess
import sys
import textwrap

import pytest
import torch

from lightning_app.host_memory import _glibc

pytestmark = pytest.mark.skipif(_glibc() is None, reason="glibc's malloc only")

# 20 rounds of a 48 MB tensor (above glibc's largest mmap threshold, 32 MiB) allocated, written and freed; the
# page faults of the last 5 rounds (glibc's aligned allocations settle within ~8 rounds, see the module)
CHURN = textwrap.dedent("""
    import resource, sys, torch
    from lightning_app.host_memory import keep_freed_memory
    print(keep_freed_memory())
    faults = []
    for _ in range(20):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t = torch.empty(12_000_000).fill_(1.0)
        del t
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(sum(faults[-5:]))
""")


def _run(env_value):
    import os

    env = dict(os.environ)
    env.pop("LIGHTNING_APP_MALLOC", None)
    if env_value is not None:
        env["LIGHTNING_APP_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", CHURN], capture_output=True, text=True, env=env, check=True)
    applied, faults = out.stdout.split()
    return applied == "True", int(faults)


def test_large_blocks_are_reused_without_page_faults():
    applied, faults = _run(None)
    assert applied
    assert faults < 100  # 5 x 48 MB on fresh pages would be ~58,000 faults


def test_system_setting_leaves_glibc_alone():
    applied, faults = _run("system")
    assert not applied
    assert faults > 5 * 11_000  # every round faults its ~11,700 pages in again: what the setting removes


def test_feature_extraction_and_every_module_stage_make_the_cpu_settings(monkeypatch):
    """Extraction runs its own predict loop before the TransferModule's stages: both make the CPU settings (freed
    memory kept, denormals flushed) through ``lightning_app.cpu_settings``."""
    import torch.nn as nn

    import lightning_app.cpu_settings as cpu_settings
    import lightning_app.data.features as features
    import lightning_app.module as module

    calls = []
    monkeypatch.setattr(cpu_settings, "keep_freed_memory", lambda: calls.append("memory"))
    monkeypatch.setattr(cpu_settings, "flush_denormals", lambda: calls.append("denormals") or True)
    features.FeatureExtractor(nn.Identity()).setup("predict")  # no Trainer: device not known, settings made
    assert calls == ["denormals", "memory"]
    cpu_settings.apply_cpu_settings(torch.device("cuda"))  # a run on a GPU keeps glibc's and the CPU's defaults
    cpu_settings.apply_cpu_settings("cpu")
    assert calls == ["denormals", "memory"] * 2
    assert "apply_cpu_settings" in module.TransferModule.setup.__code__.co_names  # every stage, before its branches


def test_cpu_settings_follow_the_trainers_device_in_setup():
    """In ``setup`` the module is still on the CPU; the settings follow the Trainer's root device instead."""
    import pytorch_lightning as pl
    import torch.nn as nn

    import lightning_app.data.features as features
    from lightning_app.cpu_settings import trainer_device

    extractor = features.FeatureExtractor(nn.Identity())
    assert trainer_device(extractor) is None
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    extractor.trainer = trainer
    assert trainer_device(extractor) == torch.device("cpu")
