"""ONNX export (convert_h5_to_pth.export_onnx, convert_h5_to_pth.py --export-onnx):
onnxruntime on CPU against PyTorch and against the original Keras model, dynamic batch."""
import sys

import numpy as np
import pytest
import torch

import convert_h5_to_pth
import model_pytorch_directml as mp
from keras_reference import synthetic_images  # numpy only: no TensorFlow in this process
from convert_h5_to_pth import export_onnx
from model_pytorch_directml import CRBLConfig, CRBLError, CRBLModel, load_model

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def images(n, seed):
    """Varied RGB images in [0,1], (N,3,64,64): noise images all look alike to the model."""
    return torch.from_numpy(synthetic_images(n, 64, seed) / 255.0).float().permute(0, 3, 1, 2)


@pytest.fixture(scope="module")
def model():
    """A random 64 px model with realistic activations: BN statistics set from a batch of images
    (random-init features are ~1e-5, where every path agrees trivially), and a head that
    spreads probabilities away from 0.5."""
    torch.manual_seed(0)
    model = CRBLModel(CRBLConfig(image_size=64))
    batchnorms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in batchnorms:
        bn.momentum = 1.0  # one training pass sets running stats to the batch stats
    model.train()
    with torch.no_grad():
        model(images(16, seed=1))
        # 16 against 16 images: a direction fitted on fewer barely spreads unseen images
        a, b = model.features(images(32, seed=2))
        z = mp.BilinearPooling()(a, b)
        direction = z[:16].mean(0) - z[16:].mean(0)
        model.head.weight.copy_(direction / (z @ direction).std() * 2.0)
        model.head.bias.fill_(-float((z @ model.head.weight[0]).mean()))
    for bn in batchnorms:
        bn.momentum = 0.01
    return mp.place_model(model, "cpu").eval()


def ort_probs(path, images):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["probs"], {"images": images})[0]


def test_export_matches_pytorch_at_any_batch(model, tmp_path):
    path = tmp_path / "crbl.onnx"
    report = export_onnx(model, path)
    assert report["max_abs_prob_diff"] <= 1e-4 and report["batch_sizes"] == [1, 3]
    # The caller's model is left as it was (the export works on a CPU NCHW copy).
    assert model.channels_last and not model.training
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"]
    dims = graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "batch" and [d.dim_value for d in dims[1:]] == [3, 64, 64]
    for n in (1, 3, 6):
        x = images(n, seed=10 + n)
        with torch.no_grad():
            expected = torch.sigmoid(model(x)).numpy()
        got = ort_probs(path, x.numpy())
        assert got.shape == (n, 1)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert expected.std() > 0.05  # probabilities spread: the comparison is not blind


def test_failed_check_writes_nothing(model, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_h5_to_pth, "ONNX_TOLERANCE", -1.0)
    with pytest.raises(CRBLError, match="ONNX export check failed"):
        export_onnx(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnxruntime_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import raises ImportError
    with pytest.raises(CRBLError, match="pip install onnxruntime"):
        convert_h5_to_pth.require_onnxruntime()
    # The converter says so before reading (or writing) anything.
    code = convert_h5_to_pth.main([str(tmp_path / "missing.h5"), str(tmp_path / "out.pth"),
                                   "--export-onnx", str(tmp_path / "out.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and "pip install onnxruntime" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_converted_fixture_onnx_matches_keras(shared_fixture, tmp_path, capsys):
    h5, ref_path = shared_fixture
    ref = np.load(ref_path)
    pth, onnx_path = tmp_path / "crbl.pth", tmp_path / "crbl.onnx"
    assert convert_h5_to_pth.main([str(h5), str(pth), "--export-onnx", str(onnx_path)]) == 0
    assert "max |Δprob|" in capsys.readouterr().out
    images = (ref["images_uint8"] / 255.0).astype(np.float32).transpose(0, 3, 1, 2)
    model = load_model(pth)
    for batch in (images[:1], images[:3], images):
        with torch.no_grad():
            expected = torch.sigmoid(model(torch.from_numpy(batch.copy()))).numpy()
        got = ort_probs(onnx_path, np.ascontiguousarray(batch))
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(ort_probs(onnx_path, np.ascontiguousarray(images)), ref["prob"],
                               atol=1e-4, rtol=0)
