"""The Keras 3 side of every benchmark, as a worker: ``KERAS_BACKEND=jax|tensorflow python _keras.py --worker SPEC``.

Each job does what the seed Keras notebooks do, with Keras at its own best setting: the JAX backend always
jit-compiles (XLA); TensorFlow uses ``jit_compile`` as Keras itself chooses it (``auto``: XLA where a GPU is
visible, not on a CPU-only machine; ``--tf-jit`` overrides); the spec's dtype ``policy`` (``mixed_bfloat16``
on GPU where ours runs bf16) is set before any model is built. Inputs are uint8 images in memory and the
Keras preprocessing (``preprocess_input``) and resizing live inside the model, so they run on the device.
Weights: ``keras.applications.<Model>(weights=None)`` seeded; the first worker of a benchmark saves them as a
legacy ``.h5`` (the official files' layout) that every other runner, ours included, loads.

This module imports neither torch nor anything of ours (TensorFlow and torch must not share a process).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import read_cifar10_train, read_image_folder, worker_main  # noqa: E402
from _timing import median, now  # noqa: E402

SEED = 0


# ----------------------------------------------------------------------------- setup
def _keras(spec: Dict[str, Any]):
    import keras

    if spec.get("policy", "float32") != "float32":
        keras.mixed_precision.set_global_policy(spec["policy"])
    keras.utils.set_random_seed(SEED)
    return keras


def _jit(spec: Dict[str, Any]) -> Any:
    """``jit_compile`` for ``Model.compile``: always on for JAX; Keras's own ``auto`` (or the override) for TF."""
    import keras

    if keras.backend.backend() == "jax":
        return True
    return {"auto": "auto", "true": True, "false": False}[spec.get("tf_jit", "auto")]


def _tf_function_jit(spec: Dict[str, Any]) -> bool:
    """``jit_compile`` for a hand-written ``tf.function``, resolved the way Keras resolves ``auto``."""
    choice = spec.get("tf_jit", "auto")
    if choice != "auto":
        return choice == "true"
    import tensorflow as tf

    return any(d.device_type != "CPU" for d in tf.config.list_physical_devices())


def env_info(spec: Dict[str, Any]) -> Dict[str, Any]:
    import keras

    backend = keras.backend.backend()
    info: Dict[str, Any] = {"keras": keras.__version__, "backend": backend,
                            "policy": keras.mixed_precision.global_policy().name}
    if backend == "jax":
        import jax

        dev = jax.devices()[0]
        info.update(jax=jax.__version__, device=dev.platform, device_kind=getattr(dev, "device_kind", ""), jit=True)
    else:
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        info.update(tensorflow=tf.__version__, device="gpu" if gpus else "cpu", jit=spec.get("tf_jit", "auto"),
                    threads=[tf.config.threading.get_intra_op_parallelism_threads(),
                             tf.config.threading.get_inter_op_parallelism_threads()])
    return info


def _device(info: Dict[str, Any]) -> str:
    return "cuda" if info.get("device") in ("gpu", "cuda") else "cpu"


def base_model(keras, spec: Dict[str, Any]):
    """``keras.applications.<model>(include_top=False, pooling="avg")`` at the native size, with the shared weights."""
    size = int(spec["size"])
    build = getattr(keras.applications, spec.get("application") or spec["model"])
    base = build(weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3),
                 **spec.get("keras_kwargs", {}))
    h5 = Path(spec["h5"])
    if spec.get("save_h5"):
        import h5py
        from keras.src.legacy.saving import legacy_h5_format

        if spec.get("builtin_preprocessing"):
            set_builtin_normalization(keras, base, spec["mean"], spec["std"])

        tmp = h5.with_suffix(".tmp.h5")
        with h5py.File(tmp, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, base)
        os.replace(tmp, h5)
    else:
        base.load_weights(h5)
    return base


