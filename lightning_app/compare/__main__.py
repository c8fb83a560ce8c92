"""``python -m lightning_app.compare --config CONFIG.yaml --backbones A B [--out DIR] [--trainer.* ...]``
(see :mod:`lightning_app.compare.runner`; ``--debug`` shows the traceback of an error)."""
from lightning_app.compare.runner import main
from lightning_app.entry import run

if __name__ == "__main__":
    run(main)
