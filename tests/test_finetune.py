"""Layer groups, Keras-frozen BatchNorm, the unfreezing schedule, and resume after an unfreeze."""
import warnings

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, ModelCheckpoint

from lightning_app.data import ArrayDataModule
from lightning_app.finetune import (
    LayerwiseUnfreezing,
    bn_is_frozen,
    freeze_group,
    layer_groups,
    parse_schedule,
    unfreeze_group,
    unfrozen_at,
)
from lightning_app.module import TransferModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class OrderedDigits(ArrayDataModule):
    """Tiny in-memory set whose training order does not depend on RNG state (exact resume comparisons)."""

    def train_dataloader(self):
        return self._loader(self.dataset("train"))  # in order


def tiny_data(n=48, classes=3, size=32, batch_size=8, cls=ArrayDataModule):
    rng = np.random.default_rng(0)
    labels = np.arange(n) % classes
    images = (rng.random((n, 12, 12, 3)) * 80 + labels[:, None, None, None] * 60).astype(np.uint8)
    return cls(images, labels, [f"c{i}" for i in range(classes)], image_size=size, batch_size=batch_size,
               val_split=0.25, test_split=0.0, num_workers=0)


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


def trainable_names(module):
    return sorted(n for n, p in module.named_parameters() if p.requires_grad)


def bn_stats(module):
    return {n: b.clone() for n, b in module.backbone.named_buffers() if "running" in n}


# --------------------------------------------------------------------------- groups and schedule
@pytest.mark.parametrize("name, coarse, expected", [("resnet18", False, 9), ("resnet18", True, 5), ("test_resnet", False, 5)])
def test_layer_groups_cover_every_parameter_in_order(name, coarse, expected):
    import timm

    model = timm.create_model(name, num_classes=0)
    groups = layer_groups(model, coarse=coarse)
    assert len(groups) == expected
    names = [n for g in groups for n in g.param_names]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert groups[0].param_names[0].startswith("conv1")  # stem first
    assert groups[-1].param_names[0].startswith("layer4")  # last block last
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert sum(len(g.bn_modules) for g in groups) == n_bn


def test_schedule_parsing_and_counts():
    s = parse_schedule({"3": 1, 6: 2, 9: "all"})
    assert s == {3: 1, 6: 2, 9: "all"}
    assert [unfrozen_at(s, e, 5) for e in (0, 2, 3, 5, 6, 8, 9)] == [0, 0, 1, 1, 3, 3, 5]
    assert unfrozen_at({0: 10}, 0, 4) == 4
    for bad in ({-1: 1}, {1: 0}, {1: "some"}, {"x": 1}):
        with pytest.raises(ValueError):
            parse_schedule(bad)


def test_freeze_unfreeze_group_bn_semantics():
    m = TransferModule("test_resnet", 3, weights=None, stage="finetune")
    g = m.layer_groups[-1]
    freeze_group(g)
    m.train()  # Lightning / user calls must not flip frozen BN back to training mode
    assert all(not p.requires_grad for p in g.params)
    assert all(bn_is_frozen(bn) and not bn.training for bn in g.bn_modules)
    unfreeze_group(g, train_bn=False)
    m.train()
    bn_param_ids = {id(p) for bn in g.bn_modules for p in bn.parameters()}
    assert all(p.requires_grad == (id(p) not in bn_param_ids) for p in g.params)
    assert all(not bn.training for bn in g.bn_modules)
    unfreeze_group(g, train_bn=True)
    m.train()
    assert all(p.requires_grad for p in g.params)
    assert all(bn.training and not bn_is_frozen(bn) for bn in g.bn_modules)


# --------------------------------------------------------------------------- training behaviour
class Recorder(Callback):
    """Trainable parameter names and BN modes at each epoch start; loss of every training step."""

    def __init__(self):
        self.trainable, self.bn_training, self.losses = {}, {}, []

    def on_train_epoch_start(self, trainer, pl_module):
        self.trainable[trainer.current_epoch] = trainable_names(pl_module)
        self.bn_training[trainer.current_epoch] = [m.training for m in pl_module.backbone.modules()
                                                   if isinstance(m, torch.nn.BatchNorm2d)]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.current_epoch, batch_idx, float(outputs["loss"])))


