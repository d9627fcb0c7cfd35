"""model_pytorch_directml.py, the reference model: bilinear pooling semantics, the backbone against
timm, freezing, devices, checkpoints. Its fast inference paths: test_fast_paths.py; training's
memory-saving head: test_train_memory.py."""
import sys
import types

import pytest
import torch

import model_pytorch_directml as mp
from model_pytorch_directml import (BilinearPooling, CRBLConfig, CRBLError, CRBLModel,
                                    freeze_backbones, get_device, keras_layer_table, load_model,
                                    save_checkpoint)


def keras_bilinear(a, b, eps=1e-12, l2_eps=1e-12):
    """The Keras Lambda, written as literally as possible in float64 (NHWC reshape, Aᵀ·B)."""
    n, c, h, w = a.shape
    A = a.permute(0, 2, 3, 1).reshape(n, h * w, c).double()
    B = b.permute(0, 2, 3, 1).reshape(n, h * w, c).double()
    phi = (A.transpose(1, 2) @ B).reshape(n, c * c) / (h * w)
    y = torch.sign(phi) * torch.sqrt(phi.abs() + eps)
    return y / torch.sqrt(torch.clamp((y * y).sum(1, keepdim=True), min=l2_eps))


def test_bilinear_equals_keras_semantics():
    torch.manual_seed(0)
    a, b = torch.randn(3, 16, 4, 5), torch.randn(3, 16, 4, 5)
    z = BilinearPooling()(a.clone(), b.clone())
    assert torch.allclose(z.double(), keras_bilinear(a, b), atol=1e-6)
    # row-major flattening: index i*C + j, i over backbone-1 channels
    phi01 = (a[0, 1].flatten() * b[0, 2].flatten()).mean()
    assert torch.sign(z[0, 1 * 16 + 2]) == torch.sign(phi01)


def test_bilinear_is_per_sample():
    torch.manual_seed(1)
    a, b = torch.randn(4, 8, 3, 3), torch.randn(4, 8, 3, 3)
    together = BilinearPooling()(a.clone(), b.clone())
    alone = torch.cat([BilinearPooling()(a[i:i + 1].clone(), b[i:i + 1].clone()) for i in range(4)])
    assert torch.allclose(together, alone, atol=1e-7)


