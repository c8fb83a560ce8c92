"""KerasNASNetA (NASNetMobile: timm's NASNet-A cells, 4 per stage) behaves as a timm backbone.

The numbers are proven by the parity tests; this checks what the app uses besides ``forward``:
pooled features, a new classifier, ``features_only`` taps and the fine-tuning layer groups.
"""
import timm
import torch

from lightning_app.finetune import layer_groups
from lightning_app.zoo import create_backbone
from lightning_app.zoo.families.nasnet import KerasNASNetA, ZeroPadMaxPool2d


def test_nasnet_mobile_is_a_timm_backbone():
    torch.manual_seed(0)
    model = create_backbone("NASNetMobile", weights=None, num_classes=0).eval()
    assert isinstance(model, KerasNASNetA) and model.cell_names[4] == "reduction_cell_0"
    assert sum(isinstance(m, ZeroPadMaxPool2d) for m in model.modules()) == 8  # 2 per stem / reduction cell
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert model(x).shape == (2, 1056)
        model.reset_classifier(7)
        assert model(x).shape == (2, 7) and model.get_classifier().in_features == 1056
    # 12 normal cells, the reduction cells grouped with the cell after them, the stem first, the head last
    groups = layer_groups(model)
    assert len(groups) == 14
    assert "conv0.conv.weight" in groups[0].param_names and "last_linear.weight" in groups[-1].param_names

    features = timm.create_model("keras_nasnetamobile", features_only=True).eval()
    assert features.feature_info.channels() == [32, 44, 264, 528, 1056]
    with torch.no_grad():
        taps = features(torch.rand(1, 3, 224, 224))
    assert [t.shape[-1] for t in taps] == [111, 56, 28, 14, 7]
