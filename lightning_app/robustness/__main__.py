"""``python -m lightning_app.robustness --config configs/robustness.yaml --models ... --baseline ... --out ...``
(see :mod:`lightning_app.robustness.runner`)."""
from lightning_app.robustness.runner import main

if __name__ == "__main__":
    main()
