"""The benchmarks' own machinery: timing arithmetic, ratio tables, offline data in the product's formats, and
the "ours" side of extraction and head training run through the real CLI on tiny data (so a change of the
CLI, the feature cache or the Trainer hooks that breaks a benchmark fails here, not on the GPU machine)."""
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import _harness  # noqa: E402
from _timing import window_rate  # noqa: E402


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_rate_counts_data_waits_and_skips_warmup():
    ends = [10.0, 11.0, 13.0, 14.0]  # batch 0 is warm-up; batches 1..3 take 4 s for 3 x 8 images
    assert window_rate(ends, [8, 8, 8, 8], first=1) == pytest.approx(24 / 4)
    assert window_rate(ends, [8, 8, 8, 8], first=2, last=2) == pytest.approx(8 / 2)
    assert np.isnan(window_rate(ends, [8, 8, 8, 8], first=0))  # no start given


def test_ratio_table_direction(tmp_path, capsys):
    res = _harness.Results("t", tmp_path / "r.json", {})
    res.add({"runner": "ours", "case": "a", "img_s": 30.0, "epoch_s": 1.0})
    res.add({"runner": "keras-jax", "case": "a", "img_s": 10.0, "epoch_s": 4.0})
    res.print_table("throughput", ["case"], "img_s", "img/s", higher_is_better=True)
    res.print_table("epochs", ["case"], "epoch_s", "s", higher_is_better=False)
    out = capsys.readouterr().out
    assert "| a | 30.0 | 10.0 | 3.00x |" in out  # ours 3x faster in both
    assert "| a | 1.00 | 4.00 | 4.00x |" in out
    saved = json.loads((tmp_path / "r.json").read_text())
    assert len(saved["rows"]) == 2 and set(saved["tables"]) == {"throughput", "epochs"}


def test_failed_runner_is_shown_not_hidden(tmp_path, capsys):
    res = _harness.Results("t", None, {})
    res.add({"runner": "ours", "case": "a", "error": "boom"})
    res.add({"runner": "keras-jax", "case": "a", "img_s": 10.0})
    res.print_table("x", ["case"], "img_s", "img/s", higher_is_better=True)
    assert "| a | failed | 10.0 | - |" in capsys.readouterr().out


def test_cifar_format_is_read_by_the_product_and_by_the_keras_side(tmp_path):
    from lightning_app.data.cifar import read_cifar10

    x = _harness.photo_crops(12, 32, seed=1)
    y = np.arange(12) % 10
    _harness.write_cifar10(tmp_path, x, y, x[:3], y[:3])
    xp, yp = read_cifar10(tmp_path / "cifar-10-batches-py", train=True)
    xk, yk = _harness.read_cifar10_train(tmp_path)
    np.testing.assert_array_equal(xp, x)
    np.testing.assert_array_equal(xk, x)
    np.testing.assert_array_equal(yp, y)
    np.testing.assert_array_equal(yk, y)


