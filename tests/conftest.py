"""Test-wide settings: Keras always on the torch backend, never TensorFlow; small thread counts."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ["KERAS_BACKEND"] = "torch"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest

_PARITY_REPORTS = []


@pytest.fixture
def parity_reports():
    """Collects parity reports; they are printed at the end of the run."""
    return _PARITY_REPORTS


def pytest_terminal_summary(terminalreporter):
    if _PARITY_REPORTS:
        terminalreporter.section("Keras parity (max |diff| / max |Keras output|)")
        for report in _PARITY_REPORTS:
            terminalreporter.write_line(str(report))
