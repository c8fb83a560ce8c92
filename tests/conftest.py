"""Test-wide settings: Keras always on the torch backend, never TensorFlow; small thread counts."""
import os

os.environ.setdefault("KERAS_BACKEND", "torch")
os.environ["KERAS_BACKEND"] = "torch"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
