"""``python -m converters evaluate``: top-1 / top-5 on a class-per-folder ImageNet validation set.

A random-weight DenseNet121 (saved as a converted file) is evaluated on a generated folder whose
images were placed, by predictions computed here independently (own crop and normalisation), in the
folder of their top-ranked class, their 4th-ranked class or a far-off class, with folder names that
are WordNet-style ids mapped through a class-index file in Keras's layout (shuffled, so sorted order
would be wrong). The command must report exactly the expected figures beside the published ones.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lightning_app.zoo import create_backbone
from lightning_app.zoo.cli import main
from lightning_app.zoo.evaluate import class_indices, evaluate

MODEL, SIZE = "DenseNet121", 56  # shorter side floor(56 / 0.875) = 64: the generated images need no resize
IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])  # Keras "torch" mode


@pytest.fixture(autouse=True)
def no_cached_keras_index(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))  # no cached imagenet_class_index.json


@pytest.fixture(scope="module")
def val_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = create_backbone(MODEL, weights=None).eval()
    wnids = [f"n{10_000_000 + k:08d}" for k in rng.permutation(1000)]  # output index -> folder name
    index_file = root / "imagenet_class_index.json"
    index_file.write_text(json.dumps({str(i): [w, f"class{i}"] for i, w in enumerate(wnids)}))

    shapes = [(64, 80)] * 5 + [(80, 64)] * 4  # (H, W): landscape and portrait, shorter side 64
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    tops_lefts = [((h - SIZE) // 2, (w - SIZE) // 2) for h, w in shapes]  # the centre crop
    crops = np.stack([a[t:t + SIZE, le:le + SIZE] for a, (t, le) in zip(images, tops_lefts)])
    x = torch.from_numpy(((crops / 255.0 - IMAGENET_MEAN) / IMAGENET_STD).transpose(0, 3, 1, 2)).float()
    with torch.no_grad():
        # a random net's logits hardly depend on its input; centring the pooled features on these images makes
        # them depend on every pixel (a flip, a shifted crop or another normalisation changes the ranking)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        model.classifier.bias.copy_(-features.mean(0) @ model.classifier.weight.T)  # logits = W (f - mean f)
        ranking = model(x).argsort(dim=1, descending=True)
    weights = root / "random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights),
              metadata={"keras_model": MODEL})
    ranks = [0, 3, 500] * 3  # top-1 hit, top-5 hit only, miss
    data = root / "val"
    for i, (image, rank) in enumerate(zip(images, ranks)):
        folder = data / wnids[int(ranking[i, rank])]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"img{i}.png")
    expected = (100 * 3 / 9, 100 * 6 / 9)
    return dict(data=data, weights=weights, index=index_file, expected=expected, classes=len(set(
        int(ranking[i, r]) for i, r in enumerate(ranks))))


def test_evaluate_reports_expected_top1_top5_beside_published(val_folder, capsys):
    args = ["evaluate", "--model", MODEL, "--data", str(val_folder["data"]), "--class-index",
            str(val_folder["index"]), "--weights", str(val_folder["weights"]), "--size", str(SIZE),
            "--workers", "0", "--batch-size", "4", "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    top1, top5 = val_folder["expected"]
    assert f"{MODEL} on 9 images in {val_folder['classes']} classes" in out
    assert f"ours (ported weights)     {top1:.3f}  {top5:.3f}".split() == next(
        line for line in out.splitlines() if line.startswith("ours")).split()
    keras = next(line for line in out.splitlines() if line.startswith("Keras"))
    assert "74.972" in keras and "92.258" in keras and "measured at 224 px" in keras


def test_sorted_order_would_be_wrong_and_index_folders_work(val_folder):
    """Folders renamed to their output index give the same figures without a class-index file."""
    import shutil

    table = {v[0]: int(k) for k, v in json.loads(val_folder["index"].read_text()).items()}
    renamed = val_folder["data"].parent / "val_by_index"
    shutil.copytree(val_folder["data"], renamed)
    for folder in list(renamed.iterdir()):
        folder.rename(renamed / str(table[folder.name]))
    result = evaluate(MODEL, renamed, weights=val_folder["weights"], size=SIZE, workers=0, device="cpu")
    assert (result.top1, result.top5) == pytest.approx(val_folder["expected"])
    folders = sorted(p.name for p in val_folder["data"].iterdir())
    assert class_indices(folders, val_folder["index"])[0] != sorted(class_indices(folders, val_folder["index"])[0])


def test_class_index_rules(tmp_path):
    wnids = [f"n{k:08d}" for k in range(1000)]
    assert class_indices(wnids)[0] == list(range(1000))  # all 1000 synsets: Keras's (sorted) order
    assert class_indices(["0", "999", "17"])[0] == [0, 999, 17]
    cached = tmp_path / "keras_home" / "models" / "imagenet_class_index.json"
    cached.parent.mkdir(parents=True)
    cached.write_text(json.dumps({"0": ["n00000042", "a"], "1": ["n00000007", "b"]}))
    indices, how = class_indices(["n00000007"])
    assert indices == [1] and str(cached) in how


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("flat", "move them into one subfolder per class"),
    ("wnids_without_index", "pass --class-index imagenet_class_index.json"),
    ("unknown_wnid", "are not in the class index"),
    ("bad_index_file", "is not in Keras's layout"),
    ("index_too_large", "are not ImageNet class indices"),
])
def test_bad_folder_gets_one_paragraph_error(tmp_path, capsys, case, message):
    data = tmp_path / "val"
    image = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    index = tmp_path / "index.json"
    index.write_text(json.dumps({"0": ["n01440764", "tench"]}))
    extra = []
    if case == "flat":
        data.mkdir()
        image.save(data / "a.png")
    elif case in ("wnids_without_index", "unknown_wnid", "bad_index_file"):
        (data / "n01443537").mkdir(parents=True)
        image.save(data / "n01443537" / "a.png")
        if case != "wnids_without_index":
            extra = ["--class-index", str(index)]
        if case == "bad_index_file":
            index.write_text(json.dumps(["n01440764"]))
    elif case == "index_too_large":
        (data / "1000").mkdir(parents=True)
        image.save(data / "1000" / "a.png")
    assert main(["evaluate", "--model", MODEL, "--data", str(data), "--workers", "0", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
