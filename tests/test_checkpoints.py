"""Checkpoints you can trust (issue 9, cases 1 and 2): last.ckpt after every epoch and on interruption, written
atomically; a resumed run continues exactly where the interrupted one stopped (same data order, unfrozen groups,
optimizer and RNG state), so its remaining epochs equal an uninterrupted run's; the checkpoint carries what inference
needs and test / predict check the data against it."""
import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from lightning_app.checkpoint import METADATA_KEY, ModelCheckpoint, load_checkpoint, match_data
from lightning_app.data import ArrayDataModule, Augment
from lightning_app.data.sampling import EpochSampler
from lightning_app.errors import CheckpointError, DataMismatchError
from lightning_app.finetune import LayerwiseUnfreezing
from lightning_app.module import TransferModule

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 4


def digest(module) -> str:
    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class Record(pl.Callback):
    """Per epoch: weights digest, trainable parameter count and the (seed, epoch) order the sampler served."""

    def __init__(self):
        self.epochs = {}
        self.first_batch = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.first_batch.setdefault((trainer.current_epoch, batch_idx), batch[2].tolist())

    def on_train_epoch_end(self, trainer, pl_module):
        self.epochs[trainer.current_epoch] = (digest(pl_module),
                                              sum(p.numel() for p in pl_module.parameters() if p.requires_grad))


class StopAt(pl.Callback):
    """Stops the run as SIGTERM does (``how="sigterm"``), as a first Ctrl+C does (``"sigint"``: a real SIGINT to
    this process), or as a crash does (``"crash"``), after ``batch`` batches of ``epoch``."""

    def __init__(self, epoch, batch, how):
        self.epoch, self.batch, self.how = epoch, batch, how

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx + 1 == self.batch:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            elif self.how == "sigint":
                os.kill(os.getpid(), signal.SIGINT)
            else:
                raise RuntimeError("simulated crash")


def datamodule():
    rng = np.random.default_rng(0)
    images = (rng.random((60, 12, 12, 3)) * 255).astype(np.uint8)
    labels = np.arange(60) % 3
    images[labels == 1, :, :6] //= 3  # learnable: class-dependent brightness
    return ArrayDataModule(images, labels, ["a", "b", "c"], image_size=16, batch_size=8, val_split=0.2,
                           test_split=0.0, augment=Augment(hflip=0.5, color_jitter=0.1), seed=3)


def fit(tmp, *callbacks, ckpt_path=None, epochs=EPOCHS):
    pl.seed_everything(0, verbose=False)
    model = TransferModule("test_resnet", num_classes=3, weights=None, stage="finetune", dropout=0.3, lr=3e-3)
    ckpt = ModelCheckpoint(dirpath=tmp, monitor="val_acc", mode="max", save_last=True)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=1, default_root_dir=tmp,
                         callbacks=[ckpt, LayerwiseUnfreezing({1: 1, 2: 2}, train_bn=True), *callbacks])
    trainer.fit(model, datamodule=datamodule(), ckpt_path=ckpt_path)
    return trainer, model


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    rec = Record()
    trainer, model = fit(tmp_path_factory.mktemp("full"), rec)
    return rec, digest(model)


def test_epoch_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=1), EpochSampler(50, seed=1)
    a.set_epoch(3)
    assert list(a) == list(b.order(3)) and list(a) != list(b.order(2))
    assert sorted(a) == list(range(50))
    b.resume_at(3, 20)
    assert list(b) == list(a)[20:] and len(b) == 50
    assert list(b) == list(a)  # the skip applies once
    assert list(EpochSampler(5, shuffle=False)) == [0, 1, 2, 3, 4]