def test_schedule_unfreezes_from_the_top_and_keeps_bn_frozen(tmp_path):
    dm = tiny_data()
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=1e-2)
    rec = Recorder()
    cb = LayerwiseUnfreezing({1: 1, 2: 2}, train_bn=False)  # Recorder runs after the unfreezer
    stats0 = bn_stats(model)
    trainer(tmp_path, max_epochs=3, callbacks=[cb, rec], limit_train_batches=2, limit_val_batches=1).fit(model, dm)
    groups = model.layer_groups
    head = sorted(f"head.{n}" for n, _ in model.head.named_parameters())
    assert rec.trainable[0] == head
    bn_ids = {id(p) for bn in groups[-1].bn_modules for p in bn.parameters()}
    last = sorted(f"backbone.{n}" for n, p in zip(groups[-1].param_names, groups[-1].params) if id(p) not in bn_ids)
    assert 0 < len(last) < len(groups[-1].params)
    assert rec.trainable[1] == sorted(head + last)
    assert len(rec.trainable[2]) > len(rec.trainable[1])
    assert all(not t for e in rec.bn_training for t in rec.bn_training[e])  # every BN in inference mode
    stats1 = bn_stats(model)
    assert all(torch.equal(stats0[k], stats1[k]) for k in stats0)  # and never updated
    assert cb.num_unfrozen == 3


def test_frozen_bn_statistics_unchanged_after_training_epoch(tmp_path):
    """Head stage: backbone weights and BN running stats stay bit-identical through an epoch; the control
    (fine-tuning with trainable BN) shows the same epoch does change them, so the check can fail."""
    dm = tiny_data()
    frozen = TransferModule("test_resnet", 3, weights=None, stage="head", lr=1e-2)
    before = {k: v.clone() for k, v in frozen.backbone.state_dict().items()}
    trainer(tmp_path, max_epochs=1, limit_val_batches=1).fit(frozen, dm)
    after = frozen.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    head_before = TransferModule("test_resnet", 3, weights=None, stage="head")  # fresh head differs from trained
    assert not torch.equal(head_before.head[-1].weight, frozen.head[-1].weight)

    control = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=1e-2)
    stats0 = bn_stats(control)
    trainer(tmp_path, max_epochs=1, limit_val_batches=1).fit(control, dm)
    stats1 = bn_stats(control)
    assert any(not torch.equal(stats0[k], stats1[k]) for k in stats0 if "running_mean" in k)


def test_callback_requires_finetune_stage(tmp_path):
    model = TransferModule("test_resnet", 3, weights=None, stage="head")
    with pytest.raises(ValueError, match="stage='finetune'"):
        trainer(tmp_path, max_epochs=1, callbacks=[LayerwiseUnfreezing({1: 1})]).fit(model, tiny_data())


# --------------------------------------------------------------------------- resume
def _resume_run(tmp_path, ckpt_path=None, seed=0):
    pl.seed_everything(seed)
    dm = tiny_data(cls=OrderedDigits)
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=3e-3, hidden=[8],
                           layer_decay=0.7, optimizer=torch.optim.AdamW)
    rec = Recorder()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="e{epoch}",
                           save_on_train_epoch_end=True)
    cbs = [LayerwiseUnfreezing({1: 1, 3: 1}, train_bn=True), rec, ckpt]
    t = trainer(tmp_path, max_epochs=3, callbacks=cbs, enable_checkpointing=True, limit_val_batches=1)
    t.fit(model, dm, ckpt_path=ckpt_path)
    return model, rec, t


