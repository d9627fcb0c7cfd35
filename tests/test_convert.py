"""convert_h5_to_pth.py: every Keras layout and backbone flavour converts to a numerically equal model.

Reference Keras models are built with the real stack (tensorflow-cpu, tf-keras, qubvel
efficientnet, Keras 3) by tests/keras_reference.py in subprocesses, away from torch.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import convert_h5_to_pth
from model_pytorch_directml import CROP_TRAINABLE_FROM, keras_layer_table, load_model

HERE = Path(__file__).resolve().parent
# Only look for TensorFlow: importing it beside torch in one process can crash both.
if importlib.util.find_spec("tensorflow") is None:
    pytest.skip("tensorflow-cpu builds the Keras references (requirements-dev.txt)", allow_module_level=True)


def _build(out: Path, flavour: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    env["TF_USE_LEGACY_KERAS"] = "1" if flavour == "qubvel" else "0"
    log = open(out.parent / f"{flavour}.log", "w")
    return subprocess.Popen([sys.executable, str(HERE / "keras_reference.py"), "--flavour", flavour,
                             str(out), *extra], env=env, stdout=log, stderr=subprocess.STDOUT)


@pytest.fixture(scope="session")
def keras_refs(tmp_path_factory):
    """{flavour: folder with weight files, files.json, reference.npz}; both built in parallel."""
    root = tmp_path_factory.mktemp("keras_refs")
    outs = {"qubvel": root / "qubvel", "keras3-apps": root / "keras3-apps"}
    procs = {"qubvel": _build(outs["qubvel"], "qubvel", "--with-b1"),
             "keras3-apps": _build(outs["keras3-apps"], "keras3-apps")}
    for flavour, proc in procs.items():
        if proc.wait(timeout=900) != 0:
            log = (root / f"{flavour}.log").read_text()[-3000:]
            pytest.fail(f"building the {flavour} Keras reference failed:\n{log}")
    return outs


def _images(ref) -> torch.Tensor:
    return torch.from_numpy(ref["images_uint8"]).permute(0, 3, 1, 2).float() / 255.0


def assert_matches_reference(model, ref, prob_tol=1e-4, feature_rtol=1e-4):
    x = _images(ref)
    with torch.no_grad():
        prob = model.predict_proba(x).numpy()
        a, b = model.features(x)
        z = model.pool(a.clone(), b.clone())[:, :65536].numpy()
    assert np.abs(prob - ref["prob"]).max() <= prob_tol
    for ours, theirs in ((a, ref["features1"]), (b, ref["features2"])):
        ours = ours.permute(0, 2, 3, 1).numpy()
        assert np.abs(ours - theirs).max() <= feature_rtol * np.abs(theirs).max()
    assert np.abs(z - ref["bilinear_first65536"]).max() <= 1e-5
    return prob


def _not_collapsed(ref):
    # A parity test on images that all give the same output would be blind.
    assert ref["prob"].std() > 0.02, ref["prob"].ravel()
    f = ref["features1"].reshape(len(ref["prob"]), -1)
    assert np.abs(f - f.mean(0)).max() > 0.1 * np.abs(f).max()


@pytest.mark.parametrize("flavour,layout,expected_layout", [
    ("qubvel", "legacy", "legacy (Keras 2) HDF5 weights"),
    ("qubvel", "full", "legacy (Keras 2) full-model .h5"),
    ("qubvel", "objgraph", "object-graph .weights.h5"),
    ("keras3-apps", "objgraph", "object-graph .weights.h5"),
    ("keras3-apps", "full", "Keras-3 legacy full-model .h5"),
])
def test_every_layout_matches_keras(keras_refs, tmp_path, capsys, flavour, layout, expected_layout):
    folder = keras_refs[flavour]
    src = folder / json.loads((folder / "files.json").read_text())[layout]
    ref = np.load(folder / "reference.npz")
    _not_collapsed(ref)
    dst = tmp_path / "model.pth"
    assert convert_h5_to_pth.main([str(src), str(dst), "--model-type", "crop"]) == 0
    out = capsys.readouterr().out
    assert expected_layout in out and "all model parameters filled" in out
    model = load_model(dst)
    assert model.meta["provenance"]["layout"] == expected_layout
    assert model.meta["threshold"] == 0.01 and model.meta["model_type"] == "crop"
    assert_matches_reference(model, ref)
    if flavour == "keras3-apps":  # raw 0-255 input, ImageNet mean, std (TF issue 49930 rescaling)
        assert np.allclose(model.config.mean, [0.485, 0.456, 0.406], atol=1e-6)
        assert np.allclose(model.config.std, [0.229, 0.224, 0.225], atol=1e-6)


def test_keras_apps_without_std_rescaling_is_a_different_model(keras_refs, tmp_path):
    """--std-rescaling no (a Keras < 2.9 model) must change the input std, i.e. the flag is real."""
    src = keras_refs["keras3-apps"] / "objgraph.weights.h5"
    convert_h5_to_pth.convert(src, tmp_path / "m.pth", std_rescaling="no")
    assert np.allclose(load_model(tmp_path / "m.pth").config.std, np.sqrt([0.229, 0.224, 0.225]), atol=1e-6)


def test_shared_fixture_matches_reference(shared_fixture, tmp_path):
    h5, ref_path = shared_fixture
    ref = np.load(ref_path)
    convert_h5_to_pth.convert(h5, tmp_path / "fixture.pth")
    assert_matches_reference(load_model(tmp_path / "fixture.pth"), ref)


def test_layer_table_equals_real_qubvel_model(keras_refs):
    real = json.loads((keras_refs["qubvel"] / "layers.json").read_text())
    table = keras_layer_table()
    assert len(table) == len(real)
    for row, (name, cls, trainable) in zip(table, real):
        assert row.keras_class == cls
        assert row.keras_name == name or row.index == 0  # Keras numbers input layers: input_2, ...
        # The original froze layers[:150]: our boundary must fall at the same layer.
        assert trainable == (row.index >= CROP_TRAINABLE_FROM)
    assert table[CROP_TRAINABLE_FROM].keras_name == "block5c_se_expand"
    assert table[CROP_TRAINABLE_FROM].timm_module == "blocks.4.2.se.conv_expand"


# ---------------------------------------------------------------------------------------------
# Bad files: a clear one-line error naming the problem, and nothing written
# ---------------------------------------------------------------------------------------------

def _convert_fails(capsys, src, dst, *words):
    assert convert_h5_to_pth.main([str(src), str(dst)]) == 2  # a user error, as argparse exits
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for word in words:
        assert word in err, err
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]  # no temp left
    return err


def test_not_hdf5(tmp_path, capsys):
    src = tmp_path / "model.h5"
    src.write_text("this is not a Keras file\n")
    _convert_fails(capsys, src, tmp_path / "out.pth", "model.h5", "not an HDF5 file")


def test_missing_file(tmp_path, capsys):
    _convert_fails(capsys, tmp_path / "nope.h5", tmp_path / "out.pth", "nope.h5", "not found")


def test_hdf5_but_not_keras(tmp_path, capsys):
    src = tmp_path / "data.h5"
    with h5py.File(src, "w") as f:
        f["x"] = np.zeros(3)
    _convert_fails(capsys, src, tmp_path / "out.pth", "data.h5", "not a Keras weights file")


def test_truncated_file(keras_refs, tmp_path, capsys):
    data = (keras_refs["qubvel"] / "objgraph.weights.h5").read_bytes()
    src = tmp_path / "cut.weights.h5"
    src.write_bytes(data[: len(data) // 2])
    _convert_fails(capsys, src, tmp_path / "out.pth", "cut.weights.h5")


def test_missing_layer(keras_refs, tmp_path, capsys):
    src = tmp_path / "missing.h5"
    shutil.copy(keras_refs["qubvel"] / "legacy.h5", src)
    with h5py.File(src, "r+") as f:
        group = f["EfficientNetB0_noisy-studentWeight"]
        names = [n for n in group.attrs["weight_names"] if not str(n).startswith("block3a_se_reduce/")]
        group.attrs["weight_names"] = names
    _convert_fails(capsys, src, tmp_path / "out.pth", "block3a_se_reduce", "EfficientNetB0_noisy-studentWeight")


def test_wrong_shape(keras_refs, tmp_path, capsys):
    src = tmp_path / "shape.weights.h5"
    shutil.copy(keras_refs["qubvel"] / "objgraph.weights.h5", src)
    with h5py.File(src, "r+") as f:
        del f["layers/functional_1/layers/conv2d_5/vars/0"]
        f["layers/functional_1/layers/conv2d_5/vars/0"] = np.zeros((1, 1, 24, 7), "float32")
    _convert_fails(capsys, src, tmp_path / "out.pth", "functional_1", "(1, 1, 24, 7)")


def test_efficientnet_b1_is_refused(keras_refs, tmp_path, capsys):
    _convert_fails(capsys, keras_refs["qubvel"] / "b1.h5", tmp_path / "out.pth",
                   "EfficientNetB1_0", "not part of EfficientNetB0")


def test_existing_output_untouched_on_error(tmp_path, capsys):
    dst = tmp_path / "out.pth"
    dst.write_bytes(b"previous")
    src = tmp_path / "bad.h5"
    src.write_text("nope")
    assert convert_h5_to_pth.main([str(src), str(dst)]) == 2
    assert dst.read_bytes() == b"previous"