def set_builtin_normalization(keras, model, mean: List[float], std: List[float]) -> None:
    """A built-in ``Normalization`` layer (EfficientNet's; ``weights=None`` leaves it at mean 0 / variance 1) set to
    the statistics an ImageNet file holds, as ``converters.parity.set_builtin_normalization`` does for the parity
    tests (not imported: that module imports torch, which must not share a process with TensorFlow)."""
    values = {"mean": np.asarray(mean, np.float64), "variance": np.square(np.asarray(std, np.float64))}
    for layer in model.layers:
        if isinstance(layer, keras.layers.Normalization) and layer.weights:
            for variable in layer.weights:
                role = variable.name.rsplit("/", 1)[-1]
                if role in values:
                    variable.assign(values[role].reshape(tuple(variable.shape)).astype(variable.dtype))
            layer.finalize_state()  # call() reads tensors made from the variables (on JAX: a copy taken at build)


def image_model(keras, spec: Dict[str, Any], base, input_hw: int, head: List[Any], input_dtype: str = "uint8"):
    """Images ``[B, input_hw, input_hw, 3]`` in 0..255 -> (resize to the native size) -> preprocess_input -> base
    -> head. ``input_dtype`` float32 where gradients with respect to the input are needed (a uint8 input
    layer casts them away). The last layer outputs float32 (the Keras mixed-precision guide's advice)."""
    from keras.applications import imagenet_utils

    size = int(spec["size"])
    inputs = keras.Input((input_hw, input_hw, 3), dtype=input_dtype)
    x = keras.layers.Resizing(size, size, interpolation="bilinear")(inputs) if input_hw != size else \
        keras.ops.cast(inputs, keras.mixed_precision.global_policy().compute_dtype)
    if not spec.get("builtin_preprocessing"):  # else the model normalises 0..255 itself (EfficientNet, ConvNeXt...)
        x = imagenet_utils.preprocess_input(x, mode=spec["mode"])
    x = base(x)
    for layer in head:
        x = layer(x)
    x = keras.layers.Activation("linear", dtype="float32")(x)
    return keras.Model(inputs, x)


class _EpochClock:
    """Keras callback: training seconds per epoch (validation excluded), per-batch ends."""

    @staticmethod
    def make(keras):
        class Clock(keras.callbacks.Callback):
            def __init__(self):
                super().__init__()
                self.epochs: List[float] = []
                self.val: List[float] = []
                self._t = self._v = 0.0
                self._val_s = 0.0

            def on_epoch_begin(self, epoch, logs=None):
                self._t, self._val_s = now(), 0.0

            def on_test_begin(self, logs=None):
                self._v = now()

            def on_test_end(self, logs=None):
                self._val_s += now() - self._v

            def on_epoch_end(self, epoch, logs=None):
                self.epochs.append(now() - self._t - self._val_s)
                self.val.append(self._val_s)

        return Clock()