def test_resume_after_unfreeze_matches_uninterrupted_run(tmp_path):
    full, rec_full, t_full = _resume_run(tmp_path / "a")
    ckpt = tmp_path / "a" / "ckpt" / "eepoch=1.ckpt"  # end of epoch 1: one group unfrozen at epoch 1
    assert ckpt.is_file()
    state = torch.load(ckpt, weights_only=False)
    opt_state = state["optimizer_states"][0]
    assert len(opt_state["param_groups"]) == 1 + len(full.layer_groups)  # stable groups

    resumed, rec_res, t_res = _resume_run(tmp_path / "b", ckpt_path=str(ckpt), seed=123)  # other init: ckpt wins
    # Same trainable set in epoch 2 (the phase came back from the checkpoint, not re-frozen).
    assert rec_res.trainable[2] == rec_full.trainable[2]
    assert len(rec_full.trainable[2]) > len(rec_full.trainable[0])
    # Same next-step loss, and same losses and weights through the rest of the run.
    full_e2 = [l for e, _, l in rec_full.losses if e == 2]
    res_e2 = [l for e, _, l in rec_res.losses if e == 2]
    assert len(res_e2) == len(full_e2) > 1
    np.testing.assert_allclose(res_e2, full_e2, rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_resume_control_without_phase_restore_differs(tmp_path):
    """A callback that forgets its state on resume (like BackboneFinetuning, #21901) re-freezes the backbone;
    the checks above would catch that: the trainable set at epoch 2 differs."""

    class Forgetful(LayerwiseUnfreezing):
        def load_state_dict(self, state_dict):
            pass

        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:  # only reacts at the scheduled epoch itself
                super().on_train_epoch_start(trainer, pl_module)

    _, rec_full, _ = _resume_run(tmp_path / "a")
    pl.seed_everything(0)
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", hidden=[8])
    rec = Recorder()
    t = trainer(tmp_path / "b", max_epochs=3, callbacks=[Forgetful({1: 1, 3: 1}), rec], limit_val_batches=1)
    t.fit(model, tiny_data(cls=OrderedDigits), ckpt_path=str(tmp_path / "a" / "ckpt" / "eepoch=1.ckpt"))
    assert rec.trainable[2] != rec_full.trainable[2]


# --------------------------------------------------------------------------- compiled training forward
class GroupSnapshots(Callback):
    """Weights of the last backbone group and all BatchNorm statistics at each epoch start, and after fit."""

    def __init__(self):
        self.weights, self.stats = {}, {}

    def _take(self, key, pl_module):
        self.weights[key] = [p.detach().clone() for p in pl_module.layer_groups[-1].params]
        self.stats[key] = bn_stats(pl_module)

    def on_train_epoch_start(self, trainer, pl_module):
        self._take(trainer.current_epoch, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._take("end", pl_module)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_unfreezing_after_compilation_trains_the_new_group(tmp_path, backend):
    """The compiled training backbone is built while the backbone is frozen (epoch 0); unfreezing the last group at
    epoch 1 recompiles (requires_grad is guarded): the group's weights then change, frozen BatchNorm statistics do
    not, and the number of compiled graphs stays bounded (one per trainable set and batch shape)."""
    if backend == "inductor" and not torch.cuda.is_available():
        pytest.skip("inductor training graphs take minutes to compile on 2 CPU cores; aot_eager checks the guards")
    # 64 px: test_resnet's last stage is 2x2. At 32 px it is 1x1, where torch 2.11's inductor mispredicts the
    # stride of a channels_last convolution's weight gradient on CUDA (pytorch/pytorch#171622, #175969): an
    # upstream bug of 1x1 feature maps, one reason compile_backbone is opt-in on CUDA (module.CUDA_TRAINING_DEFAULTS)
    dm = tiny_data(n=40, batch_size=8, size=64)  # 30 training images: batches of 8, 8, 8, 6
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=1e-2, compile_backbone=True,
                           compile_kwargs={"backend": backend})
    g = torch.Generator().manual_seed(0)
    for bn in model.backbone.modules():  # like pretrained weights: no zero-initialised residual BN gamma
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.weight.data.uniform_(0.5, 1.5, generator=g)
            bn.running_mean.uniform_(-0.1, 0.1, generator=g)
    snaps = GroupSnapshots()
    cb = LayerwiseUnfreezing({1: 1}, train_bn=False)
    accel = "gpu" if backend == "inductor" else "cpu"
    trainer(tmp_path, accelerator=accel, max_epochs=2, callbacks=[cb, snaps], limit_val_batches=1).fit(model, dm)
    compiled = model.__dict__.get("_compiled_backbone")
    assert compiled is None  # released after fit
    graphs = model._last_compiled_graphs
    assert 2 <= graphs <= 4  # (frozen, last group trainable) x (full, last batch)
    before, after = snaps.weights[1], snaps.weights["end"]
    bn_ids = {id(p) for bn in model.layer_groups[-1].bn_modules for p in bn.parameters()}
    trained = [not torch.equal(a, b) for a, b, p in zip(before, after, model.layer_groups[-1].params)
               if id(p) not in bn_ids]
    assert trained and all(trained)  # every unfrozen weight moved during epoch 1
    assert all(torch.equal(snaps.weights[0][i], before[i]) for i in range(len(before)))  # frozen in epoch 0
    for key in snaps.stats[0]:
        assert torch.equal(snaps.stats[0][key], snaps.stats["end"][key]), key  # frozen BN: inference mode


def test_smallest_spatial_conv_input_probe_moves_nothing():
    """The probe behind the compiled backbone's 1x1 guard: test_resnet's last 3x3 convolutions see 1x1 maps at 32 px
    and 2x2 at 64 px; the probe leaves training flags and BatchNorm statistics as they were."""
    from lightning_app.finetune import smallest_spatial_conv_input

    model = TransferModule("test_resnet", 3, weights=None, stage="finetune")
    model.backbone.train()
    stats = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    assert smallest_spatial_conv_input(model.backbone, torch.rand(1, 3, 32, 32)) == 1
    assert smallest_spatial_conv_input(model.backbone, torch.rand(1, 3, 64, 64)) == 2
    assert all(m.training for m in model.backbone.modules())
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in stats.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the guarded failure is CUDA's)")
def test_compiled_backbone_on_1x1_feature_maps_trains_eagerly_with_a_warning(tmp_path):
    """At 32 px test_resnet's last stage is 1x1, where inductor's compiled convolution backward fails on CUDA
    (torch 2.11): the compiled backbone says so and trains eagerly instead of crashing in backward."""
    dm = tiny_data(n=40, batch_size=8, size=32)
    model = TransferModule("test_resnet", 3, weights=None, stage="finetune", lr=1e-2, compile_backbone=True,
                           compile_kwargs={"backend": "inductor"})
    before = [p.detach().clone() for p in model.backbone.parameters()]
    with pytest.warns(UserWarning, match="1x1 feature map"):
        trainer(tmp_path, accelerator="gpu", max_epochs=1, limit_val_batches=1).fit(model, dm)
    assert any(not torch.equal(a, b.cpu()) for a, b in zip(before, model.backbone.parameters()))


def test_batchnorm_momentum_callback_sets_every_batchnorm_when_fitting():
    """The quickstart's fast BatchNorm statistics for a short run from random init (zoo models keep Keras's)."""
    from lightning_app.errors import ConfigError
    from lightning_app.finetune import BatchNormMomentum

    model = TransferModule("MobileNetV3Small", num_classes=3, weights=None, stage="finetune")
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert norms and {m.momentum for m in norms} == {0.001}  # Keras's 0.999
    BatchNormMomentum(0.1).setup(None, model, "validate")
    assert {m.momentum for m in norms} == {0.001}
    BatchNormMomentum(0.1).setup(None, model, "fit")
    assert {m.momentum for m in norms} == {0.1}
    with pytest.raises(ConfigError, match="momentum must be in"):
        BatchNormMomentum(0.0)
