"""Errors a person can read (issue 9, case 6): every command-line tool prints a mistake as one paragraph with the
fix, no traceback unless --debug / LIGHTNING_APP_DEBUG=1 asks for it, and known third-party noise is filtered."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from converters.__main__ import main as converters_main
from lightning_app.cli import main as cli_main
from lightning_app.entry import DEBUG_ENV, user_error_in
from lightning_app.errors import (
    ConfigError,
    DatasetLayoutError,
    LayerMismatchError,
    UnknownModelError,
    UserError,
    WeightFileError,
    WeightsUnavailableError,
)
from lightning_app.zoo import list_models

ROOT = Path(__file__).resolve().parents[1]
FOOD = ROOT / "configs" / "food.yaml"


def image_folder(root, classes=("apple", "bread"), n=4, size=(20, 24)):
    rng = np.random.default_rng(0)
    for cls in classes:
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def food_args(tmp_path, root, *extra):
    return ["fit", "--config", str(FOOD), "--data.init_args.root", str(root), "--data.init_args.image_size", "32",
            "--data.init_args.num_workers", "0", "--model.backbone", "test_resnet", "--model.weights", "null",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.fast_dev_run", "true", "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu",
            *extra]


def run_cli_expecting_error(args, capsys, monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_hierarchy_keeps_builtin_bases():
    assert issubclass(ConfigError, ValueError) and issubclass(DatasetLayoutError, ValueError)
    assert issubclass(WeightsUnavailableError, RuntimeError) and issubclass(WeightFileError, ValueError)
    assert issubclass(LayerMismatchError, UserError) and issubclass(UnknownModelError, KeyError)
    assert str(UnknownModelError("unknown model 'x'")) == "unknown model 'x'"  # not KeyError's repr


def test_empty_class_folder_is_one_paragraph_not_a_jsonargparse_traceback(tmp_path, capsys, monkeypatch):
    root = image_folder(tmp_path / "food")
    (root / "cheese").mkdir()
    err = run_cli_expecting_error(food_args(tmp_path, root), capsys, monkeypatch)
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]
    assert len(lines) == 1, err
    assert lines[0].startswith("data error: class folder") and "cheese" in lines[0]
    assert "add images or remove the folder" in lines[0]
    assert "Union subtypes" not in err


def test_split_fractions_are_a_configuration_error(tmp_path, capsys, monkeypatch):
    root = image_folder(tmp_path / "food")
    err = run_cli_expecting_error(food_args(tmp_path, root, "--data.init_args.val_split", "0.6",
                                            "--data.init_args.test_split", "0.5"), capsys, monkeypatch)
    assert err.startswith("configuration error: val_split=0.6, test_split=0.5") or \
        "\nconfiguration error: val_split=0.6, test_split=0.5" in err


def test_a_third_party_class_that_cannot_be_built_is_named(tmp_path, capsys, monkeypatch):
    """A plain ValueError from torch inside jsonargparse's instantiation: the class and the cause, one paragraph."""
    import jsonargparse

    try:
        raise ValueError("Does not validate against any of the Union subtypes\nSubtypes: [...]\nGiven value: "
                         "Namespace(class_path='torch.optim.Adam', init_args=Namespace(lr=-1.0))") \
            from ValueError("Invalid learning rate: -1.0")
    except ValueError as wrapped:
        err = user_error_in(wrapped)
    assert isinstance(err, ConfigError)
    assert "could not build torch.optim.Adam" in str(err) and "Invalid learning rate: -1.0" in str(err)
    assert jsonargparse  # the wrapping above is what jsonargparse raises


def test_debug_flag_shows_the_traceback(tmp_path, capsys, monkeypatch):
    root = image_folder(tmp_path / "food")
    (root / "cheese").mkdir()
    monkeypatch.setenv(DEBUG_ENV, "0")
    with pytest.raises(ValueError, match="Union subtypes") as exc:
        cli_main(food_args(tmp_path, root, "--debug"))
    assert isinstance(exc.value.__cause__, DatasetLayoutError)
    assert os.environ[DEBUG_ENV] == "1"  # inherited by DDP ranks (monkeypatch restores it)


