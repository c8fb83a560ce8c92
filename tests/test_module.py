"""TransferModule: normalisation as first layer, forward on images or features, stages, param groups,
weights resolution, metrics."""
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from lightning_app.data import ArrayDataModule
from lightning_app.module import IMAGENET_IF_CACHED, Normalize, TransferModule, build_head, resolve_weights
from lightning_app.zoo import preprocessing

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def tiny_data(classes=3, n=36):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = (rng.random((n, 8, 8, 3)) * 255).astype(np.uint8)
    return ArrayDataModule(images, labels, [str(i) for i in range(classes)], image_size=32, batch_size=6,
                           val_split=0.2, test_split=0.2, num_workers=0)


def test_normalisation_is_the_first_layer_with_the_backbone_preprocessing():
    m = TransferModule("test_resnet", 3, weights=None, inference={"precision": "fp32"})  # eval: the engine's
    mean, std = preprocessing("test_resnet")
    assert list(m.children())[0] is m.normalize
    x = torch.rand(2, 3, 32, 32)
    expected = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(m.normalize(x), expected)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.head(m.backbone(expected)))


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 3, 1, 4), (3, 1, 4, 4)])
def test_normalize_gives_the_same_bits_and_layout_in_channels_last(shape):
    """The channels_last path (rows against the tiled mean / std) computes what broadcasting does, bit for bit,
    returns channels_last, and its gradient is autograd's of the plain form."""
    c = shape[1]
    n = Normalize([0.1, 0.2, 0.3][:c], [0.7, 0.5, 0.3][:c])
    x = torch.rand(*shape).contiguous(memory_format=torch.channels_last)
    ref = (x.contiguous() - n.mean) / n.std
    out = n(x)
    assert torch.equal(out, ref)
    assert out.is_contiguous(memory_format=torch.channels_last)
    xg = x.clone().requires_grad_(True)
    n(xg).square().sum().backward()
    torch.testing.assert_close(xg.grad, 2 * ref / n.std)


def test_zoo_preprocessing_is_keras_mode():
    n = Normalize(*preprocessing("InceptionV3"))  # Keras "tf" mode: x / 127.5 - 1
    x = torch.rand(1, 3, 4, 4)
    torch.testing.assert_close(n(x), x * 2 - 1)


def test_forward_images_and_features():
    m = TransferModule("test_resnet", 5, weights=None, hidden=[16, 8], dropout=0.2).eval()
    assert m(torch.rand(2, 3, 32, 32)).shape == (2, 5)
    assert m(torch.rand(2, m.num_features)).shape == (2, 5)
    with pytest.raises(ValueError, match="expected images"):
        m(torch.rand(2, 3, 32))
    with pytest.raises(TypeError, match="float images"):
        m(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_head_layout():
    head = build_head(10, [6, 4], 0.5, 3)
    kinds = [type(l).__name__ for l in head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear", "ReLU", "Dropout", "Linear"]
    assert [type(l).__name__ for l in build_head(10, [], 0.3, 3)] == ["Dropout", "Linear"]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="stage"):
        TransferModule("test_resnet", 3, weights=None, stage="frozen")
    with pytest.raises(ValueError, match="num_classes"):
        TransferModule("test_resnet", 1, weights=None)


@pytest.mark.parametrize("stage, trainable_backbone", [("extract", False), ("head", False), ("finetune", True)])
def test_stages_set_the_trainable_set(stage, trainable_backbone):
    m = TransferModule("test_resnet", 3, weights=None, stage=stage).train()
    assert all(p.requires_grad == trainable_backbone for p in m.backbone.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    bns = [x for x in m.backbone.modules() if isinstance(x, torch.nn.BatchNorm2d)]
    assert all(bn.training == trainable_backbone for bn in bns)  # frozen BN stays in inference mode


def test_param_groups_and_layer_decay():
    m = TransferModule("resnet18", 3, weights=None, stage="finetune", lr=0.1, backbone_lr_scale=0.5,
                       layer_decay=0.5, optimizer=torch.optim.SGD)
    opt = m.configure_optimizers()
    lrs = [g["lr"] for g in opt.param_groups]
    n = len(m.layer_groups)
    assert len(lrs) == 1 + n == 10
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[-1] == pytest.approx(0.05)  # top backbone group: lr * backbone_lr_scale
    assert lrs[1] == pytest.approx(0.05 * 0.5 ** (n - 1))  # stem: decayed n-1 times
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(m.parameters())) == len({id(p) for p in params})  # every param, once


def test_optimizer_lr_is_used_when_model_lr_is_none():
    from functools import partial

    m = TransferModule("test_resnet", 3, weights=None, optimizer=partial(torch.optim.Adam, lr=0.02),
                       backbone_lr_scale=0.1, stage="finetune")
    opt = m.configure_optimizers()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.02)
    assert opt.param_groups[-1]["lr"] == pytest.approx(0.002)