def test_last_ckpt_is_written_every_epoch(tmp_path):
    """Lightning 2.6 rewrites last.ckpt only when the monitored metric improves (a 2-epoch run left it at epoch 0)."""
    class ValAccGetsWorse(pl.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            trainer.callback_metrics["val_acc"] = torch.tensor(1.0 - trainer.current_epoch / 10)

    seen = []

    class Watch(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            pass

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch:
                seen.append(torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"])

    fit(tmp_path, ValAccGetsWorse(), Watch(), epochs=3)
    assert seen == [0, 1]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["epoch"] == 2
    assert len(list(tmp_path.glob("epoch=*.ckpt"))) == 1  # top-1 by val_acc: still epoch 0's
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave no temporary files


@pytest.mark.parametrize("how", ["sigterm", "sigint"])
def test_stop_mid_epoch_then_resume_equals_uninterrupted(how, uninterrupted, tmp_path):
    """Stopped (SIGTERM / first Ctrl+C) after batch 3 of epoch 2: last.ckpt holds that batch boundary; the resumed
    run trains the rest of epoch 2 on the same samples in the same order, with the same unfrozen groups, optimizer
    and RNG state, and every later epoch equals the uninterrupted run's, bit for bit."""
    full, final = uninterrupted
    stopped = Record()
    with pytest.raises(SystemExit) as exc:  # Lightning's SIGTERMException is a SystemExit
        fit(tmp_path, stopped, StopAt(2, 3, how))
    assert type(exc.value).__name__ == "SIGTERMException"
    note = exc.value.lightning_app_note
    assert ("Ctrl+C" if how == "sigint" else "SIGTERM") in note and "resumes at epoch 2, batch 3" in note
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # our Ctrl+C handler is gone
    assert {e: stopped.epochs[e] for e in (0, 1)} == {e: full.epochs[e] for e in (0, 1)}
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["ArrayDataModule"]["train_position"] == {"epoch": 2, "batches": 3}

    resumed = Record()
    _, model = fit(tmp_path, resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert sorted(resumed.epochs) == [2, 3]
    assert resumed.epochs == {e: full.epochs[e] for e in (2, 3)}  # weights and trainable groups
    assert resumed.first_batch[(2, 3)] == full.first_batch[(2, 3)]  # continues with batch 3 of epoch 2
    assert digest(model) == final


def test_crash_in_epoch_2_resumes_from_end_of_epoch_1(uninterrupted, tmp_path):
    """A crash (or SIGKILL) mid-epoch does not touch last.ckpt: it holds the end of epoch 1, and the resumed run
    redoes epoch 2 from epoch 2's starting weights and ends where the uninterrupted run ends."""
    full, final = uninterrupted
    with pytest.raises(RuntimeError, match="simulated crash"):
        fit(tmp_path, StopAt(2, 3, "crash"))
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["ArrayDataModule"]["train_position"] == {"epoch": 2, "batches": 0}
    resumed = Record()
    _, model = fit(tmp_path, resumed, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.epochs == {e: full.epochs[e] for e in (2, 3)}
    assert resumed.first_batch[(2, 0)] == full.first_batch[(2, 0)]
    assert digest(model) == final


def test_checkpoint_carries_what_inference_needs(uninterrupted, tmp_path):
    fit(tmp_path, epochs=1)
    meta = load_checkpoint(tmp_path / "last.ckpt")[METADATA_KEY]
    assert meta["class_names"] == ["a", "b", "c"] and meta["num_classes"] == 3
    assert meta["input_size"] == [16, 16] and meta["resize"] == "squash" and meta["antialias"] is False
    assert meta["backbone"] == "test_resnet" and meta["preprocessing"]["mean"] == [0.5, 0.5, 0.5]
    assert meta["weights"]["configured"] is None and meta["weights"]["resolved"] is None
    assert meta["versions"]["torch"] == torch.__version__
    model = TransferModule.load_from_checkpoint(tmp_path / "last.ckpt")
    assert model.class_names == ["a", "b", "c"]


def test_truncated_or_foreign_checkpoint_is_a_checkpoint_error(tmp_path):
    fit(tmp_path, epochs=1)
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(tmp_path / "cut.ckpt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.ckpt")


def test_data_checked_against_the_checkpoint():
    meta = {"class_names": ["a", "b", "c"], "num_classes": 3, "input_size": [64, 64], "resize": "squash"}
    dm = datamodule()  # classes a, b, c at 16 px
    notices = match_data(meta, dm)
    assert dm.image_size == (64, 64) and "resized to 64x64" in notices[0]
    renamed = dict(meta, class_names=["a", "b", "z"])
    with pytest.raises(DataMismatchError, match=r"missing from the data: 'z'; not known to the model: 'c'"):
        match_data(renamed, datamodule())
    with pytest.raises(DataMismatchError, match="another order"):
        match_data(dict(meta, class_names=["c", "b", "a"]), datamodule())
    match_data(renamed, datamodule(), labelled=False)  # predict: labels unused, the model's classes are named
    dm.setup()
    with pytest.raises(DataMismatchError, match="set data.init_args.image_size to 32"):
        match_data(dict(meta, input_size=[32, 32]), dm)  # already loaded at 64: cannot adapt any more


def _cli_config(tmp_path, epochs):
    cfg = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    cfg["trainer"].update(max_epochs=epochs, limit_train_batches=6, limit_val_batches=2, enable_progress_bar=False,
                          default_root_dir=str(tmp_path))
    cfg["trainer"]["logger"]["init_args"].update(save_dir=str(tmp_path / "runs"), version="v")
    cfg["model"].update(backbone="test_resnet", weights=None)
    cfg["model"]["scheduler"]["init_args"]["T_max"] = epochs
    cfg["data"]["init_args"].update(image_size=16, batch_size=16)
    cfg["test_after_fit"] = False
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_cli_run_killed_in_epoch_2_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    """A real process, SIGKILLed while training epoch 2 (after last.ckpt of epoch 1 appeared); `fit --ckpt_path
    last.ckpt` continues at epoch 2 and its final weights equal those of a run that was never interrupted."""
    # ROOT first, then whatever the caller's PYTHONPATH holds (the GPU machine's carried wheels live there)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "lightning_app", "fit"]
    killed = tmp_path / "killed"
    killed.mkdir()
    cfg = _cli_config(killed, 4)
    last = killed / "runs" / "quickstart" / "v" / "checkpoints" / "last.ckpt"
    proc = subprocess.Popen([*cmd, "--config", str(cfg)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None:
            if last.is_file() and torch.load(last, weights_only=True)["epoch"] >= 1:
                break
            time.sleep(0.05)
        proc.kill()
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert last.is_file(), f"the run ended (exit code {proc.returncode}) before writing {last}: {err[-3000:]}"
    killed_in = torch.load(last, weights_only=True)["epoch"] + 1
    assert killed_in in (2, 3), f"the run was not killed while training epoch 2 or 3 (last.ckpt: {killed_in - 1})"
    out = subprocess.run([*cmd, "--config", str(cfg), "--ckpt_path", str(last)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]

    full = tmp_path / "full"
    full.mkdir()
    out = subprocess.run([*cmd, "--config", str(_cli_config(full, 4))], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    a = torch.load(last, weights_only=True)
    b = torch.load(full / "runs" / "quickstart" / "v" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 3
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in b["state_dict"])
