"""Test-wide settings and reporting.

* Keras always on the torch backend (never TensorFlow) and on the CPU: Keras's torch backend puts its tensors on
  CUDA whenever CUDA exists (``keras/src/backend/torch/core.py``, ``KERAS_TORCH_DEVICE``), where convolutions run
  in TF32 by default; the parity reference is true float32, the same numbers on every machine.
* Thread counts sized to the machine and the number of pytest-xdist workers: N workers x all-cores torch threads
  oversubscribe the CPU (tiny ops then wait on each other's OpenMP barriers and tests crawl into timeouts).
  An explicit ``OMP_NUM_THREADS`` wins.
* Failures are printed with their traceback the moment they happen (not only in the end summary), and every
  outcome is appended to ``$LIGHTNING_APP_TEST_LOG`` when set, so a run cut short still says what failed and why.
"""
import os

os.environ["KERAS_BACKEND"] = "torch"
os.environ["KERAS_TORCH_DEVICE"] = "cpu"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _threads_per_worker() -> int:
    workers = max(1, int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1))
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus // workers)


if "OMP_NUM_THREADS" not in os.environ and os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = str(_threads_per_worker())  # before torch is imported; subprocesses inherit it

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or _threads_per_worker()))

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


#: run first under pytest-xdist, so the longest tests do not start last and stretch the run
_SLOW_MODULES = ("test_ddp.py", "test_parity.py", "test_robustness_e2e.py", "test_cli.py", "test_checkpoints.py",
                 "test_valid_input.py", "test_head_training.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts the same way, so their collections agree
        items.sort(key=lambda item: not (item.get_closest_marker("slow") or item.path.name in _SLOW_MODULES))


def pytest_runtest_logreport(report):
    """Live outcome log: each failure's traceback at once (terminal + ``$LIGHTNING_APP_TEST_LOG``), every outcome
    with its duration in the log file. Runs in the controlling process only (xdist forwards workers' reports)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    failed = report.failed
    if not failed and report.when != "call" and not report.skipped:
        return
    outcome = "FAILED" if failed else report.outcome.upper()
    where = f" [{report.when}]" if report.when != "call" else ""
    line = f"{outcome} {report.nodeid}{where} ({report.duration:.1f}s)"
    text = f"\n{'=' * 30} {line}\n{report.longreprtext}\n{'=' * 30}\n" if failed else ""
    if failed:
        import sys

        sys.stderr.write(text)
        sys.stderr.flush()
    path = os.environ.get("LIGHTNING_APP_TEST_LOG")
    if path:
        with open(path, "a") as f:
            f.write(text if failed else line + "\n")