@pytest.mark.parametrize("rows", [50_000, 2_000, 130])
def test_head_benchmark_sizes_the_dataset_for_exact_training_rows(rows):
    from lightning_app.data.splits import stratified_split

    head = _load("head")
    n = head.images_for_train_rows(rows, 0.1)
    train, val, _ = stratified_split(np.arange(n) % 10, 0.1)
    assert len(train) == -(-rows // 10) * 10 and len(val) > 0


def test_head_benchmark_runs_the_cli_on_the_cache_it_wrote(tmp_path):
    head = _load("head")
    n = head.images_for_train_rows(200, 0.1)
    _harness.write_cifar10(tmp_path / "data", np.zeros((n, 32, 32, 3), np.uint8), np.arange(n) % 10,
                           np.zeros((10, 32, 32, 3), np.uint8), np.arange(10))
    r = head.ours_head({"config": str(BENCH.parent / "configs" / "cifar10.yaml"), "data": str(tmp_path / "data"),
                        "cache": str(tmp_path / "cache"), "run_dir": str(tmp_path / "runs"), "epochs": 2})
    assert r["rows"] == 200 and len(r["epoch_s"]) == 2 and r["steady_epoch_s"] > 0
    assert np.load(r["features"]["train"], mmap_mode="r").shape == (200, 2048)
    assert r["val_acc"] > 0.5  # the synthetic features carry their class: the head learns them


def test_benchmarks_report_each_runners_best_round():
    harness = _load("_harness")
    rows = [{"runner": "ours", "steady_epoch_s": 2.6, "first_epoch_s": 3.0}, {"runner": "ours", "error": "killed"},
            {"runner": "ours", "steady_epoch_s": 1.9, "first_epoch_s": 2.9}]
    best = harness.best_round(rows, "steady_epoch_s", higher_is_better=False)
    assert best["steady_epoch_s"] == 1.9 and best["first_epoch_s"] == 2.9
    assert best["rounds_steady_epoch_s"] == [2.6, None, 1.9]
    rate = harness.best_round([{"img_s": 10.0}, {"img_s": 12.5}, {"img_s": 11.0}], "img_s", higher_is_better=True)
    assert rate == {"img_s": 12.5, "rounds_img_s": [10.0, 12.5, 11.0]}
    one = [{"runner": "ours", "steady_epoch_s": 2.0}]
    assert harness.best_round(one, "steady_epoch_s", higher_is_better=False) == one[0]
    assert harness.best_round([{"error": "a"}, {"error": "b"}], "img_s", higher_is_better=True) == {"error": "b"}


def _run_extract_driver(extract, fake_worker, monkeypatch, tmp_path, rounds, policy):
    """``extract.py``'s driver on MobileNetV3Small with both Keras backends, every worker ``fake_worker``; the JSON."""
    monkeypatch.setattr(extract, "run_worker", fake_worker)
    monkeypatch.setattr(extract, "exit_on_sigterm", lambda: None)  # the driver's process-wide SIGTERM handler
    monkeypatch.setattr(extract, "keras_backends", lambda requested, res: ["jax", "tensorflow"])
    out = tmp_path / "r.json"
    monkeypatch.setattr(sys, "argv", ["extract.py", "--models", "MobileNetV3Small", "--rounds", str(rounds),
                                      "--n-images", "20", "--batch", "4", "--workdir", str(tmp_path / "w"),
                                      "--json", str(out), "--keras-policy", policy])
    extract.main()
    return out


def test_extract_driver_alternates_rounds_and_keeps_each_runners_best(tmp_path, monkeypatch):
    """``--rounds 3``: per model Keras-JAX, Keras-TF and ours run alternately 3 times (the weights file written once,
    by the first Keras run); each runner's row is its best round (Keras by its batches alone), with all rounds
    listed, and ours's ratios are taken against Keras's best rounds."""
    extract = _load("extract")
    calls = []
    rates = {"keras-jax": [5.0, 6.0, 4.0], "keras-tensorflow": [8.0, 7.0, 9.0], "ours": [11.0, 12.0, 10.0]}

    def fake_worker(script, spec, workdir, env=None, timeout=None):
        runner = spec["runner"]
        calls.append((runner, spec.get("save_h5")))
        if spec.get("save_h5"):
            Path(spec["h5"]).write_bytes(b"h5")
        rate = rates[runner][sum(c[0] == runner for c in calls) - 1]
        if runner == "ours":
            return {"img_s": rate, "precision": "32-true", "limit_img_s": 36.0}
        np.save(spec["features"], np.zeros((2, 4), np.float32))
        return {"img_s": rate / 2, "batches_img_s": rate}

    out = _run_extract_driver(extract, fake_worker, monkeypatch, tmp_path, rounds=3, policy="float32")
    assert [c[0] for c in calls] == ["keras-jax", "keras-tensorflow", "ours"] * 3
    assert [c[1] for c in calls if c[0] != "ours"] == [True, False, False, False, False, False]
    rows = {r["runner"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["keras-jax"]["batches_img_s"] == 6.0 and rows["keras-jax"]["rounds_batches_img_s"] == [5.0, 6.0, 4.0]
    assert rows["keras-tensorflow"]["batches_img_s"] == 9.0
    assert rows["ours"]["img_s"] == 12.0 and rows["ours"]["rounds_img_s"] == [11.0, 12.0, 10.0]
    assert rows["ours"]["over_keras-jax_batches"] == pytest.approx(2.0)
    assert rows["ours"]["over_keras-tensorflow_batches"] == pytest.approx(12.0 / 9.0)
    # the limit against Keras's whole predict rate and against its batches alone, kept apart
    assert rows["ours"]["limit_over_keras-tensorflow"] == pytest.approx(36.0 / 4.5)
    assert rows["ours"]["limit_over_keras-tensorflow_batches"] == pytest.approx(36.0 / 9.0)


def test_extract_driver_keeps_keras_at_its_faster_policy(tmp_path, monkeypatch):
    """``--keras-policy best`` (``auto`` on a CPU where ours runs bf16): each Keras backend runs float32 and
    mixed_bfloat16 in every round and keeps its fastest run of either; each policy's best is listed; the sanity
    guard compares ours with the float32 features; no 'not the same precision' note for ours' bf16."""
    extract = _load("extract")
    calls = []
    rates = {("keras-jax", "float32"): [5.0, 6.0], ("keras-jax", "mixed_bfloat16"): [4.0, 3.0],
             ("keras-tensorflow", "float32"): [8.0, 7.0], ("keras-tensorflow", "mixed_bfloat16"): [9.5, 9.0]}

    def fake_worker(script, spec, workdir, env=None, timeout=None):
        key = (spec["runner"], spec.get("policy"))
        calls.append(key)
        if spec.get("save_h5"):
            Path(spec["h5"]).write_bytes(b"h5")
        if spec["runner"] == "ours":
            return {"img_s": 12.0, "precision": "engine-bf16", "sample_ids": [0, 1],
                    "sample_features": [[1.0, 2.0], [3.0, 4.0]]}
        np.save(spec["features"], np.array([[1.0, 2.0], [3.0, 4.0]] if spec["policy"] == "float32"
                                           else [[9.0, 9.0], [9.0, 9.0]], np.float32))
        rate = rates[key][sum(c == key for c in calls) - 1]
        return {"img_s": rate / 2, "batches_img_s": rate}

    out = _run_extract_driver(extract, fake_worker, monkeypatch, tmp_path, rounds=2, policy="best")
    keras_calls = [("keras-jax", "float32"), ("keras-jax", "mixed_bfloat16"), ("keras-tensorflow", "float32"),
                   ("keras-tensorflow", "mixed_bfloat16")]
    assert calls == (keras_calls + [("ours", None)]) * 2
    doc = json.loads(out.read_text())
    rows = {r["runner"]: r for r in doc["rows"]}
    assert rows["keras-jax"]["policy"] == "float32" and rows["keras-jax"]["batches_img_s"] == 6.0
    assert rows["keras-tensorflow"]["policy"] == "mixed_bfloat16" and rows["keras-tensorflow"]["batches_img_s"] == 9.5
    assert rows["keras-tensorflow"]["policy_batches_img_s"] == {"float32": 8.0, "mixed_bfloat16": 9.5}
    assert rows["ours"]["over_keras-tensorflow_batches"] == pytest.approx(12.0 / 9.5)
    assert rows["ours"]["rel_diff_keras-jax"] == 0.0  # against the float32 features, not the bf16 run's
    assert not any("not the same precision" in n for n in doc["notes"])


def test_keras_policies_follow_ours_precision():
    """``auto``: mixed_bfloat16 on a GPU; on a CPU float32, plus mixed_bfloat16 where ours runs bf16 there;
    ``best`` both anywhere; a single-policy benchmark refuses ``best``; the precision note fires only when Keras
    ran no policy of ours' precision class."""
    assert _harness.keras_policies("auto", "cuda", True) == ["mixed_bfloat16"]
    assert _harness.keras_policies("auto", "cpu", False) == ["float32"]
    assert _harness.keras_policies("auto", "cpu", True) == ["float32", "mixed_bfloat16"]
    assert _harness.keras_policies("best", "cuda", True) == ["float32", "mixed_bfloat16"]
    assert _harness.keras_policies("float32", "cpu", True) == ["float32"]
    with pytest.raises(SystemExit, match="only extract.py"):
        _harness.keras_policy("best", "cpu")
    # one policy (robustness, fine-tuning): the class of ours' precision
    assert _harness.keras_policy("auto", "cpu") == "float32"
    assert _harness.keras_policy("auto", "cpu", ours_bf16=True) == "mixed_bfloat16"
    assert _harness.keras_policy("float32", "cpu", ours_bf16=True) == "float32"
    for ours, policies, noted in (("engine-bf16", ["float32"], True), ("engine-bf16", ["float32", "mixed_bfloat16"],
                                                                         False), ("32-true", "float32", False),
                                  ("bf16-mixed", "mixed_bfloat16", False), ("32-true", ["mixed_bfloat16"], True)):
        res = _harness.Results("extract", None, {})
        _harness.check_precision(res, "M", ours, policies)
        assert bool(res.doc["notes"]) == noted, (ours, policies)


def test_engine_runs_bf16_reads_the_configs_inference_options(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)  # a CPU with native bf16
    cfg = tmp_path / "c.yaml"
    for inference, expected in ((None, True), ({"precision": "fp32"}, False), ({"enabled": False}, False)):
        model = {"backbone": "ResNet50", "inference": inference} if inference else {"backbone": "ResNet50"}
        cfg.write_text(json.dumps({"model": model}))
        assert _harness.engine_runs_bf16(cfg, "cpu") is expected, inference
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    cfg.write_text(json.dumps({"model": {}}))
    assert _harness.engine_runs_bf16(cfg, "cpu") is False and _harness.engine_runs_bf16(cfg, "cuda") is True


def test_extract_sanity_guard_names_the_engines_status_when_features_disagree(tmp_path):
    """Ours and Keras features further apart than 5e-2 on the same images and weights: the note says so and what
    the inference engine made of the model (e.g. BatchNorm left unfolded: a path real weights do not take)."""
    extract = _load("extract")
    keras_file = tmp_path / "k.npy"
    np.save(keras_file, np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], np.float32))
    entry = SimpleNamespace(input_size=32)
    for ours, expect_note in (([[3.0, 4.0], [5.0, 6.0]], False), ([[3.0, 4.0], [5.0, 9.0]], True)):
        res = _harness.Results("extract", None, {})
        row = {"img_s": 1.0, "sample_ids": [1, 2], "sample_features": ours, "precision": "32-true",
               "engine_status": "eager, BatchNorm folded 0/12"}
        extract._add_ours(res, row, {"keras-jax": keras_file}, [], "float32", "M", entry)
        notes = res.doc["notes"]
        assert bool(notes) == expect_note
        if expect_note:
            assert "differ by 5.0e-01" in notes[0] and "BatchNorm folded 0/12" in notes[0]


@pytest.mark.parametrize("size,resize_on", [(32, None), (40, "workers")])
def test_extract_benchmark_runs_the_cli_extraction(tmp_path, size, resize_on):
    extract = _load("extract")
    x = _harness.photo_crops(60, 32, seed=0)
    _harness.write_cifar10(tmp_path / "data", x, np.arange(60) % 10, x[:10], np.arange(10))
    r = extract.ours_extract({"config": str(BENCH.parent / "configs" / "cifar10.yaml"), "model": "test_resnet",
                              "h5": "null", "data": str(tmp_path / "data"), "size": size, "cache": str(tmp_path / "c"),
                              "run_dir": str(tmp_path / "runs"), "batch": 4, "batch_override": True,
                              "warmup_batches": 2, "loader_batches": 1, "resize_on": resize_on,
                              "profile_batches": 3})
    assert r["resize_on"] == (resize_on or "device")  # the config's auto: CIFAR's one size is resized on the device
    # the config leaves num_workers to the automatic choice: none for the device resize, 2 resizing workers on the CPU
    assert r["num_workers"] == (0 if resize_on is None else min(2, len(os.sched_getaffinity(0))))
    assert r["images"] == 60 and r["splits"] == 2 and r["batch"] == 4  # train + val, every image once
    assert r["img_s"] > 0 and 0 < r["model_pct"] <= 100 and r["wall_s"] > 0 and r["loader_img_s"] > 0
    # where the input pipeline's time goes (per batch), and the host's side of the steady window
    assert r["fetch_ms"] > 0 and r["transfer_ms"] >= 0 and r["prepare_ms"] > 0 and math.isfinite(r["pin_ms"])
    assert r["host_step_ms"] > 0 and r["device_step_ms"] > 0 and math.isfinite(r["host_other_ms"])
    assert r["host_step_ms"] == pytest.approx(r["device_step_ms"], rel=0.2)  # the CPU: one clock, synchronous
    assert len(r["sample_features"]) == 2 and r["sample_ids"] == sorted(r["sample_ids"])
    assert "BatchNorm folded" in r["engine_status"]  # what the engine made of the model, for the sanity guard's note
    assert r["model_gflop"] > 0 and r["gemm_gflop_s"] > 0
    assert r["limit_img_s"] == pytest.approx(r["gemm_gflop_s"] / r["model_gflop"])
    assert r["pct_of_limit"] == pytest.approx(100 * r["img_s"] / r["limit_img_s"])
    # the val split (10 images: batches of 4, 4 and 2) profiled after its first batch: two batches, each with its
    # fetch from the DataLoader, the backbone's convolutions among the host's operations, nothing on a device
    prof = r["profile"]
    assert prof["batches"] == 2 and prof["wall_ms_per_batch"] > 0 and prof["device_ms_per_batch"] == 0
    assert any(op["op"].startswith("enumerate(DataLoader)") and op["calls_per_batch"] == 1 for op in prof["host_ops"])
    assert any("conv" in op["op"] for op in prof["host_ops"]) and not prof["device_ops"]
    assert 0 < prof["host_ms_per_batch"] and all(op["self_ms_per_batch"] > 0 for op in prof["host_ops"])


def test_batch_profiler_profiles_only_its_run_and_a_failure_costs_the_profile_not_the_run(monkeypatch):
    """Run 0 (the timed train split) is never profiled; run 1 from the end of its batch ``skip - 1``; a profiler
    that cannot start leaves an error in the summary and the loop goes on."""
    ours = _load("_ours")
    import torch

    module = SimpleNamespace(device=torch.device("cpu"))
    prof = ours.BatchProfiler(batches=2)
    for run, n in enumerate((3, 4)):
        prof.on_predict_start(None, module)
        for i in range(n):
            torch.ones(64).sum()
            prof.on_predict_batch_end(None, module, None, None, i)
            if run == 0:
                assert prof._prof is None
        prof.on_predict_end(None, module)
    assert prof.summary["batches"] == 2 and prof.summary["host_ops"]

    def broken(*args, **kwargs):
        raise RuntimeError("CUPTI busy")

    monkeypatch.setattr(torch.profiler, "profile", broken)
    failed = ours.BatchProfiler(batches=2, run=0)
    failed.on_predict_start(None, module)
    for i in range(3):
        failed.on_predict_batch_end(None, module, None, None, i)
    failed.on_predict_end(None, module)
    assert failed.summary == {"error": "RuntimeError: CUPTI busy"}


def test_compute_limit_counts_every_multiply_add_of_the_backbone():
    limits = _load("_limits")
    # VGG16 without its top: 13 3x3 convolutions, 2 FLOPs per multiply-add, at 224 px
    blocks = [(224, [(3, 64), (64, 64)]), (112, [(64, 128), (128, 128)]), (56, [(128, 256), (256, 256), (256, 256)]),
              (28, [(256, 512), (512, 512), (512, 512)]), (14, [(512, 512)] * 3)]
    expected = sum(2 * hw * hw * 9 * cin * cout for hw, convs in blocks for cin, cout in convs)
    assert limits.model_flops("VGG16", 224) == expected
    # ResNet50 without its top: 3.86 G multiply-adds, projection shortcuts included
    assert 7.5e9 < limits.model_flops("ResNet50", 224) < 8.0e9
    assert limits.gemm_flop_s("cpu", n=256, repeats=2) > 1e8


def test_robustness_benchmark_runs_the_cli_test_loop_and_exports_what_it_perturbed(tmp_path):
    robustness = _load("robustness")
    names = _harness.class_names(8)
    pool = _harness.photo_crops(8 + len(names), 32, seed=0)
    _harness.write_image_folder(tmp_path / "img" / "train", pool[:len(names)], np.arange(len(names)), names)
    _harness.write_image_folder(tmp_path / "img" / "test", pool[len(names):], np.arange(8) % len(names), names)
    inner = {"class_path": "lightning_app.data.ImageFolderDataModule",
             "init_args": {"root": str(tmp_path / "img"), "image_size": 32, "batch_size": 4, "num_workers": 0,
                           "val_split": 0.0, "test_split": 0.0}}
    r = robustness.ours_robustness({"config": str(BENCH.parent / "configs" / "robustness.yaml"),
                                    "model": "test_resnet", "h5": "null", "run_dir": str(tmp_path / "runs"),
                                    "inner": inner, "corruptions": ["gaussian_noise"], "severity": 3,
                                    "eps": "8/255", "n": 8, "export": str(tmp_path / "export")})
    assert [w["loader"] for w in r["loaders"]] == ["clean", "gaussian_noise_s3", "fgsm"]
    assert all(w["images"] == 8 and w["img_s"] > 0 and w["steady_img_s"] > 0 for w in r["loaders"])
    exported = {key: np.load(path) for key, _, path in r["export"]}
    assert exported["clean"].shape == (8, 32, 32, 3) and exported["clean"].dtype == np.uint8
    assert np.abs(exported["gaussian_noise_s3"].astype(int) - exported["clean"]).mean() > 5  # really corrupted


def test_finetune_benchmark_trains_every_layer_through_the_cli(tmp_path):
    finetune = _load("finetune")
    names = _harness.class_names(16, per_class=4)
    _harness.write_image_folder(tmp_path / "img", _harness.photo_crops(16, 32, seed=0), np.arange(16) % len(names),
                                names)
    r = finetune.ours_finetune({"config": str(BENCH.parent / "configs" / "food.yaml"), "model": "test_resnet",
                                "h5": "null", "data": str(tmp_path / "img"), "size": 32, "batch": 4, "epochs": 2,
                                "run_dir": str(tmp_path / "runs")})
    assert r["images"] == 16 and r["batch"] == 4 and len(r["epoch_s"]) == 2 and r["img_s"] > 0
    assert r["device_step_ms"] > 0 and r["host_step_ms"] == pytest.approx(r["device_step_ms"], rel=0.2)  # CPU: one clock


def test_finetune_benchmark_passes_compile_backbone_to_the_cli():
    """``--compile-backbone true`` reaches ``--model.compile_backbone`` (it once stayed in the job spec only, and a
    GPU run labelled "compiled" trained eagerly); unset, the product's device default applies."""
    finetune = _load("finetune")
    spec = {"config": "c.yaml", "model": "ResNet50", "h5": "null", "data": "d", "size": 224, "batch": 8, "epochs": 2,
            "run_dir": "r"}
    args = [str(a) for a in finetune.cli_args(dict(spec, compile_backbone="true"))]
    assert args[args.index("--model.compile_backbone") + 1] == "true"
    assert "--model.compile_backbone" not in [str(a) for a in finetune.cli_args(dict(spec, compile_backbone=None))]


class _Tiny(__import__("pytorch_lightning").LightningModule):
    def __init__(self):
        super().__init__()
        import torch

        self.net = torch.nn.Linear(64, 8)

    def predict_step(self, batch, batch_idx):
        return self.net(batch[0])


@pytest.mark.parametrize("accelerator", [
    "cpu", pytest.param("gpu", marks=pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="no CUDA"))])
