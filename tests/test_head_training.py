"""Head training on cached features: device-resident rows in the documented order, many optimizer steps per
Lightning step, the same training as the plain DataLoader loop."""
import copy
import warnings
from functools import partial

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from lightning_app.data.feature_loader import FeatureLoader, auto_steps_per_execution, epoch_order
from lightning_app.data.features import FeatureDataModule, FeatureDataset, FeatureSet
from lightning_app import head_steps
from lightning_app.head_steps import EagerHeadSteps, EpochStats, LeanHeadSteps
from lightning_app.module import TransferModule

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")


def _runner(runner_cls, head, optim, label_smoothing=0.0):
    """A :class:`LeanHeadSteps` or :class:`EagerHeadSteps` over ``head`` with cross-entropy at ``label_smoothing``."""
    if runner_cls is LeanHeadSteps:
        return LeanHeadSteps(head, label_smoothing, optim)
    return runner_cls(head, lambda lg, y: F.cross_entropy(lg, y, label_smoothing=label_smoothing), optim)


def features(n=203, dim=96, classes=4, seed=0):  # test_resnet: 96 features
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    feats = (centers[labels] + rng.normal(size=(n, dim))).clip(0, None).astype(np.float32)
    return feats, labels.astype(np.int64)


def trainer(tmp_path, **kw):
    args = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path)
    args.update(kw)
    return pl.Trainer(**args)


@pytest.mark.parametrize("n, world, seed, epoch, shuffle", [(10, 1, 0, 0, True), (203, 1, 7, 3, True),
                                                           (203, 3, 1, 2, True), (11, 4, 0, 1, False),
                                                           (3, 5, 0, 0, True)])
def test_epoch_order_is_distributed_samplers(n, world, seed, epoch, shuffle):
    ds = list(range(n))
    for rank in range(world):
        sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        assert epoch_order(n, epoch, seed, shuffle, rank, world).tolist() == list(sampler)
    if shuffle and n > 3:
        assert epoch_order(n, 0, seed).tolist() != epoch_order(n, 1, seed).tolist()