@pytest.mark.parametrize("stage", ["extract", "head"])
def test_frozen_stages_optimize_only_the_head(stage):
    m = TransferModule("test_resnet", 3, weights=None, stage=stage)
    opt = m.configure_optimizers()
    assert [g["name"] for g in opt.param_groups] == ["head"]
    assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in m.head.parameters()}


def test_plateau_scheduler_monitors_val_loss():
    from functools import partial

    m = TransferModule("test_resnet", 3, weights=None,
                       scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1))
    cfg = m.configure_optimizers()
    assert cfg["lr_scheduler"]["monitor"] == "val_loss"


def test_weights_imagenet_if_cached(monkeypatch):
    import lightning_app.zoo.weights as zw

    monkeypatch.setattr(zw, "is_cached", lambda name, include_top: True)
    assert resolve_weights("ResNet50", IMAGENET_IF_CACHED) == "imagenet"
    monkeypatch.setattr(zw, "is_cached", lambda name, include_top: False)
    with pytest.warns(UserWarning, match="RANDOM initialisation"):
        assert resolve_weights("ResNet50", IMAGENET_IF_CACHED) is None
    with pytest.warns(UserWarning, match="not a zoo model"):
        assert resolve_weights("test_resnet", IMAGENET_IF_CACHED) is None
    assert resolve_weights("ResNet50", "imagenet") == "imagenet"  # explicit: errors surface in create_backbone
    assert resolve_weights("ResNet50", None) is None
    with pytest.warns(UserWarning, match="RANDOM"):
        m = TransferModule("test_resnet", 3, weights=IMAGENET_IF_CACHED)
    assert not m.pretrained


def test_metric_collection_does_not_merge_top1_and_top5():
    """torchmetrics compute groups would merge top-1 and top-5 after a first batch where both agree, and then
    report top-1 for top-5 (and mis-sync it under DDP): the collection must keep them apart."""
    from lightning_app.module import _metrics

    m = _metrics(10, "test_")
    m.update(torch.eye(10)[:4] * 5, torch.arange(4))  # all right: top-1 and top-5 states identical
    logits = torch.zeros(4, 10)
    logits[:, 0] = 3.0
    logits[torch.arange(4), torch.arange(1, 5)] = 2.0  # top-1 wrong, top-5 right
    m.update(logits, torch.arange(1, 5))
    res = m.compute()
    assert res["test_acc"].item() == pytest.approx(0.5)
    assert res["test_top5"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("classes, top5", [(3, False), (7, True)])
def test_metrics_logged_per_split(tmp_path, classes, top5):
    m = TransferModule("test_resnet", classes, weights=None, stage="head")
    t = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    dm = tiny_data(classes, n=7 * classes)
    t.fit(m, dm)
    keys = set(t.callback_metrics)
    for split in ("train", "val"):
        assert {f"{split}_loss", f"{split}_acc", f"{split}_f1"} <= keys
        assert (f"{split}_top5" in keys) == top5
    res = t.test(m, dm, verbose=False)[0]
    assert {"test_loss", "test_acc", "test_f1"} <= set(res)
    assert 0.0 <= res["test_acc"] <= 1.0
    # the logged epoch accuracy equals the accuracy recomputed from predictions
    dm.predict_split = "test"
    preds = t.predict(m, datamodule=dm)
    p = torch.cat([o["preds"] for o in preds])
    y = torch.as_tensor(dm.dataset("test").labels)
    assert res["test_acc"] == pytest.approx((p == y).float().mean().item(), abs=1e-6)


def test_steps_per_execution_matches_one_step_per_batch(tmp_path):
    """K optimizer steps per Lightning step (manual optimization) = the same training as K=1."""
    from functools import partial

    from lightning_app.data.features import FeatureDataModule, FeatureSet

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(50, 96)).astype(np.float32)  # 50 rows: the last chunk and batch are partial
    labels = (feats[:, 0] > 0).astype(np.int64) + (feats[:, 1] > 0)
    states = []
    for k in (1, 4):
        pl.seed_everything(0)
        m = TransferModule("test_resnet", 3, weights=None, stage="extract", hidden=[8], steps_per_execution=k,
                           optimizer=partial(torch.optim.Adam, lr=1e-2),
                           scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5))
        dm = FeatureDataModule(FeatureSet(feats, labels, None), num_classes=3, batch_size=6, steps_per_execution=k)
        t = pl.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_checkpointing=False,
                       enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
        t.fit(m, dm)
        assert t.global_step == 2 * 9  # optimizer steps, either way
        assert t.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25)  # scheduler stepped per epoch
        states.append((m.head.state_dict(), t.callback_metrics["train_loss"].item()))
    for key in states[0][0]:
        torch.testing.assert_close(states[0][0][key], states[1][0][key], rtol=1e-5, atol=1e-6)
    assert states[0][1] == pytest.approx(states[1][1], rel=1e-5)
    with pytest.raises(ValueError, match="steps_per_execution"):
        TransferModule("test_resnet", 3, weights=None, stage="head", steps_per_execution=2)


