"""``python -m lightning_app.robustness --config configs/robustness.yaml --models ... --baseline ... --out ...``
(see :mod:`lightning_app.robustness.runner`; ``--debug`` shows the traceback of an error)."""
from lightning_app.entry import run
from lightning_app.robustness.runner import main

if __name__ == "__main__":
    run(main)