def test_loader_takes_cache_labels_from_a_read_only_map_silently(tmp_path):
    """The feature cache's labels are a read-only memory map: no "NumPy array is not writable" warning in a user's run."""
    feats, labels = features(n=20)
    np.save(tmp_path / "y.npy", labels)
    mapped = np.load(tmp_path / "y.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loader = FeatureLoader(feats, mapped, batch_size=4)
    assert loader.labels.tolist() == labels.tolist()


def test_loader_chunks_cover_the_epoch_in_order(tmp_path):
    feats, labels = features(n=50)
    np.save(tmp_path / "f.npy", feats)
    mapped = np.load(tmp_path / "f.npy", mmap_mode="r")
    loader = FeatureLoader(mapped, labels, batch_size=6, steps_per_execution=3, seed=5)
    assert loader.resident and isinstance(loader.features, torch.Tensor)
    assert not np.shares_memory(loader.features.numpy(), mapped)  # read into RAM once, not the memory map
    loader.sampler.set_epoch(2)
    chunks = list(loader)
    assert len(chunks) == len(loader) == 3  # 18 + 18 + 14 rows
    assert [c.batch_sizes for c in chunks] == [(6, 6, 6), (6, 6, 6), (6, 6, 2)]
    order = torch.cat([c.index for c in chunks])
    assert order.tolist() == epoch_order(50, 2, 5).tolist()
    x, y = chunks[2].batch(2)
    np.testing.assert_array_equal(x.numpy(), feats[order[-2:].numpy()])
    np.testing.assert_array_equal(y.numpy(), labels[order[-2:].numpy()])
    host = FeatureLoader(feats, labels, 6, 3, seed=5, resident=False)  # rows read on the host per chunk
    host.sampler.set_epoch(2)
    for a, b in zip(host, chunks):
        np.testing.assert_array_equal(a.materialize()[0].numpy(), b.materialize()[0].numpy())


def test_auto_steps_per_execution():
    assert auto_steps_per_execution(1563) == 128
    assert auto_steps_per_execution(40) == 5
    assert auto_steps_per_execution(3) == 1
    fdm = FeatureDataModule(FeatureSet(*features(n=203), None), batch_size=4)
    assert fdm.train_dataloader().steps_per_execution == 6  # 51 steps // 8


def _recording_loss(losses):
    def loss_fn(logits, y, label_smoothing=0.0):
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        losses.append(loss.item())
        return loss
    return loss_fn


def record_step_losses(monkeypatch, losses, runners):
    """Every optimizer step's loss of the chunked path, whichever runner the module picks."""
    import lightning_app.module as module_mod

    def select(*args, **kwargs):
        runner = head_steps.select_head_steps(*args, **kwargs)
        run = runner.run

        def recording_run(chunk):
            out = run(chunk)
            losses.extend(out.losses.tolist())
            return out

        runner.run = recording_run
        runners.append(runner)
        return runner

    monkeypatch.setattr(module_mod, "select_head_steps", select)


class _SeedAtTrainStart(pl.Callback):
    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(1234)  # the dropout stream, as in the plain loop below


@pytest.mark.parametrize("steps_per_execution, smoothing, runner", [(None, 0.0, "lean"), (5, 0.1, "lean"),
                                                                  (1, 0.0, None), (None, 0.0, "eager")])
def test_resident_training_matches_the_plain_loop(tmp_path, monkeypatch, steps_per_execution, smoothing, runner):
    """Same seed, same batches (DistributedSampler's order) and the same initial head: the device-resident chunked
    path gives the plain PyTorch DataLoader loop's loss at every optimizer step (dropout included) and its weights,
    with the written-out CPU step (lean), plain autograd (eager), and one Lightning step per batch (1)."""
    feats, labels = features()
    batch, epochs, seed = 8, 2, 3
    pl.seed_everything(0)
    model = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[16], dropout=0.5,
                           optimizer=partial(torch.optim.Adam, lr=3e-3, fused=True), label_smoothing=smoothing,
                           steps_per_execution=steps_per_execution)
    head0 = {k: v.clone() for k, v in model.head.state_dict().items()}
    ours, runners = [], []
    if runner == "eager":  # a loss of its own: the module falls back to autograd
        model._loss = lambda logits, y: F.cross_entropy(logits, y, label_smoothing=smoothing)
    if steps_per_execution == 1:  # automatic optimization: no runner, record through the loss
        model._loss = lambda logits, y: _recording_loss(ours)(logits, y, smoothing)
    record_step_losses(monkeypatch, ours, runners)
    dm = FeatureDataModule(FeatureSet(feats, labels, None), num_classes=4, batch_size=batch, seed=seed,
                           steps_per_execution=steps_per_execution)
    t = trainer(tmp_path, max_epochs=epochs, callbacks=[_SeedAtTrainStart()])
    t.fit(model, dm)
    steps = epochs * int(np.ceil(len(labels) / batch))
    assert t.global_step == steps and len(ours) == steps
    assert [r.name for r in runners] == ([runner] if runner else [])

    # the plain loop
    head = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[16], dropout=0.5).head
    head.load_state_dict(head0)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3, fused=True)
    ds = FeatureDataset(feats, labels)
    sampler = DistributedSampler(ds, num_replicas=1, rank=0, shuffle=True, seed=seed)
    # own generator: the iterator's base seed must not consume the global (dropout) stream
    loader = DataLoader(ds, batch_size=batch, sampler=sampler, collate_fn=lambda b: b, generator=torch.Generator())
    plain = []
    torch.manual_seed(1234)
    head.train()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for x, y, _ in loader:
            loss = _recording_loss(plain)(head(x), y, smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    np.testing.assert_allclose(ours, plain, rtol=1e-5, atol=1e-6)
    for k, v in head.state_dict().items():
        torch.testing.assert_close(model.head.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    # the logged epoch loss is the mean of the last epoch's step losses (sample-weighted)
    sizes = [min(batch, len(labels) - s) for s in range(0, len(labels), batch)]
    last = np.average(plain[-len(sizes):], weights=sizes)
    assert t.callback_metrics["train_loss"].item() == pytest.approx(last, rel=1e-5)


def test_epoch_metrics_and_validation_on_chunks(tmp_path):
    """train / val metrics logged per epoch from chunked steps equal the metrics recomputed from predictions."""
    feats, labels = features(n=120)
    vfeats, vlabels = features(n=37, seed=1)
    model = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[16],
                           optimizer=partial(torch.optim.Adam, lr=1e-2))
    seen = {}

    class Capture(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen["train_acc"] = trainer.callback_metrics["train_acc"].item()

    dm = FeatureDataModule(FeatureSet(feats, labels, None), FeatureSet(vfeats, vlabels, None), num_classes=4,
                           batch_size=8)
    t = trainer(tmp_path, max_epochs=2, callbacks=[Capture()])
    t.fit(model, dm)
    model.eval()
    with torch.no_grad():
        val_pred = model(torch.from_numpy(vfeats)).argmax(1).numpy()
    assert t.callback_metrics["val_acc"].item() == pytest.approx((val_pred == vlabels).mean(), abs=1e-6)
    assert 0.0 <= seen["train_acc"] <= 1.0  # computed before the epoch-end callbacks read it
    assert set(t.callback_metrics) >= {"train_loss", "train_acc", "train_f1", "val_loss", "val_acc", "val_f1"}


def test_epoch_stats_blocks_equal_one_update():
    from lightning_app.module import _metrics

    rng = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(50, 7, generator=rng), torch.randint(0, 7, (50,), generator=rng)
    whole = _metrics(7, "t_")
    whole.update(logits, labels)
    blocks = _metrics(7, "t_")
    stats = EpochStats(max_elements=7 * 12)  # 12 rows per block: several flushes
    flushed = []

    def flush(lg, lb, loss_sum, count):
        blocks.update(lg, lb)
        flushed.append((count, float(loss_sum)))

    for s in range(0, 50, 9):
        stats.add(logits[s:s + 9], labels[s:s + 9], torch.tensor(float(len(labels[s:s + 9]))), flush)
    stats.drain(flush)
    assert sum(c for c, _ in flushed) == 50 and len(flushed) > 2
    assert all(c == loss for c, loss in flushed)
    for k, v in whole.compute().items():
        torch.testing.assert_close(blocks.compute()[k], v)


def test_eager_runner_counts_steps_and_returns_logits():
    feats, labels = features(n=20)
    loader = FeatureLoader(feats, labels, batch_size=6, steps_per_execution=4, shuffle=False)
    chunk = next(iter(loader))
    head = torch.nn.Linear(feats.shape[1], 4)
    counted = []
    runner = EagerHeadSteps(head, F.cross_entropy, torch.optim.SGD(head.parameters(), lr=0.0), counted.append)
    out = runner.run(chunk)
    assert counted == [4] and out.logits.shape == (20, 4)
    with torch.no_grad():
        expected = head(torch.from_numpy(feats))
    torch.testing.assert_close(out.logits, expected)  # lr 0: every step saw the same weights
    per_batch = [F.cross_entropy(expected[s:s + 6], torch.from_numpy(labels[s:s + 6])) * len(labels[s:s + 6])
                 for s in range(0, 20, 6)]
    torch.testing.assert_close(out.loss_sum, torch.stack(per_batch).sum())


def _fit_recording(tmp_path, monkeypatch, accelerator, graphs, dropout=0.5, epochs=2, n=203, spe=None):
    """Per-step losses and final head of a chunked fit; ``graphs=False`` forces eager steps on CUDA."""
    import lightning_app.module as module_mod

    feats, labels = features(n=n)
    pl.seed_everything(0)
    model = TransferModule("test_resnet", 4, weights=None, stage="extract", hidden=[16], dropout=dropout,
                           optimizer=partial(torch.optim.Adam, lr=3e-3, fused=True),
                           scheduler=partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5),
                           steps_per_execution=spe)
    losses, runners = [], []

    def select(head, loss_fn, opt, device, on_steps, label_smoothing=None):
        runner = (head_steps.select_head_steps(head, loss_fn, opt, device, on_steps, label_smoothing) if graphs
                  else EagerHeadSteps(head, loss_fn, opt, on_steps))
        run = runner.run

        def recording_run(chunk):
            out = run(chunk)
            losses.extend(out.losses.tolist())
            return out

        runner.run = recording_run
        runners.append(runner)
        return runner

    monkeypatch.setattr(module_mod, "select_head_steps", select)
    dm = FeatureDataModule(FeatureSet(feats, labels, None), FeatureSet(*features(n=37, seed=1), None), num_classes=4,
                           batch_size=8, seed=3, steps_per_execution=spe)
    t = trainer(tmp_path, accelerator=accelerator, max_epochs=epochs, callbacks=[_SeedAtTrainStart()])
    t.fit(model, dm)
    return losses, {k: v.cpu() for k, v in model.head.state_dict().items()}, runners, t


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_cuda_graph_steps_match_eager_steps(tmp_path, monkeypatch, dropout):
    """CUDA: the chunks replayed from CUDA graphs (two shapes: full chunks and the last, partial one; an LR scheduler
    stepping between epochs) give the eager steps' losses and weights; dropout draws the same Philox stream."""
    graphed, head_g, runners, t = _fit_recording(tmp_path / "g", monkeypatch, "gpu", True, dropout)
    assert runners[0].name == "cuda-graph" and runners[0].disabled is None
    assert len(runners[0].graphs) == 2  # (8, 8, 8) chunks and the (8, 3) tail; the first chunk ran eagerly
    eager, head_e, _, _ = _fit_recording(tmp_path / "e", monkeypatch, "gpu", False, dropout)
    assert len(graphed) == len(eager) == 2 * 26 and t.global_step == 52
    np.testing.assert_allclose(graphed, eager, rtol=1e-4, atol=1e-6)
    for k in head_e:
        torch.testing.assert_close(head_g[k], head_e[k], rtol=1e-4, atol=1e-5)
    assert 0.0 <= t.callback_metrics["val_acc"].item() <= 1.0


def test_lean_steps_match_eager_steps_cpu(tmp_path, monkeypatch):
    """The same comparison on the CPU (written-out step vs autograd), through the same helper as the CUDA test."""
    lean, head_l, runners, _ = _fit_recording(tmp_path / "l", monkeypatch, "cpu", True)
    assert runners[0].name == "lean"
    eager, head_e, runners_e, _ = _fit_recording(tmp_path / "e", monkeypatch, "cpu", False)
    assert runners_e[0].name == "eager" and len(lean) == len(eager) == 52
    np.testing.assert_allclose(lean, eager, rtol=1e-5, atol=1e-6)
    for k in head_e:
        torch.testing.assert_close(head_l[k], head_e[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mkl", "onednn", "mixed"])
@pytest.mark.parametrize("hidden, dropout, opt", [([], 0.3, "adam"), ([16, 8], 0.2, "adamw"), ([16], 0.0, "amsgrad"),
                                                  ([12], 0.5, "adam-wd")])
def test_lean_step_equals_autograd_for_every_head_layout(monkeypatch, hidden, dropout, opt, mode):
    """The written-out CPU step against autograd on the same chunks: same losses, logits and weights, for heads
    without hidden layers (input dropout), with two hidden layers, without dropout; Adam, AdamW, AMSGrad, L2; with
    its products in MKL, in oneDNN (weight and input gradients, and the forward computed transposed with the
    weight as oneDNN's source: such layers keep ``[out, in]`` weights and moments, the MKL ones the kernel layout),
    and mixed as the CIFAR-10 head runs (hidden layers in oneDNN, the small output layer in MKL)."""
    from lightning_app import linear_fusion
    from lightning_app.head_steps import lean_blocker
    from lightning_app.module import build_head

    if mode != "mkl" and not linear_fusion.available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    onednn_calls = []
    real_linear = linear_fusion.linear
    monkeypatch.setattr(linear_fusion, "onednn_linear_faster", lambda: mode != "mkl")
    # mixed: 8 x 24 x 16, 8 x 16 x 8, 8 x 24 x 12 multiply-adds in oneDNN; the output layers (<= 8 x 24 x 4) in MKL
    monkeypatch.setattr(head_steps, "MIN_ONEDNN_MACS", 1000 if mode == "mixed" else 0)
    monkeypatch.setattr(linear_fusion, "linear",
                        lambda *a, **k: onednn_calls.append(a[0].data_ptr()) or real_linear(*a, **k))

    feats, labels = features(n=70, dim=24)
    kwargs = {"adam": {}, "adamw": {"weight_decay": 0.05}, "amsgrad": {"amsgrad": True}, "adam-wd": {"weight_decay": 0.01}}
    cls = torch.optim.AdamW if opt == "adamw" else torch.optim.Adam
    runs = []
    for runner_cls in (LeanHeadSteps, EagerHeadSteps):
        torch.manual_seed(0)
        head = build_head(24, hidden, dropout, 4).train()
        optim = cls(head.parameters(), lr=1e-2, fused=True, **kwargs[opt])
        assert lean_blocker(head, optim) is None
        runner = _runner(runner_cls, head, optim, 0.05)
        loader = FeatureLoader(feats, labels, batch_size=8, steps_per_execution=4, seed=1)
        torch.manual_seed(7)
        losses, logits = [], []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for chunk in loader:
                out = runner.run(chunk)
                losses += out.losses.tolist()
                logits.append(out.logits)
        runs.append((losses, torch.cat(logits), {k: v.clone() for k, v in head.state_dict().items()}))
        if runner_cls is LeanHeadSteps:
            linears = [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
            dnn = [mode == "onednn" or (mode == "mixed" and lin is not linears[-1]) for lin in linears]
            sources = {lin.weight.data_ptr() for lin in linears}
            for lin, in_dnn in zip(linears, dnn):
                st = optim.state[lin.weight]
                for t in (lin.weight, lin.weight.grad, st["exp_avg"], st["exp_avg_sq"]):
                    assert t.is_contiguous() if in_dnn else (t.t().is_contiguous() and not t.is_contiguous())
    (l_lean, lg_lean, w_lean), (l_eager, lg_eager, w_eager) = runs
    # per step and oneDNN layer: forward, weight gradient and (but the first layer) input gradient
    written_out = len(l_lean) - 1  # the first step is an ordinary one (it creates the optimizer state)
    assert len(onednn_calls) == written_out * sum((2 + (i > 0)) * d for i, d in enumerate(dnn))
    assert sum(ptr in sources for ptr in onednn_calls) == written_out * sum(dnn)  # the forwards
    np.testing.assert_allclose(l_lean, l_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lg_lean, lg_eager, rtol=1e-5, atol=1e-5)
    for k in w_eager:
        torch.testing.assert_close(w_lean[k], w_eager[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["mixed-dropout", "uneven-step-counts"])
def test_lean_step_fallbacks_equal_autograd(case):
    """The written-out step's per-chunk shortcuts have fallbacks, each checked against autograd: dropout layers with
    different ``p`` draw their masks step by step (not one draw per chunk), and parameters whose Adam step counts
    differ are counted one by one (not with one shared counter)."""
    from lightning_app.dropout import Dropout

    feats, labels = features(n=70, dim=24)
    runs = []
    for runner_cls in (LeanHeadSteps, EagerHeadSteps):
        torch.manual_seed(0)
        p = (0.1, 0.4) if case == "mixed-dropout" else (0.2, 0.2)
        head = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), Dropout(p[0]), torch.nn.Linear(16, 8),
                                   torch.nn.ReLU(), Dropout(p[1]), torch.nn.Linear(8, 4)).train()
        optim = torch.optim.Adam(head.parameters(), lr=1e-2, fused=True)
        runner = _runner(runner_cls, head, optim)
        loader = FeatureLoader(feats, labels, batch_size=8, steps_per_execution=4, seed=1)
        torch.manual_seed(7)
        losses = []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)
            for i, chunk in enumerate(loader):
                losses += runner.run(chunk).losses.tolist()
                if case == "uneven-step-counts" and epoch == 0 and i == 0:
                    optim.state[head[3].bias]["step"].add_(5)  # as if this bias had been trained 5 steps longer
        runs.append((losses, {k: v.clone() for k, v in head.state_dict().items()},
                     [st["step"].item() for st in optim.state.values()]))
    (l_lean, w_lean, s_lean), (l_eager, w_eager, s_eager) = runs
    assert s_lean == s_eager and len(set(s_lean)) == (2 if case == "uneven-step-counts" else 1)
    np.testing.assert_allclose(l_lean, l_eager, rtol=1e-5, atol=1e-6)
    for k in w_eager:
        torch.testing.assert_close(w_lean[k], w_eager[k], rtol=1e-5, atol=1e-6)


def test_lean_steps_keep_keras_kernel_layout_and_resume_from_a_checkpoint():
    """The written-out step stores each weight, gradient and Adam moment as ``[in, out]`` in memory (the fast GEMM
    layout), hands the fused kernel contiguous views of that memory (no copies), and a checkpoint written in that
    layout resumes into a fresh (``[out, in]``) head: lean and autograd steps after the resume agree with each
    other and with the run that was never interrupted."""
    import io

    from lightning_app.head_steps import kernel_layout
    from lightning_app.module import build_head

    feats, labels = features(n=64, dim=24)

    def fresh():
        torch.manual_seed(0)
        head = build_head(24, [16], 0.2, 4).train()
        return head, torch.optim.Adam(head.parameters(), lr=1e-2, amsgrad=True)

    def train(runner, epochs):
        loader = FeatureLoader(feats, labels, batch_size=8, steps_per_execution=4, seed=1)
        losses = []
        for epoch in epochs:
            loader.sampler.set_epoch(epoch)
            for chunk in loader:
                losses += runner.run(chunk).losses.tolist()
        return losses

    head, optim = fresh()
    runner = LeanHeadSteps(head, 0.0, optim)
    torch.manual_seed(7)
    train(runner, [0])
    for lin in (head[0], head[3]):
        w, st = lin.weight, optim.state[lin.weight]
        for t in (w, w.grad, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"]):
            assert t.t().is_contiguous() and not t.is_contiguous(), t.stride()
        assert kernel_layout(w) is w
    flat = [t for g in runner._groups for k in ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")
            for t in g[k]]
    assert all(t.is_contiguous() for t in flat) and len(flat) == 5 * 4
    assert {t.data_ptr() for t in flat} >= {head[0].weight.data_ptr(), head[0].weight.grad.data_ptr()}
    buf = io.BytesIO()
    torch.save({"head": head.state_dict(), "optim": optim.state_dict(), "rng": torch.get_rng_state()}, buf)
    uninterrupted = train(runner, [1, 2])
    resumed = []
    for runner_cls in (LeanHeadSteps, EagerHeadSteps):
        buf.seek(0)
        ckpt = torch.load(buf)
        head2, optim2 = fresh()
        assert head2[0].weight.is_contiguous()
        head2.load_state_dict(ckpt["head"])
        optim2.load_state_dict(ckpt["optim"])
        torch.set_rng_state(ckpt["rng"])
        runner2 = (LeanHeadSteps(head2, 0.0, optim2) if runner_cls is LeanHeadSteps
                   else EagerHeadSteps(head2, F.cross_entropy, optim2))
        resumed.append((train(runner2, [1, 2]), head2[0].weight.detach().clone()))
    np.testing.assert_allclose(resumed[0][0], resumed[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(resumed[0][0], uninterrupted, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed[0][1], resumed[1][1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(resumed[0][1], head[0].weight.detach(), rtol=1e-5, atol=1e-6)


def test_lean_step_draws_a_plain_nn_dropouts_masks_too():
    """A head with torch's own ``nn.Dropout`` (not ``build_head``'s): the written-out step draws bernoulli masks as
    that layer does, so it still equals autograd step for step."""
    feats, labels = features(n=40, dim=24)
    runs = []
    for runner_cls in (LeanHeadSteps, EagerHeadSteps):
        torch.manual_seed(0)
        head = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.ReLU(), torch.nn.Dropout(0.4),
                                   torch.nn.Linear(16, 4)).train()
        optim = torch.optim.Adam(head.parameters(), lr=1e-2, fused=True)
        runner = _runner(runner_cls, head, optim)
        torch.manual_seed(7)
        losses = []
        for chunk in FeatureLoader(feats, labels, batch_size=8, steps_per_execution=5, seed=1):
            losses += runner.run(chunk).losses.tolist()
        runs.append((losses, head[0].weight.detach().clone()))
    np.testing.assert_allclose(runs[0][0], runs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(runs[0][1], runs[1][1], rtol=1e-5, atol=1e-6)


def test_lean_blocker_says_why():
    from lightning_app.head_steps import lean_blocker
    from lightning_app.module import build_head

    head = build_head(8, [4], 0.1, 3)
    assert "SGD" in lean_blocker(head, torch.optim.SGD(head.parameters(), lr=0.1))
    assert "foreach" in lean_blocker(head, torch.optim.Adam(head.parameters(), foreach=True))
    assert "Linear" in lean_blocker(torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.GELU(), torch.nn.Linear(4, 3)),
                                    torch.optim.Adam(head.parameters()))


def test_matmul_limit_times_the_steps_products_in_float32(monkeypatch):
    """The limit times each product at the step's shapes in float32, as the head steps run (whatever the
    parameters' dtype), and its timer falls back to plain calls where a CUDA graph cannot be captured."""
    head = torch.nn.Sequential(torch.nn.Linear(64, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).to(torch.bfloat16)
    seen = []
    real_mm = torch.mm

    def spy(a, b, *args, **kwargs):
        seen.append((a.dtype, b.dtype))
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(head_steps.torch, "mm", spy)
    assert head_steps.matmul_limit(head, 8, "cpu", repeats=1, inner=2) > 0
    assert seen and all(d == (torch.float32, torch.float32) for d in seen)
    assert head_steps._captured(lambda: None, torch.device("cpu"), 2) is None  # no CUDA: no graph, plain calls


def test_lean_step_called_directly_equals_autograd():
    """``LeanHeadSteps.step`` outside ``run`` (after its first, ordinary step) takes the written-out path with its
    own loss-gradient targets: same loss and weights as autograd, label smoothing included."""
    from lightning_app.module import build_head

    results = []
    for cls in (LeanHeadSteps, EagerHeadSteps):
        torch.manual_seed(0)
        head = build_head(24, [16], 0.0, 4).train()
        opt = torch.optim.Adam(head.parameters(), lr=1e-2, fused=True)
        runner = _runner(cls, head, opt, 0.1)
        torch.manual_seed(1)
        x, y = torch.randn(8, 24), torch.randint(0, 4, (8,))
        losses = [runner.step(x, y)[1].item() for _ in range(3)]
        results.append((losses, head[0].weight.detach().clone()))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["mkl", "onednn"])
def test_lean_steps_restore_dropped_gradients_without_an_ordinary_step(monkeypatch, mode):
    """Lightning drops the gradients before every validation (``on_validation_model_zero_grad``): the written-out
    steps then make zero buffers in each weight's layout and go on without an ordinary ``Optimizer.step``, with the
    numbers of autograd dropping its gradients at the same points; a replaced optimizer state still gets one."""
    from lightning_app import linear_fusion
    from lightning_app.module import build_head

    if mode == "onednn" and not linear_fusion.available():
        pytest.skip("this PyTorch build has no oneDNN linear op")
    monkeypatch.setattr(linear_fusion, "onednn_linear_faster", lambda: mode == "onednn")
    monkeypatch.setattr(head_steps, "MIN_ONEDNN_MACS", 0)
    feats, labels = features(n=70, dim=24)
    runs = []
    for runner_cls in (LeanHeadSteps, EagerHeadSteps):
        torch.manual_seed(0)
        head = build_head(24, [16], 0.2, 4).train()
        optim = torch.optim.Adam(head.parameters(), lr=1e-2, fused=True)
        runner = _runner(runner_cls, head, optim)
        calls = []
        real_step = optim.step
        optim.step = lambda *a, **k: calls.append(1) or real_step(*a, **k)
        loader = FeatureLoader(feats, labels, batch_size=8, steps_per_execution=4, seed=1)
        torch.manual_seed(7)
        losses, layouts = [], []
        for epoch in range(3):
            loader.sampler.set_epoch(epoch)
            for chunk in loader:
                losses += runner.run(chunk).losses.tolist()
            layouts.append([(lin.weight.stride(), lin.weight.grad.stride()) for lin in (head[0], head[3])])
            head.zero_grad(set_to_none=True)  # what Lightning does before validation
        runs.append((losses, {k: v.clone() for k, v in head.state_dict().items()}, len(calls), layouts))
    (l_lean, w_lean, calls_lean, layouts), (l_eager, w_eager, calls_eager, _) = runs
    assert calls_lean == 1 and calls_eager == len(l_eager)  # the lean runner's first step only
    assert all(w == g for epoch in layouts for w, g in epoch) and layouts[0] == layouts[-1]
    np.testing.assert_allclose(l_lean, l_eager, rtol=1e-5, atol=1e-6)
    for k in w_eager:
        torch.testing.assert_close(w_lean[k], w_eager[k], rtol=1e-5, atol=1e-6)
    # a new optimizer state (as a loaded checkpoint brings): one ordinary step again
    head = build_head(24, [16], 0.2, 4).train()
    optim = torch.optim.Adam(head.parameters(), lr=1e-2, fused=True)
    runner = LeanHeadSteps(head, 0.0, optim)
    chunk = next(iter(FeatureLoader(feats, labels, batch_size=8, steps_per_execution=4, seed=1)))
    runner.run(chunk)
    optim.load_state_dict(copy.deepcopy(optim.state_dict()))  # new state tensors
    calls = []
    real_step = optim.step
    optim.step = lambda *a, **k: calls.append(1) or real_step(*a, **k)
    runner.run(chunk)
    assert calls == [1]