class _Inverted(torch.utils.data.Dataset):
    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y, index = self.dataset[i]
        return 255 - x, y, index


class _TwoTestLoaders(ArrayDataModule):
    """The test split twice: as it is, and with inverted images (other predictions, so other metric values)."""

    def test_dataloader(self):
        plain = super().test_dataloader()
        return [plain, torch.utils.data.DataLoader(_Inverted(plain.dataset), batch_size=plain.batch_size)]


def test_metrics_are_fed_in_blocks_and_match_the_predictions_per_test_loader(tmp_path, monkeypatch):
    """torchmetrics' updates synchronise with the host (on a GPU: a stall at every step), so the steps keep logits,
    labels and losses on the device and the metrics get them in one block per loop (per test dataloader); the
    logged values still equal those recomputed from each loader's own predictions."""
    from torchmetrics import MeanMetric, MetricCollection

    updates = {"collection": 0, "mean": 0}
    for cls, key in ((MetricCollection, "collection"), (MeanMetric, "mean")):
        real = cls.update

        def counting(self, *args, real=real, key=key, **kwargs):
            updates[key] += 1
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, "update", counting)
    pl.seed_everything(0)
    rng = np.random.default_rng(0)
    n, classes = 60, 4
    dm = _TwoTestLoaders((rng.random((n, 8, 8, 3)) * 255).astype(np.uint8), np.arange(n) % classes,
                         [str(i) for i in range(classes)], image_size=32, batch_size=4, val_split=0.2,
                         test_split=0.2, num_workers=0)
    m = TransferModule("test_resnet", classes, weights=None, stage="finetune")
    t = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    t.fit(m, dm)
    assert t.num_training_batches == 9 and t.num_val_batches == [3]
    assert updates == {"collection": 2, "mean": 2}  # train and val: one block each, not one update per step
    res = t.test(m, dm, verbose=False)
    assert updates == {"collection": 4, "mean": 4}  # one block per test dataloader
    m.eval()
    losses = []
    with torch.no_grad():
        for dl, loader in enumerate(dm.test_dataloader()):
            batches = [dm.on_after_batch_transfer(b, dl) for b in loader]
            logits = torch.cat([m(b[0]) for b in batches])
            y = torch.cat([b[1] for b in batches])
            acc = (logits.argmax(1) == y).float().mean().item()
            loss = torch.nn.functional.cross_entropy(logits, y).item()
            assert res[dl][f"test_acc/dataloader_idx_{dl}"] == pytest.approx(acc, abs=1e-6)
            assert res[dl][f"test_loss/dataloader_idx_{dl}"] == pytest.approx(loss, rel=1e-5)
            losses.append(loss)
    assert abs(losses[0] - losses[1]) > 1e-4 * losses[0]  # mixing the loaders' batches would show


def test_progress_bar_loss_comes_from_the_host_copy():
    """The step loss reaches the progress bar through the host-copy queue: on a GPU the value shown is the newest
    whose copy has completed (a few steps old), so Lightning's per-step conversion of progress-bar values to numbers
    never waits for the device. Here a stand-in queue plays a GPU whose copy of an earlier loss (0.5) is done."""
    m = TransferModule("test_resnet", 3, weights=None, stage="finetune")
    logged, pushed = [], []

    class Queue:
        def push(self, tensors):
            pushed.append([t.clone() for t in tensors])

        def ready(self):
            yield [np.asarray(0.5, dtype=np.float32)]

    m._progress_copies = Queue()
    m.log = lambda name, value, **kw: logged.append((name, value, kw))
    m._logged["train"] = True
    m._log_train(torch.tensor(0.75), batch_idx=0, batch_size=4)
    assert [float(t[0]) for t in pushed] == [0.75]  # this step's loss starts its copy ...
    assert [(name, float(value)) for name, value, _ in logged] == [("loss", 0.5)]  # ... the finished one is shown
    value, kw = logged[0][1], logged[0][2]
    assert value.device.type == "cpu" and kw["prog_bar"] and kw["on_step"] and not kw["on_epoch"]
    m._log_train(torch.tensor(9.0), batch_idx=1, batch_size=4)  # not a reporting step: no new copy
    assert len(pushed) == 1