def test_offline_weights_message_without_traceback(tmp_path, capsys, monkeypatch):
    import lightning_app.zoo.weights as zw

    def offline(url, dest, md5, timeout=60.0):
        raise WeightsUnavailableError(f"could not download {url}: <urlopen error [Errno -3] no network>")

    monkeypatch.setenv(zw.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(zw, "download", offline)
    root = image_folder(tmp_path / "food")
    args = food_args(tmp_path, root)
    args[args.index("test_resnet")] = "ResNet50"
    args[args.index("null")] = "imagenet"
    err = run_cli_expecting_error(args, capsys, monkeypatch)
    assert err.count("Traceback") == 0 and "weights error: Keras ImageNet weights for ResNet50 (notop)" in err
    assert "python -m converters convert --model ResNet50" in err
    assert len(err.splitlines()) < 10


def test_converters_unknown_model_is_one_line(tmp_path, capsys):
    assert converters_main(["convert", "--model", "InceptionV4", "--h5", str(tmp_path / "x.h5"),
                            "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"configuration error: unknown model 'InceptionV4'; the zoo has: {list_models()[0]}")
    assert "Traceback" not in err and "KeyError" not in err


def test_noise_filtered_and_bad_image_warning_points_at_the_file(tmp_path):
    """A real command line: no litlogger tip, no LeafSpec deprecation; an unreadable image found at load time
    (verify: none) is reported at the image's path, not at torch's fetch.py."""
    root = image_folder(tmp_path / "food", n=6)
    (root / "bread" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    # ROOT first, then whatever the caller's PYTHONPATH holds (the GPU machine's carried wheels live there)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    env.pop(DEBUG_ENV, None)
    out = subprocess.run([sys.executable, "-m", "lightning_app", *food_args(tmp_path, root, "--data.init_args.verify",
                                                                            "none", "--data.init_args.batch_size", "16",
                                                                            "--data.init_args.augment", "false")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "litlogger" not in log and "LeafSpec" not in log
    bad = str(root / "bread" / "broken.png")
    warning = next(line for line in log.splitlines() if "BadImageWarning" in line)
    assert warning.startswith(bad + ":"), warning
    assert "fetch.py" not in log


def test_truncated_checkpoint_is_a_checkpoint_error_not_an_eoferror(tmp_path, capsys, monkeypatch):
    import torch

    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1000)}, "hyper_parameters": {}}, path)
    path.write_bytes(path.read_bytes()[:1500])  # cut off while being copied
    root = image_folder(tmp_path / "food")
    args = food_args(tmp_path, root, "--ckpt_path", str(path))
    args[0] = "test"
    err = run_cli_expecting_error([a for a in args if a not in ("--trainer.fast_dev_run", "true")], capsys, monkeypatch)
    assert err.startswith("checkpoint error: checkpoint") and "is truncated or corrupt" in err
    assert "EOFError" not in err.split("(")[0] and len(err.splitlines()) == 1


def test_a_finished_run_destroys_the_process_group_and_a_failed_one_leaves_it(tmp_path):
    """``run`` destroys the ``torch.distributed`` group a DDP run left, once the run finished (a gloo group left to the
    interpreter's teardown sometimes aborted the process: exit code -6); after an error it is left alone (another
    rank may still wait in a collective)."""
    import torch.distributed as dist

    from lightning_app.entry import run

    def init():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)

    (tmp_path / "store").unlink(missing_ok=True)
    init()
    try:
        assert run(lambda argv: dist.is_initialized(), []) is True  # still there while the run runs
        assert not dist.is_initialized()
        (tmp_path / "store").unlink(missing_ok=True)
        init()

        def fails(argv):
            raise RuntimeError("a bug")

        with pytest.raises(RuntimeError, match="a bug"):
            run(fails, [])
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