def test_loop_timer_batches_are_ordered_times_on_host_and_device(accelerator):
    import pytorch_lightning as pl
    import torch
    from _ours import LoopTimer

    data = torch.utils.data.TensorDataset(torch.randn(40, 64), torch.zeros(40, dtype=torch.long))
    timer = LoopTimer()
    trainer = pl.Trainer(accelerator=accelerator, devices=1, logger=False, callbacks=[timer],
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.predict(_Tiny(), torch.utils.data.DataLoader(data, batch_size=8), return_predictions=False)
    rows = timer.batches["predict"]
    assert [r[2] for r in rows] == [8] * 5
    times = [t for r in rows for t in r[3:]]
    assert all(isinstance(t, float) for t in times) and times == sorted(times)  # CUDA events resolved, in order
    assert timer.first("start:predict") <= times[0] and times[-1] <= timer.first("end:predict")
    w = timer.window("predict", skip=1)
    assert w["images"] == 32 and w["img_s"] > 0 and 0 <= w["step_s"] <= w["window_s"]
    (loader,) = timer.loader_windows("predict")
    assert loader["images"] == 40 and loader["steady_img_s"] > 0


@pytest.mark.parametrize("name, builtin", [("EfficientNetB0", True), ("ConvNeXtTiny", True), ("ResNet50", False),
                                           ("MobileNetV2_050_128", False)])
def test_keras_runners_feed_builtin_preprocessing_models_raw_pixels(name, builtin):
    """Models that normalise inside (EfficientNet, MobileNetV3, ConvNeXt) get 0..255 from the Keras runners, not
    ``preprocess_input`` on top (which made their features differ from ours by 100 %); the others get
    ``preprocess_input`` in their mode; variants are built from their application with its arguments."""
    pytest.importorskip("keras")
    from converters.keras_models import import_keras
    from lightning_app.zoo import get_entry

    keras = import_keras()
    spec = _harness.keras_model_spec(get_entry(name))
    assert spec["builtin_preprocessing"] is builtin and spec["size"] == get_entry(name).input_size
    kmod = _load("_keras")
    identity = keras.Sequential([keras.layers.Input((8, 8, 3)), keras.layers.Identity()])
    x = np.arange(8 * 8 * 3, dtype=np.uint8).reshape(1, 8, 8, 3)
    out = np.asarray(kmod.image_model(keras, dict(spec, size=8), identity, 8, head=[])(x))
    if builtin:
        np.testing.assert_allclose(out, x.astype(np.float32))
    else:
        assert not np.allclose(out, x.astype(np.float32))
    if name.startswith("MobileNetV2_"):
        assert spec["application"] == "MobileNetV2" and spec["keras_kwargs"] == {"alpha": 0.5}


def test_keras_runner_sets_efficientnets_builtin_normalization():
    pytest.importorskip("keras")
    from converters.keras_models import import_keras

    keras = import_keras()
    kmod = _load("_keras")
    norm = keras.layers.Normalization(axis=-1)
    model = keras.Sequential([keras.layers.Input((2, 2, 3)), norm])
    model(np.zeros((1, 2, 2, 3), np.float32))  # built and called once before, as in the runner
    kmod.set_builtin_normalization(keras, model, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    np.testing.assert_allclose(np.asarray(norm.mean).ravel(), [0.485, 0.456, 0.406], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(norm.variance).ravel(), np.square([0.229, 0.224, 0.225]), rtol=1e-6)
    out = np.asarray(model(np.full((1, 2, 2, 3), 0.485, np.float32)))  # what call() computes uses them
    np.testing.assert_allclose(out[..., 0], 0.0, atol=1e-5)
