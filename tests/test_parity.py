"""Equivalence proof: for every zoo model, top and notop, Keras and ours agree at the native size.

Keras model (weights=None, explicit input shape) -> random kernels and biases, random BN affine,
BN statistics calibrated on a batch -> legacy .h5 (the official files' layout) -> our converter
-> create_backbone(weights=file) -> same real images -> max |diff| <= 1e-4 * max |Keras output|,
and for very deep nets (``parity_float64=True``) the same in float64 within 1e-9.
The models come from the registry (``@keras_application(..., parity=..., parity_float64=...)``).
"""
import pytest

from converters import parity
from converters.keras_models import build_keras_model, import_keras
from converters.manifest import load_manifest, manifest_from_keras_model, output_layer_name
from lightning_app.zoo import REGISTRY
from lightning_app.zoo.cli import load_zoo_model

try:
    import_keras()
except ImportError:  # pragma: no cover
    pytest.skip("needs keras (pip install -e '.[test]')", allow_module_level=True)

PARITY_MODELS = [name for name, entry in REGISTRY.items() if entry.parity]
#: float64 also runs for models whose float32 check is off (parity=False); the others: ``verify --float64`` on demand
FLOAT64_MODELS = [name for name, entry in REGISTRY.items() if entry.parity_float64]
#: one manifest per architecture: the entries that own one (size variants share their model's)
MANIFEST_MODELS = [name for name, entry in REGISTRY.items() if entry.manifest == entry.keras_name]


class Cases:
    """Parity cases made once per session; kept only while a later test (float64) still needs them."""

    def __init__(self, tmp_path_factory):
        self.tmp_path_factory = tmp_path_factory
        self.cases = {}
        self.top_manifests = {}  # what the cases' Keras builds were: the manifest test need not build them again

    def get(self, name: str) -> parity.ParityCase:
        if name not in self.cases:
            self.cases[name] = parity.make_case(REGISTRY[name], self.tmp_path_factory.mktemp(name))
            self.top_manifests[name] = self.cases[name].top_manifest
        return self.cases[name]

    def release(self, name: str) -> None:
        case = self.cases.pop(name, None)
        if case is not None:
            case.cleanup()


@pytest.fixture(scope="session")
def parity_cases(tmp_path_factory):
    cases = Cases(tmp_path_factory)
    yield cases
    for name in list(cases.cases):
        cases.release(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", PARITY_MODELS)
def test_parity_native_size(name, parity_cases, parity_reports):
    case = parity_cases.get(name)
    try:
        reports = parity.check_case(case, load_model=load_zoo_model)
    finally:
        if name not in FLOAT64_MODELS:
            parity_cases.release(name)
    parity_reports.extend(reports)
    assert [r.include_top for r in reports] == [True, False]
    assert all(r.dtype == "float32" and r.tolerance == 1e-4 for r in reports)
    for report in reports:
        assert report.ok, str(report)
    assert reports[0].top1_agree == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("name", FLOAT64_MODELS)
def test_parity_float64(name, parity_cases, parity_reports):
    """Both sides in float64 (same files): an architecture error cannot hide behind float32 rounding."""
    try:
        reports = parity.check_case_float64(parity_cases.get(name), load_model=load_zoo_model)
    finally:
        parity_cases.release(name)
    parity_reports.extend(reports)
    assert [(r.include_top, r.dtype, r.tolerance) for r in reports] == [(True, "float64", 1e-9),
                                                                        (False, "float64", 1e-9)]
    for report in reports:
        assert report.ok, str(report)
    assert reports[0].top1_agree == 1.0


@pytest.mark.parametrize("name", MANIFEST_MODELS)
def test_manifest_matches_keras(name, parity_cases):
    """The committed layer manifests are what Keras itself builds (order, names, shapes, notop output).

    The top model was built by this session's parity case where there was one (a build costs seconds).
    """
    entry = REGISTRY[name]
    committed = load_manifest(entry.manifest_path)
    hint = f"regenerate with python -m converters manifest --model {name}"
    notop = build_keras_model(entry, include_top=False, initialise=False)  # structure only: no random draws
    assert manifest_from_keras_model(notop) == committed["notop"], f"{name} notop: {hint}"
    assert output_layer_name(notop) == committed["notop_output"], f"{name} notop output: {hint}"
    top = (parity_cases.top_manifests.get(name)
           or manifest_from_keras_model(build_keras_model(entry, True, initialise=False)))
    assert top == committed["top"], f"{name} top: {hint}"


def test_residual_branch_batchnorms():
    """The conditioning rule finds identity blocks' last BNs, not a projection block's two BNs."""
    keras = import_keras()
    names = parity.residual_branch_batchnorms(keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3)))
    assert len(names) == 16 - 4  # 16 bottlenecks, 4 of them projection blocks
    assert "conv2_block2_3_bn" in names and "conv5_block3_3_bn" in names
    assert not names & {"conv2_block1_0_bn", "conv2_block1_3_bn"}


def test_residual_branch_batchnorms_skip_concatenated_sums():
    """NASNet's cell sums are concatenated, not an identity stream: the rule leaves them as they were."""
    model = build_keras_model(REGISTRY["NASNetMobile"], include_top=False, initialise=False)
    assert parity.residual_branch_batchnorms(model) == set()
