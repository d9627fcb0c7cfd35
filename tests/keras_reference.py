"""Build reference Keras CRBL models with the real Keras stack and save them in every layout.

Run in a subprocess, away from torch (tests/test_convert.py does):

    TF_USE_LEGACY_KERAS=1 python tests/keras_reference.py --flavour qubvel OUT_DIR
    python tests/keras_reference.py --flavour keras3-apps OUT_DIR

Weights are random but realistic: BatchNorm gamma/beta jittered, BN statistics calibrated on
varied synthetic images (otherwise every image gives nearly the same features and a parity test
is blind), and the Dense head points along a direction in which the bilinear vectors vary, so
probabilities spread over (0, 1). Writes the weight files plus reference.npz (images, prob,
features1/2, bilinear vector head) for images the calibration never saw.
"""
import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def synthetic_images(n, size, seed):
    """Varied uint8 RGB images: gradients, blobs, stripes and noise of random colours."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        img = rng.uniform(0, 1, 3) * xx[..., None] + rng.uniform(0, 1, 3) * yy[..., None]
        for _ in range(rng.integers(1, 5)):
            cy, cx, r = rng.uniform(0, 1, 2).tolist() + [rng.uniform(0.05, 0.3)]
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[mask] = rng.uniform(0, 1, 3)
        freq = rng.uniform(2, 20)
        img += 0.3 * np.sin(2 * np.pi * freq * (xx if rng.random() < 0.5 else yy))[..., None]
        img += rng.normal(0, rng.uniform(0.01, 0.2), img.shape)
        img = (img - img.min()) / (img.max() - img.min() + 1e-9)
        images.append((img * 255).astype(np.uint8))
    return np.stack(images)


def bilinear(x):
    """The original CRBL Lambda (tf imported inside: a closure over a module cannot be saved)."""
    import tensorflow as tf
    a, b = x
    shape = tf.shape(a)
    hw = shape[1] * shape[2]
    a = tf.reshape(a, [shape[0], hw, a.shape[-1]])
    b = tf.reshape(b, [shape[0], hw, b.shape[-1]])
    phi = tf.matmul(a, b, transpose_a=True) / tf.cast(hw, tf.float32)
    phi = tf.reshape(phi, [shape[0], a.shape[-1] * b.shape[-1]])
    y = tf.sign(phi) * tf.sqrt(tf.abs(phi) + 1e-12)
    return tf.nn.l2_normalize(y, axis=-1)


def calibrate_and_jitter(backbone, images, rng):
    """Jitter BN gamma/beta, then set moving stats to the batch stats of varied images.

    With momentum 0, one training-mode pass sets each BN's moving statistics to the batch
    statistics it saw; inference on the same data then reproduces the training-mode activations.
    """
    bns = [l for l in backbone.layers if "BatchNormalization" in type(l).__name__]
    for bn in bns:
        gamma, beta, mean, var = bn.get_weights()
        bn.set_weights([gamma * rng.uniform(0.7, 1.3, gamma.shape), beta + rng.normal(0, 0.2, beta.shape),
                        mean, var])
        bn.momentum = 0.0
    backbone(images, training=True)
    for bn in bns:
        bn.momentum = 0.99


def build_qubvel(size, calib, rng):
    import tensorflow as tf
    import efficientnet.tfkeras as efn
    from tensorflow import keras  # tf-keras under TF_USE_LEGACY_KERAS=1

    inp = keras.layers.Input((size, size, 3))
    backbones = []
    for weights_name in ("imagenetWeight", "noisy-studentWeight"):
        base = efn.EfficientNetB0(weights=None, include_top=False, input_shape=(size, size, 3))
        base._name = f"EfficientNetB0_{weights_name}"
        calibrate_and_jitter(base, calib, rng)
        for layer in base.layers[:150]:
            layer.trainable = False
        backbones.append(base)
    return keras, tf, inp, backbones


def build_keras3_apps(size, calib, rng):
    """keras.applications EfficientNetB0 as built with weights='imagenet' on Keras >= 2.9:
    Rescaling(1/255), Normalization (variance holding the std), Rescaling(1/sqrt(std))."""
    from unittest import mock
    import keras
    import tensorflow as tf
    from keras.src.applications import efficientnet as keras_effnet

    inp = keras.layers.Input((size, size, 3))
    backbones = []
    for k in range(2):
        # weights="imagenet" adds the TF-issue-49930 Rescaling; skip the download itself.
        with mock.patch.object(keras_effnet.file_utils, "get_file", return_value="unused"), \
                mock.patch.object(keras.Model, "load_weights", lambda *a, **kw: None):
            base = keras_effnet.EfficientNetB0(weights="imagenet", include_top=False,
                                               input_shape=(size, size, 3),
                                               name=f"EfficientNetB0_{k}")
        norm = [l for l in base.layers if type(l).__name__ == "Normalization"][0]
        mean, var, count = norm.get_weights()
        norm.set_weights([np.reshape(IMAGENET_MEAN, mean.shape), np.reshape(IMAGENET_STD, var.shape),
                          count])
        norm.finalize_state()  # Keras 3 computes the mean/variance it applies from the weights here
        calibrate_and_jitter(base, calib.astype("float32") * 255.0, rng)
        for layer in base.layers[:150]:
            layer.trainable = False
        backbones.append(base)
    return keras, tf, inp, backbones


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_dir")
    p.add_argument("--flavour", choices=["qubvel", "keras3-apps"], default="qubvel")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--with-b1", action="store_true", help="also save b1.h5 (EfficientNetB1 backbones)")
    args = p.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    calib = synthetic_images(48, args.size, seed=1).astype("float32") / 255.0
    test_u8 = synthetic_images(args.n_test, args.size, seed=2)
    build = build_qubvel if args.flavour == "qubvel" else build_keras3_apps
    keras, tf, inp, (b1, b2) = build(args.size, calib, rng)
    scale = 1.0 if args.flavour == "qubvel" else 255.0  # what the model is fed: pixels/255 or raw

    f1, f2 = b1(inp), b2(inp)
    z = keras.layers.Lambda(bilinear, name="lambda")([f1, f2])
    x = keras.layers.Dropout(0.5)(z)
    pred = keras.layers.Dense(1, activation="sigmoid", name="predictions")(x)
    model = keras.Model(inp, pred)

    # Head along a direction of variation of the bilinear vectors, logits ~ N(0, 2²).
    feats = keras.Model(inp, z).predict(calib * scale, verbose=0)
    direction = feats[: len(feats) // 2].mean(0) - feats[len(feats) // 2:].mean(0)
    logits = feats @ direction
    w = direction * (2.0 / (logits.std() + 1e-12))
    b = -float((feats @ w).mean())
    model.get_layer("predictions").set_weights([w[:, None].astype("float32"), np.array([b], "float32")])

    # The real layer list (before any renaming): tests check our Keras-layer table against it.
    layers = [[l.name, type(l).__name__, bool(l.trainable)] for l in b1.layers]
    (out / "layers.json").write_text(json.dumps(layers))

    x_test = test_u8 / 255.0 * scale
    probe = keras.Model(inp, [pred, f1, f2, z])
    prob, o1, o2, zz = probe.predict(x_test, verbose=0)
    np.savez(out / "reference.npz", images_uint8=test_u8, prob=prob, features1=o1, features2=o2,
             bilinear_first65536=zz[:, :65536])

    files = save_layouts(model, b1, b2, out, args.flavour)
    if args.with_b1:  # a CRBL-shaped model on EfficientNetB1 backbones: must be refused
        save_b1_model(keras, out)
        files["b1"] = "b1.h5"
    (out / "files.json").write_text(json.dumps(files))
    print("spread of probabilities:", prob.ravel().round(3).tolist(), file=sys.stderr)


def save_layouts(model, b1, b2, out: Path, flavour: str) -> dict:
    """The model in every weight-file layout its Keras writes; returns {layout: file name}."""
    if flavour == "qubvel":
        model.save(str(out / "full.h5"))                      # full model, model_weights/ + config
        # As the original: inner layers renamed model1_/model2_ after building (their variables
        # keep the unprefixed names). Done after model.save, whose config cannot take it.
        for base, prefix in ((b1, "model1_"), (b2, "model2_")):
            for layer in base.layers:
                layer._name = prefix + layer.name
        model.save_weights(str(out / "legacy.h5"))            # tf-keras 2.x legacy HDF5
        model.save_weights(str(out / "objgraph.weights.h5"))  # object-graph layout
        files = {"legacy": "legacy.h5", "full": "full.h5", "objgraph": "objgraph.weights.h5"}
    else:
        model.save_weights(str(out / "objgraph.weights.h5"))  # Keras 3: with vars 'name' attrs
        model.save(str(out / "full.h5"))                      # Keras-3 legacy full-model HDF5
        files = {"objgraph": "objgraph.weights.h5", "full": "full.h5"}
    return files


def save_b1_model(keras, out: Path) -> None:
    import efficientnet.tfkeras as efn
    inp1 = keras.layers.Input((64, 64, 3))
    feats1 = []
    for k in range(2):
        b1_model = efn.EfficientNetB1(weights=None, include_top=False, input_shape=(64, 64, 3))
        b1_model._name = f"EfficientNetB1_{k}"
        feats1.append(b1_model(inp1))
    z1 = keras.layers.Lambda(bilinear, name="lambda")(feats1)
    keras.Model(inp1, keras.layers.Dense(1, activation="sigmoid")(z1)).save_weights(str(out / "b1.h5"))


if __name__ == "__main__":
    main()
