"""RobustnessDataModule: loaders, seeded subsets, device-side perturbation, clear errors (no training here)."""
import pytest
import pytorch_lightning as pl
import torch

from lightning_app.data import DigitsDataModule
from lightning_app.errors import CheckpointError
from lightning_app.perturb import corrupt
from lightning_app.robustness import INFERENCE_MODE_FIX, RobustnessDataModule, module_from_classifier
from lightning_app.robustness.models import load_module, parse_model_spec


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def digits(batch_size=4):
    return DigitsDataModule(image_size=32, batch_size=batch_size, num_workers=0)


def test_classes_forwarded_at_init_and_one_loader_per_perturbation():
    dm = RobustnessDataModule(digits(), corruptions=["gaussian_noise", "contrast"], severities=[1, 3],
                              attacks=[{"name": "fgsm"}], limit_per_loader=10)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]  # before setup: the CLI link
    dm.setup("test")
    loaders = dm.test_dataloader()
    assert [p.key for p in dm.perturbations] == ["clean", "gaussian_noise_s1", "gaussian_noise_s3", "contrast_s1",
                                                  "contrast_s3", "fgsm"]
    assert len(loaders) == 6
    idx = [torch.cat([b[2] for b in dl]) for dl in loaders]
    assert all(torch.equal(i, idx[0]) for i in idx) and len(idx[0]) == 10
    assert torch.all(idx[0][1:] > idx[0][:-1])  # sorted split indices
    assert idx[0].max() > 9  # a seeded random subset, not the first ten (the split is sorted by nothing useful)
    again = RobustnessDataModule(digits(), corruptions=[], limit_per_loader=10)
    assert torch.equal(torch.cat([b[2] for b in again.test_dataloader()[0]]), idx[0])


def test_corruption_applied_per_loader_with_dataset_indices():
    dm = RobustnessDataModule(digits(), corruptions=["gaussian_noise"], severities=[2], table="cifar10", seed=3)
    batch = next(iter(dm.test_dataloader()[1]))
    images, labels, indices = dm.datamodule.prepare_batch(batch)
    clean = dm.perturb_batch(images, labels, indices, 0)
    assert clean is images
    noisy = dm.perturb_batch(images, labels, indices, 1)
    assert torch.equal(noisy, corrupt(images, "gaussian_noise", 2, indices=indices, seed=3, table="cifar10"))
    assert not torch.equal(noisy, images)


def test_attack_needs_grad_mode_with_clear_fix():
    dm = RobustnessDataModule(digits(), corruptions=[], attacks=[{"name": "fgsm"}])
    model = module_from_classifier("test_resnet", __import__("timm").create_model("test_resnet", num_classes=10)).eval()
    images, labels, indices = dm.datamodule.prepare_batch(next(iter(dm.test_dataloader()[1])))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="trainer.inference_mode: false"):
        dm.perturb_batch(images, labels, indices, 1, model)
    adv = dm.perturb_batch(images, labels, indices, 1, model)
    assert (adv - images).abs().max() <= 8 / 255 + 1e-6 and not torch.equal(adv, images)

    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)  # inference_mode=True
    with pytest.raises(RuntimeError) as err:
        trainer.test(model, datamodule=dm, verbose=False)
    assert str(err.value) == INFERENCE_MODE_FIX


def test_bad_arguments_explain():
    with pytest.raises(ValueError, match="unknown corruption 'fogg'"):
        RobustnessDataModule(digits(), corruptions=["fogg"])
    with pytest.raises(ValueError, match="unknown severity table 'cifar100'"):
        RobustnessDataModule(digits(), table="cifar100")
    with pytest.raises(TypeError, match="image DataModule"):
        RobustnessDataModule(pl.LightningDataModule())


def test_imagenet_top_becomes_an_equal_transfer_module():
    import timm

    torch.manual_seed(0)
    top = timm.create_model("test_resnet", num_classes=7).eval()
    module = module_from_classifier("test_resnet", top, inference={"precision": "fp32"}).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(module(x), top((x - 0.5) / 0.5), atol=1e-5)  # test_resnet's own mean/std 0.5
    with pytest.raises(ValueError, match="ImageNet-labelled data"):
        load_module(parse_model_spec("InceptionV3"), num_classes=10)
    with pytest.raises(CheckpointError, match="does not exist"):
        parse_model_spec("runs/missing.ckpt")