def test_bilinear_gradient_equals_autograd():
    torch.manual_seed(2)
    a = torch.randn(2, 6, 3, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(2, 6, 3, 3, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: BilinearPooling()(a, b), (a, b))
    g = torch.randn(2, 36, dtype=torch.double)
    ours = torch.autograd.grad((BilinearPooling()(a, b) * g).sum(), (a, b))
    ref = torch.autograd.grad((keras_bilinear(a, b) * g).sum(), (a, b))
    for x, y in zip(ours, ref):
        assert torch.allclose(x, y, atol=1e-9)


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return CRBLModel(CRBLConfig(image_size=64))


def _varied_batchnorm_statistics(model, seed: int = 2) -> None:
    """Random BN statistics: features that differ between channels and images (not collapsed)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)


def _small_varied_model() -> CRBLModel:
    torch.manual_seed(0)
    model = CRBLModel(CRBLConfig(image_size=64))
    _varied_batchnorm_statistics(model)
    return model.eval()


def _trainable_modules(model):
    return {n.rsplit(".", 1)[0] for n, p in model.backbone1.body.named_parameters() if p.requires_grad}


def test_crop_freezing_matches_keras_layer_150(small_model):
    info = freeze_backbones(small_model, "crop")
    assert info["trainable_from"] == 150
    expected = {l.timm_module for l in keras_layer_table() if l.timm_module and l.index >= 150}
    assert _trainable_modules(small_model) == expected
    assert "blocks.4.2.se.conv_expand" in expected and "blocks.4.2.se.conv_reduce" not in expected
    assert "blocks.4.2.conv_dw" not in expected and "blocks.4.2.conv_pwl" in expected
    assert small_model.head.weight.requires_grad
    assert info["trainable"] + info["frozen"] == sum(p.numel() for p in small_model.parameters())


def test_full_freezing_trains_head_only(small_model):
    freeze_backbones(small_model, "full")
    trainable = [n for n, p in small_model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]


def test_frozen_batchnorm_keeps_statistics_in_training(small_model):
    freeze_backbones(small_model, "crop")
    small_model.train()
    frozen_bn = small_model.backbone1.body.blocks[4][2].bn1  # Keras layer 142: frozen
    live_bn = small_model.backbone1.body.blocks[4][2].bn3    # Keras layer 152: trainable
    assert not frozen_bn.training and live_bn.training
    before_frozen = frozen_bn.running_mean.clone()
    before_live = live_bn.running_mean.clone()
    small_model(torch.rand(4, 3, 64, 64)).sum().backward()
    assert torch.equal(frozen_bn.running_mean, before_frozen)
    assert not torch.equal(live_bn.running_mean, before_live)
    assert small_model.dropout.training  # dropout still active, as in Keras fit()


@pytest.mark.parametrize("model_type,frozen_parts", [("crop", 5), ("full", 9)])
def test_frozen_layers_run_without_autograd_same_training_step(model_type, frozen_parts):
    """In training, the leading backbone parts that train nothing (crop: the stem and stages
    1-4; full: all 9 parts) run under no_grad. Loss, gradients and BatchNorm statistics equal
    bit for bit those of the same model with every part under autograd, random draws included."""
    models = []
    for shortcut in (True, False):
        model = _small_varied_model()
        freeze_backbones(model, model_type)
        model.train()
        if not shortcut:
            for body in (model.backbone1.body, model.backbone2.body):
                body._leading_frozen_parts = lambda x: 0
        models.append(model)
    x = torch.rand(3, 3, 64, 64)
    assert models[0].backbone2.body._leading_frozen_parts(x) == frozen_parts  # of 9
    runs = []
    for model in models:
        torch.manual_seed(3)  # dropout and drop path draw the same numbers in both
        loss = model(x).sum()
        loss.backward()
        runs.append((loss, {n: p.grad for n, p in model.named_parameters() if p.requires_grad},
                     model.state_dict()))
    (loss1, grads1, state1), (loss2, grads2, state2) = runs
    assert torch.equal(loss1, loss2) and grads1.keys() == grads2.keys()
    assert all(torch.equal(grads1[name], grads2[name]) for name in grads1)
    assert all(torch.equal(state1[name], state2[name]) for name in state1)
    # Autograd stays wherever it is needed.
    body = models[0].backbone1.body
    assert body._leading_frozen_parts(x.clone().requires_grad_()) == 0  # input gradients
    with torch.no_grad():
        assert body._leading_frozen_parts(x) == 0  # nothing to do: no graph anyway
    nothing_frozen = _small_varied_model().train()
    assert nothing_frozen.backbone1.body._leading_frozen_parts(x) == 0


def test_bad_freeze_arguments(small_model):
    with pytest.raises(CRBLError, match="model type"):
        freeze_backbones(small_model, "partial")
    with pytest.raises(CRBLError, match="trainable-from"):
        freeze_backbones(small_model, "crop", trainable_from=-1)


# ---------------------------------------------------------------------------------------------
# Pretrained backbone weights
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """No hub access, fast: huggingface_hub reads HF_HUB_OFFLINE once, at import time."""
    constants = pytest.importorskip("huggingface_hub.constants")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_backbone_equals_timm_tf_efficientnet_b0():
    """Our EfficientNet-B0 is timm's tf_efficientnet_b0 (which the converter maps Keras onto):
    the same state dict keys and shapes, and bit-identical outputs and gradients on timm's
    weights, in eval and in training (batch statistics, drop path from the same seed)."""
    timm = pytest.importorskip("timm")
    reference = timm.create_model("tf_efficientnet_b0", num_classes=0, global_pool="",
                                  drop_path_rate=0.2)
    ours = mp.EfficientNetB0(drop_path_rate=0.2)
    state = reference.state_dict()
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [(k, v.shape) for k, v in state.items()]
    g = torch.Generator().manual_seed(1)
    for k, v in state.items():  # BN statistics that do not leave the features near zero
        if k.endswith("running_var"):
            v.copy_(torch.rand(v.shape, generator=g) + 0.5)
        elif k.endswith("running_mean"):
            v.copy_(torch.randn(v.shape, generator=g) * 0.1)
    ours.load_state_dict(state, strict=True)
    x = torch.rand(2, 3, 97, 130)  # odd sizes: TensorFlow SAME padding is asymmetric there
    reference.eval(), ours.eval()
    with torch.no_grad():
        expected = reference.forward_features(x)
        assert expected.std() > 0.05 and torch.equal(ours(x), expected)
        cl = x.contiguous(memory_format=torch.channels_last)
        assert torch.equal(ours.to(memory_format=torch.channels_last)(cl),
                           reference.to(memory_format=torch.channels_last).forward_features(cl))
    reference.train(), ours.train()
    torch.manual_seed(3)
    expected = reference.forward_features(x)
    torch.manual_seed(3)
    got = ours(x)
    assert torch.equal(got, expected)
    (expected.square().mean() + got.square().mean()).backward()
    for (name, p_ref), p_ours in zip(reference.named_parameters(), ours.parameters()):
        assert torch.equal(p_ours.grad, p_ref.grad), name
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in reference.state_dict().items())


@pytest.mark.filterwarnings("ignore:`torch.jit.trace:FutureWarning")  # deprecated, still ONNX's tracer
def test_backbone_traced_at_one_size_runs_right_at_another():
    """torch.jit.trace (what ONNX export uses) must keep TensorFlow SAME padding a function of
    the input size, not the constant of the traced size: odd and even sizes, both strides."""
    torch.manual_seed(0)
    body = mp.EfficientNetB0().eval()
    with torch.no_grad():
        traced = torch.jit.trace(body, torch.rand(1, 3, 33, 33), check_trace=False)
    with torch.no_grad():
        for size in ((40, 37), (64, 64), (31, 45)):
            x = torch.rand(2, 3, *size)
            expected = body(x)
            got = traced(x)
            assert got.shape == expected.shape and torch.allclose(got, expected, atol=1e-6), size


def test_drop_path_edges():
    torch.manual_seed(0)
    x = torch.ones(64, 2, 1, 1)
    assert torch.equal(mp.drop_path(x, 1.0, training=True), torch.zeros_like(x))  # not NaN
    assert torch.equal(mp.drop_path(x, 0.5, training=False), x)
    kept = mp.drop_path(x, 0.5, training=True)[:, 0, 0, 0]
    assert set(kept.tolist()) <= {0.0, 2.0} and 0 < kept.count_nonzero() < 64  # per sample, rescaled


def test_only_tf_efficientnet_b0():
    with pytest.raises(CRBLError, match="tf_efficientnet_b1"):
        CRBLModel(CRBLConfig(backbone_arch="tf_efficientnet_b1"))


def test_pretrained_offline_is_a_clear_error(monkeypatch, tmp_path, offline_hub):
    monkeypatch.delenv(mp.WEIGHTS_DIR_ENV, raising=False)
    with pytest.raises(CRBLError) as err:
        mp.EfficientNetB0FeatureExtractor(weights="noisy-student")
    msg = str(err.value)
    assert "tf_efficientnet_b0.ns_jft_in1k" in msg and "--weights-dir" in msg and "\n" not in msg


def test_pretrained_from_local_dir_is_exact(tmp_path, offline_hub):
    torch.manual_seed(5)
    source = mp.EfficientNetB0FeatureExtractor()
    state = {k: v for k, v in source.body.state_dict().items()}
    state["classifier.weight"] = torch.zeros(1000, 1280)  # hub files carry the ImageNet classifier
    torch.save(state, tmp_path / "tf_efficientnet_b0.aa_in1k.pth")
    loaded = mp.EfficientNetB0FeatureExtractor(weights="imagenet", weights_dir=tmp_path)
    for k, v in source.body.state_dict().items():
        assert torch.equal(loaded.body.state_dict()[k], v)
    # never the other weights silently: noisy-student is not in that folder
    with pytest.raises(CRBLError):
        mp.EfficientNetB0FeatureExtractor(weights="noisy-student", weights_dir=tmp_path)


def test_pretrained_file_that_does_not_fit(tmp_path):
    torch.save({"conv_stem.weight": torch.zeros(8, 3, 3, 3)}, tmp_path / "w.pth")
    with pytest.raises(CRBLError, match="do not fit"):
        mp.EfficientNetB0FeatureExtractor(weights=str(tmp_path / "w.pth"))


# ---------------------------------------------------------------------------------------------
# Devices: every branch of get_device, DirectML through an injected fake module
# ---------------------------------------------------------------------------------------------

def _fake_directml(count=1, broken_op=False):
    mod = types.ModuleType("torch_directml")
    mod.device_count = lambda: count
    mod.device = lambda i=0: torch.device("cpu")  # stands in for privateuseone:i
    mod.device_name = lambda i=0: f"Fake Radeon {i}"
    if broken_op:
        mod.device = lambda i=0: torch.device("meta")  # ops "succeed" but nothing comes back
    return mod


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _install_directml(monkeypatch, module=None, import_error=None):
    if import_error is not None:
        import builtins
        real_import = builtins.__import__

        def fake_import(name, *args, **kwargs):
            if name == "torch_directml":
                raise import_error
            return real_import(name, *args, **kwargs)
        monkeypatch.delitem(sys.modules, "torch_directml", raising=False)
        monkeypatch.setattr(builtins, "__import__", fake_import)
    else:
        monkeypatch.setitem(sys.modules, "torch_directml", module)


def test_auto_prefers_directml(monkeypatch, no_cuda):
    _install_directml(monkeypatch, _fake_directml())
    info = get_device("auto")
    assert info.kind == "dml" and info.name == "Fake Radeon 0"


@pytest.mark.parametrize("error", [ImportError("no module"), OSError("DirectML.dll not found"),
                                   RuntimeError("torch 2.5 is not supported"), Exception("odd")])
def test_auto_falls_back_when_directml_import_fails(monkeypatch, no_cuda, error):
    _install_directml(monkeypatch, import_error=error)
    info = get_device("auto")
    assert info.kind == "cpu"
    assert any(type(error).__name__ in note for note in info.notes)


def test_explicit_directml_unavailable_is_an_error(monkeypatch, no_cuda):
    _install_directml(monkeypatch, import_error=OSError("DirectML.dll not found"))
    with pytest.raises(CRBLError, match="'dml' is not usable.*DirectML.dll"):
        get_device("dml")


def test_directml_index_out_of_range(monkeypatch):
    _install_directml(monkeypatch, _fake_directml(count=1))
    with pytest.raises(CRBLError, match="device 1 requested, 1 available"):
        get_device("dml:1")
    assert get_device("dml:0").kind == "dml"


def test_directml_broken_device_fails_smoke_test(monkeypatch, no_cuda):
    _install_directml(monkeypatch, _fake_directml(broken_op=True))
    with pytest.raises(CRBLError, match="not usable"):
        get_device("dml")
    assert get_device("auto").kind == "cpu"  # auto moves on


def _fake_cuda(monkeypatch, hip=None, count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "Fake GPU")
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(mp, "_smoke_test", lambda device: None)  # no real CUDA here


@pytest.mark.parametrize("hip,kind", [(None, "cuda"), ("6.2.4", "rocm")])
def test_cuda_and_rocm(monkeypatch, hip, kind):
    _install_directml(monkeypatch, import_error=ImportError("no module"))
    _fake_cuda(monkeypatch, hip=hip)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's defaults
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert get_device("auto").kind == kind
    assert get_device("cuda").device == torch.device("cuda", 0)
    # float32 stays float32 on the GPU (TF32 convolutions cost ~1e-4 of probability)
    assert not torch.backends.cudnn.allow_tf32 and torch.backends.cudnn.benchmark
    with pytest.raises(CRBLError, match="GPU 3 requested"):
        get_device("cuda:3")


def test_rocm_scripts_skip_directml(monkeypatch):
    _install_directml(monkeypatch, _fake_directml())
    _fake_cuda(monkeypatch, hip="6.2.4")
    assert get_device("auto", auto_order=("cuda", "cpu")).kind == "rocm"


def test_explicit_cuda_without_gpu(monkeypatch, no_cuda):
    with pytest.raises(CRBLError, match="'cuda' is not usable"):
        get_device("cuda")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "tpu:0"])
def test_unknown_device_names(bad):
    with pytest.raises(CRBLError, match="device"):
        get_device(bad)


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

def test_checkpoint_roundtrip_rebuilds_from_file_alone(small_model, tmp_path):
    config = CRBLConfig(image_size=64, mean=(0.1, 0.2, 0.3), std=(0.5, 0.6, 0.7), normalization="keras")
    model = CRBLModel(config).eval()
    path = tmp_path / "m.pth"
    save_checkpoint(path, model, threshold=0.3, threshold_source="best F1", model_type="crop",
                    provenance={"trained": "test"})
    loaded = load_model(path)
    assert not loaded.training
    assert loaded.config == config
    assert loaded.meta["threshold"] == 0.3 and loaded.meta["provenance"] == {"trained": "test"}
    x = torch.rand(2, 3, 64, 64)
    assert loaded.channels_last  # load_model places it in the fast CPU layout
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-6)  # NHWC kernels round differently
        assert torch.equal(model.set_channels_last(True)(x), loaded(x))
    raw = torch.load(path, weights_only=True, map_location="cpu")
    assert all(v.device.type == "cpu" for v in raw["state_dict"].values())


def test_checkpoint_tensors_become_the_weights(tmp_path, monkeypatch):
    """model_from_checkpoint takes the payload's tensors over (no second copy of the weights) and
    refuses a model tensor that the checkpoint leaves unset (it would stay on the meta device)."""
    path = tmp_path / "m.pth"
    save_checkpoint(path, CRBLModel(CRBLConfig(image_size=64)))
    payload = mp.load_checkpoint(path)
    model = mp.model_from_checkpoint(payload, path)
    for name, tensor in (*model.named_parameters(), *model.named_buffers()):
        assert tensor.data_ptr() == payload["state_dict"][name].data_ptr(), name
    assert isinstance(model.head.weight, torch.nn.Parameter) and model.head.weight.requires_grad

    class WithExtraBuffer(CRBLModel):
        def __init__(self, config):
            super().__init__(config)
            self.register_buffer("extra", torch.zeros(3), persistent=False)
    # A float64 file loads as float32, the model's dtype (assign would keep the file's).
    save_checkpoint(path, CRBLModel(CRBLConfig(image_size=64)).double())
    model = mp.load_model(path)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert model(torch.rand(2, 3, 64, 64)).dtype == torch.float32
    monkeypatch.setattr(mp, "CRBLModel", WithExtraBuffer)
    with pytest.raises(CRBLError, match=r"m\.pth: the checkpoint does not set extra; save it again"):
        mp.model_from_checkpoint(mp.load_checkpoint(path), path)


def test_checkpoint_write_is_atomic(small_model, tmp_path, monkeypatch):
    path = tmp_path / "m.pth"
    path.write_bytes(b"old")

    def explode(*args, **kwargs):
        raise KeyboardInterrupt  # interrupted mid-write
    monkeypatch.setattr(torch, "save", explode)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, small_model)
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["m.pth"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(CRBLError, match="not found"):
        load_model(tmp_path / "missing.pth")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CRBLError, match="not a CRBL checkpoint"):
        load_model(tmp_path / "other.pth")
    future = {"format": mp.CHECKPOINT_FORMAT, "format_version": 99, "config": {}, "state_dict": {}}
    torch.save(future, tmp_path / "future.pth")
    with pytest.raises(CRBLError, match="newer"):
        load_model(tmp_path / "future.pth")


def test_config_from_newer_version_is_refused():
    with pytest.raises(CRBLError, match="unknown fields"):
        CRBLConfig.from_dict({"image_size": 128, "attention": True})


def test_half_precision_backbones_keep_a_float32_head():
    """--fp16 on DirectML stores the backbones in float16; the bilinear head must stay float32
    (its sum over 1280² products overflows float16)."""
    torch.manual_seed(4)
    model = CRBLModel(CRBLConfig(image_size=64)).eval()
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        full = model(x)
        for module in (model.backbone1, model.backbone2):
            module.half()
        model.input_mean, model.input_std = model.input_mean.half(), model.input_std.half()
        half = model(x.half())
    assert half.dtype == torch.float32 and torch.isfinite(half).all()
    assert torch.allclose(half, full, atol=5e-3)