# ----------------------------------------------------------------------------- (a) feature extraction
def extract(spec: Dict[str, Any]) -> Dict[str, Any]:
    """CIFAR-10 train batches -> Resizing(native) + preprocess_input + base.predict -> np.save, like the seed notebook.

    Timed: reading the batches (``data_s``), the first ``predict`` over all images (``predict_s``, includes
    tracing / XLA compilation), ``np.save`` (``save_s``); ``wall_s`` is their sum. ``img_s`` (steady state):
    a second ``predict`` over the full batches, everything already compiled.
    """
    keras = _keras(spec)
    info = env_info(spec)
    base = base_model(keras, spec)
    model = image_model(keras, spec, base, 32, head=[])
    model.compile(jit_compile=_jit(spec))
    batch = int(spec["batch"])
    t0 = now()
    x, _ = read_cifar10_train(Path(spec["data"]))
    t1 = now()
    features = model.predict(x, batch_size=batch, verbose=0)
    t2 = now()
    out = Path(spec["features"])
    np.save(out, np.asarray(features, dtype=np.float32))
    t3 = now()
    n_full = (len(x) // batch) * batch
    steady = batches = outside = float("nan")
    if n_full:
        clock = _batch_clock(keras)
        t = now()
        model.predict(x[:n_full], batch_size=batch, verbose=0, callbacks=[clock])
        total, busy = now() - t, sum(clock.batch_s)
        steady, batches, outside = n_full / total, n_full / busy, total - busy
    return {"env": info, "device": _device(info), "images": len(x), "batch": batch, "wall_s": t3 - t0,
            "data_s": t1 - t0, "predict_s": t2 - t1, "save_s": t3 - t2, "img_s": steady,
            "batches_img_s": batches, "outside_batches_s": outside,
            "cold_img_s": len(x) / (t2 - t1), "dim": int(features.shape[1])}


def _batch_clock(keras: Any) -> Any:
    """A callback timing each ``predict`` batch (``batch_s``): the steady ``predict`` minus their sum is the time
    Keras spends outside its batches (iterator, output gathering, and the waits its TensorFlow backend shows on
    the 2-core CPU machine, about 5.1 s each at times; README "Performance")."""

    class BatchClock(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batch_s: List[float] = []

        def on_predict_batch_begin(self, batch, logs=None):
            self._t = now()

        def on_predict_batch_end(self, batch, logs=None):
            # JAX dispatches asynchronously: wait for the batch's outputs (a small copy) before reading the clock
            keras.tree.map_structure(np.asarray, (logs or {}).get("outputs"))
            self.batch_s.append(now() - self._t)

    return BatchClock()


# ----------------------------------------------------------------------------- (b) head training
def head(spec: Dict[str, Any]) -> Dict[str, Any]:
    """``Dense(hidden, relu) -> Dropout -> Dense(classes)`` ``fit`` on the cached features (train + validation
    arrays), Adam, sparse cross-entropy from logits, accuracy. Seconds per epoch, validation excluded."""
    keras = _keras(spec)
    info = env_info(spec)
    x, y = np.load(spec["train_x"]), np.load(spec["train_y"])
    xv, yv = np.load(spec["val_x"]), np.load(spec["val_y"])
    classes = int(spec["classes"])
    layers = [keras.Input((x.shape[1],))]
    for h in spec["hidden"]:
        layers += [keras.layers.Dense(h, activation="relu")]
        if spec["dropout"] > 0:
            layers.append(keras.layers.Dropout(spec["dropout"]))
    layers.append(keras.layers.Dense(classes))
    model = keras.Sequential(layers)
    model.compile(optimizer=keras.optimizers.Adam(spec["lr"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"],
                  jit_compile=_jit(spec), steps_per_execution=int(spec.get("steps_per_execution", 1)))
    clock = _EpochClock.make(keras)
    t = now()
    hist = model.fit(x, y, batch_size=int(spec["batch"]), epochs=int(spec["epochs"]), validation_data=(xv, yv),
                     shuffle=True, verbose=0, callbacks=[clock])
    wall = now() - t
    return {"env": info, "device": _device(info), "rows": len(x), "val_rows": len(xv), "epoch_s": clock.epochs,
            "val_s": clock.val, "first_epoch_s": clock.epochs[0], "steady_epoch_s": median(clock.epochs[1:]),
            "fit_wall_s": wall, "train_acc": float(hist.history["accuracy"][-1]),
            "val_acc": float(hist.history["val_accuracy"][-1])}


# ----------------------------------------------------------------------------- (c) fine-tuning
def finetune(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Every layer trainable: base + ``Dense(hidden, relu) -> Dropout -> Dense(classes)``, Adam, ``fit`` for
    two epochs on the decoded images (uint8, in memory, native size); images/s of the second epoch."""
    keras = _keras(spec)
    info = env_info(spec)
    base = base_model(keras, spec)
    head_layers: List[Any] = []
    for h in spec["hidden"]:
        head_layers.append(keras.layers.Dense(h, activation="relu"))
        if spec["dropout"] > 0:
            head_layers.append(keras.layers.Dropout(spec["dropout"]))
    head_layers.append(keras.layers.Dense(int(spec["classes"])))
    model = image_model(keras, spec, base, int(spec["size"]), head_layers)
    model.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(spec["lr"]),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=_jit(spec))
    x, y = read_image_folder(Path(spec["data"]), spec["class_names"])
    batch = int(spec["batch"])
    n = (len(x) // batch) * batch
    clock = _EpochClock.make(keras)
    model.fit(x[:n], y[:n], batch_size=batch, epochs=int(spec.get("epochs", 2)), shuffle=False, verbose=0,
              callbacks=[clock])
    steady = median(clock.epochs[1:])
    return {"env": info, "device": _device(info), "images": n, "batch": batch, "epoch_s": clock.epochs,
            "first_epoch_s": clock.epochs[0], "img_s": n / steady}


# ----------------------------------------------------------------------------- (d) robustness
def _fgsm_step(keras, model, spec: Dict[str, Any]):
    """``(uint8 images, labels) -> logits of the FGSM images``, compiled: input gradient of the summed
    cross-entropy, ``clip(x + eps * sign(grad), 0, 255)`` in Keras pixel units, forward pass."""
    eps = float(spec["eps"]) * 255.0
    if keras.backend.backend() == "jax":
        import jax
        import jax.numpy as jnp

        def logits_fn(tv, ntv, x):
            out, _ = model.stateless_call(tv, ntv, x, training=False)
            return out.astype(jnp.float32)

        def loss_fn(x, y, tv, ntv):
            logp = jax.nn.log_softmax(logits_fn(tv, ntv, x))
            return -jnp.take_along_axis(logp, y[:, None], axis=1).sum()

        @jax.jit
        def step(tv, ntv, x, y):
            x = x.astype(jnp.float32)
            g = jax.grad(loss_fn)(x, y, tv, ntv)
            return logits_fn(tv, ntv, jnp.clip(x + eps * jnp.sign(g), 0.0, 255.0))

        def run(x, y):  # the variables' current buffers: predict() replaces (donates) them
            tv = [v.value for v in model.trainable_variables]
            ntv = [v.value for v in model.non_trainable_variables]
            return np.asarray(step(tv, ntv, x, y))

        return run
    import tensorflow as tf

    @tf.function(jit_compile=_tf_function_jit(spec))
    def tf_step(x, y):
        x = tf.cast(x, tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.keras.losses.sparse_categorical_crossentropy(
                y, tf.cast(model(x, training=False), tf.float32), from_logits=True))
        g = tape.gradient(loss, x)
        return model(tf.clip_by_value(x + eps * tf.sign(g), 0.0, 255.0), training=False)

    return lambda x, y: tf_step(x, y).numpy()


def robustness(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Per test loader of the robustness run: ``predict`` on the same (already perturbed) uint8 arrays, and
    for FGSM the compiled attack step + forward pass. Each function is warmed up on one batch first (not
    timed); images/s per loader."""
    keras = _keras(spec)
    info = env_info(spec)
    base = base_model(keras, spec)
    head_layers: List[Any] = []
    for h in spec["hidden"]:
        head_layers.append(keras.layers.Dense(h, activation="relu"))
    head_layers.append(keras.layers.Dense(int(spec["classes"])))
    model = image_model(keras, spec, base, int(spec["size"]), head_layers, input_dtype="float32")
    model.compile(jit_compile=_jit(spec))
    batch = int(spec["batch"])
    labels = np.load(spec["labels"]).astype(np.int32)
    loaders = []
    fgsm = None
    for key, kind, path in spec["loaders"]:
        x = np.load(path)
        if kind == "attack":
            fgsm = fgsm or _fgsm_step(keras, model, spec)
            adv = fgsm(x[:batch], labels[:batch])  # warm-up (compilation) and a check that the attack attacks
            clean = model.predict(x[:batch], batch_size=batch, verbose=0)
            if not np.abs(np.asarray(adv, np.float32) - np.asarray(clean, np.float32)).max() > 0:
                raise RuntimeError("the FGSM step left the logits unchanged: its input gradient is zero")
            t = now()
            for i in range(0, len(x), batch):
                fgsm(x[i:i + batch], labels[i:i + batch])
            dt = now() - t
        else:
            model.predict(x[:batch], batch_size=batch, verbose=0)  # warm-up
            t = now()
            model.predict(x, batch_size=batch, verbose=0)
            dt = now() - t
        loaders.append({"loader": key, "kind": kind, "images": len(x), "seconds": dt, "img_s": len(x) / dt})
    return {"env": info, "device": _device(info), "batch": batch, "loaders": loaders}


def save_weights(spec: Dict[str, Any]) -> Dict[str, Any]:
    """Only build the seeded base model and save its weights (``spec["h5"]``) for the other runners."""
    keras = _keras(spec)
    base_model(keras, dict(spec, save_h5=True))
    return {"env": env_info(spec), "h5": spec["h5"]}


JOBS = {"save_weights": save_weights, "extract": extract, "head": head, "finetune": finetune, "robustness": robustness}

if __name__ == "__main__":
    if not worker_main(JOBS, sys.argv[1:]):
        sys.exit("usage: KERAS_BACKEND=jax|tensorflow python benchmarks/_keras.py --worker SPEC.json")
