"""model_pytorch_directml.py: bilinear pooling semantics, freezing, devices, checkpoints."""
import sys
import time
import types
from pathlib import Path

import numpy as np
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


@pytest.fixture(params=["cpu", "cuda"])
def chunking(request, monkeypatch):
    """Run the head's chunked math with the CPU's small chunks and with the GPU's large ones."""
    if request.param == "cuda":
        chunk = mp._chunk
        monkeypatch.setattr(mp, "_chunk", lambda total, per_item, device:
                            chunk(total, per_item, torch.device("cuda")))
    return request.param


@pytest.fixture(params=["numba", "torch"])
def cpu_head(request, monkeypatch):
    """The CPU inference head's element-wise part by numba's one-pass kernel (returns the list
    its calls are counted in) and by torch's ops (returns None)."""
    if request.param == "torch":
        monkeypatch.setenv(mp.FUSED_HEAD_ENV, "0")
        return None
    pytest.importorskip("numba")
    kernel = mp.fused_head_kernel()
    assert kernel is not None
    calls = []
    monkeypatch.setattr(mp, "_fused_head", lambda *args: calls.append(1) or kernel(*args))
    monkeypatch.setattr(mp, "FUSED_HEAD_MAX_THREADS", 1024)  # whatever this machine's thread count
    return calls


def test_fused_inference_head_equals_unfused(chunking, cpu_head):
    torch.manual_seed(3)
    c = mp.NUM_FEATURES
    a, b = torch.randn(5, c, 4, 4), torch.randn(5, c, 4, 4)
    a[1, 7] = 0  # a row of phi == 0: sign 0, so no sqrt(eps) term (TF's sign)
    weight, bias = torch.randn(1, c * c) * 1e-3, torch.randn(1)
    ref = keras_bilinear(a, b) @ weight.double().T + bias.double()
    fused = BilinearPooling().linear(a, b, weight, bias)
    assert fused.shape == (5, 1) and fused.dtype == torch.float32
    assert (fused.double() - ref).abs().max() < 1e-5
    assert cpu_head in (None, [1] * -(-c // mp.FUSED_HEAD_ROWS))  # one call per share of rows


@pytest.mark.parametrize("c, h, w", [(7, 3, 5), (6, 1, 1), (9, 2, 3), (mp.NUM_FEATURES, 7, 7)])
def test_inference_head_at_any_shape(cpu_head, c, h, w):
    """Channels that are no multiple of the kernel's 4 rows and position counts that are no
    multiple of its 4 positions (15, 1, 6, 49) take its remainder loops; both maps
    channels_last (the kernel reads them as they are) and contiguous (copied)."""
    torch.manual_seed(11)
    a, b = torch.randn(3, c, h, w), torch.randn(3, c, h, w)
    weight, bias = torch.randn(1, c * c) * 1e-2, torch.randn(1)
    ref = keras_bilinear(a, b) @ weight.double().T + bias.double()
    for layout in (torch.channels_last, torch.contiguous_format):
        got = BilinearPooling().linear(a.contiguous(memory_format=layout),
                                       b.contiguous(memory_format=layout), weight, bias)
        assert (got.double() - ref).abs().max() < 1e-5
        if cpu_head is not None:  # each sample alone, bit for bit as in the batch
            assert torch.equal(got[1:2], BilinearPooling().linear(a[1:2], b[1:2], weight, bias))
    assert cpu_head in (None, [1] * 4 * -(-c // mp.FUSED_HEAD_ROWS))


def test_fused_head_shares_rows_between_two_threads(monkeypatch):
    """With 2 torch threads the second thread takes shares of rows too, and the logits are bit
    for bit those of one thread: each share's sums have their own slot, added in row order."""
    pytest.importorskip("numba")
    import threading
    kernel = mp.fused_head_kernel()
    threads = []
    monkeypatch.setattr(mp, "_fused_head", lambda *args: threads.append(threading.get_ident())
                        or time.sleep(0.002) or kernel(*args))
    monkeypatch.setattr(mp, "FUSED_HEAD_MAX_THREADS", 1024)
    torch.manual_seed(12)
    c = mp.NUM_FEATURES
    a, b = torch.randn(3, c, 2, 3), torch.randn(3, c, 2, 3)
    weight, bias = torch.randn(1, c * c) * 1e-3, torch.randn(1)
    results = {}
    for n_threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: n_threads)
        threads.clear()
        results[n_threads] = BilinearPooling().linear(a, b, weight, bias)
        assert len(threads) == -(-c // mp.FUSED_HEAD_ROWS) and len(set(threads)) == n_threads
    assert torch.equal(results[1], results[2])
    ref = keras_bilinear(a, b) @ weight.double().T + bias.double()
    assert (results[2].double() - ref).abs().max() < 1e-5


def test_inference_head_zero_products_have_no_sqrt_eps_term(cpu_head):
    """phi == 0 gives y = sign(0)·sqrt(eps) = 0 (TF's sign): with one live channel, 99.9 % of
    phi is zero and a ±sqrt(eps) there would move the logit by ~1.6 per unit weight."""
    c = mp.NUM_FEATURES
    a, b = torch.zeros(2, c, 2, 2), torch.rand(2, c, 2, 2)
    a[:, 3] = torch.rand(2, 2, 2)
    weight = torch.ones(1, c * c)
    ref = keras_bilinear(a, b) @ weight.double().T
    got = BilinearPooling().linear(a, b, weight, torch.zeros(1))
    assert torch.allclose(got.double(), ref, rtol=1e-5)


def test_inference_head_propagates_nan(cpu_head):
    """A NaN feature gives that sample a NaN logit and leaves the others alone."""
    torch.manual_seed(5)
    c = mp.NUM_FEATURES
    a, b = torch.rand(3, c, 2, 2), torch.rand(3, c, 2, 2)
    a[1, 9, 1, 0] = float("nan")
    logits = BilinearPooling().linear(a, b, torch.randn(1, c * c) * 1e-3, torch.zeros(1))
    assert logits[1].isnan().all() and logits[[0, 2]].isfinite().all()


def test_fused_head_is_skipped_where_it_does_not_apply(cpu_head, monkeypatch):
    if cpu_head is None:
        pytest.skip("numba case only")
    pool = BilinearPooling()
    a = b = torch.rand(2, 4, 2, 2)
    weight, bias = torch.rand(1, 16), torch.zeros(1)
    expected = keras_bilinear(a, b) @ weight.double().T
    outputs = [pool.linear(a.double(), b.double(), weight.double(), bias.double())]  # float64
    with monkeypatch.context() as m:
        m.setattr(mp, "FUSED_HEAD_MAX_THREADS", 0)  # more threads than the kernel's one pays for
        outputs.append(pool.linear(a, b, weight, bias))
    with monkeypatch.context() as m:
        m.setattr(torch.jit, "is_tracing", lambda: True)  # torch.jit.trace, ONNX export
        outputs.append(pool.linear(a, b, weight, bias))
    pool.compiled_terms = mp._chunk_terms  # --compile: its own fused chunk math
    outputs.append(pool.linear(a, b, weight, bias))
    assert cpu_head == []
    for out in outputs:
        assert torch.allclose(out.double(), expected[:len(out)], atol=1e-6)
    pool.compiled_terms = None
    pool.linear(a, b, weight, bias)
    assert cpu_head == [1]  # and the same call, where it applies, runs it


def test_fused_head_falls_back_to_torch(monkeypatch):
    """No numba, or a numba that cannot compile: the torch head, with one warning for the latter."""
    a, b = torch.rand(2, 8, 2, 2), torch.rand(2, 8, 2, 2)
    weight, bias = torch.rand(1, 64), torch.zeros(1)
    expected = keras_bilinear(a, b) @ weight.double().T
    monkeypatch.setattr(mp, "_fused_head", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    assert mp.fused_head_kernel() is None
    assert torch.allclose(BilinearPooling().linear(a, b, weight, bias).double(), expected, atol=1e-6)
    monkeypatch.undo()
    import builtins
    real_import = builtins.__import__

    for exc in (AttributeError("module 'numpy' has no attribute 'long'"),
                ImportError("Numba needs NumPy 2.3 or less. Got NumPy 2.9."),
                ModuleNotFoundError("No module named 'llvmlite'", name="llvmlite")):
        def import_broken_numba(name, *args, **kwargs):
            if name == "numba":
                raise exc
            return real_import(name, *args, **kwargs)
        monkeypatch.setattr(mp, "_fused_head", None)
        monkeypatch.setattr(builtins, "__import__", import_broken_numba)
        with pytest.warns(RuntimeWarning, match=f"import numba failed.*{str(exc)[:20]}"):
            assert mp.fused_head_kernel() is None
        monkeypatch.undo()
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(mp, "_fused_head", None)

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: no target")
    monkeypatch.setattr(numba, "njit", broken)
    with pytest.warns(RuntimeWarning, match="LLVM ERROR: no target.*CRBL_FUSED_HEAD=0"):
        assert mp.fused_head_kernel() is None
    assert mp.fused_head_kernel() is None  # decided once: no second try, no second warning
    assert torch.allclose(BilinearPooling().linear(a, b, weight, bias).double(), expected, atol=1e-6)


def test_fused_head_compiles_without_a_writable_cache(monkeypatch, recwarn):
    """numba refuses cache=True where neither the source folder nor a user cache is writable:
    the kernel is then compiled for this process alone, silently."""
    numba = pytest.importorskip("numba")
    njit = numba.njit

    def no_cache_folder(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function '_bilinear_terms': no locator available for file")
        return njit(*args, **kwargs)
    monkeypatch.setattr(numba, "njit", no_cache_folder)
    monkeypatch.setattr(mp, "_fused_head", None)
    kernel = mp.fused_head_kernel()
    assert kernel is not None and not recwarn.list
    a = b = np.ones((1, 2, 3), np.float32)  # 2 positions: phi = Aᵀ·B / 2 = 1 everywhere
    w, dot, sq = np.full((3, 3), 2.0, np.float32), np.zeros(1), np.zeros(1)
    kernel(a, b, w, np.float32(0.5), np.float32(0.0), dot, sq, 0, 3)
    assert dot[0] == 18.0 and sq[0] == 9.0


def test_training_head_equals_keras_at_full_width(chunking):
    """1280 channels (chunks of one sample on CPU, the whole batch on a GPU): values and grads."""
    torch.manual_seed(4)
    c = mp.NUM_FEATURES
    a = torch.randn(3, c, 2, 2, dtype=torch.double, requires_grad=True)
    b = torch.randn(3, c, 2, 2, dtype=torch.double, requires_grad=True)
    g = torch.randn(3, c * c, dtype=torch.double)
    ours = BilinearPooling()(a, b)
    ref = keras_bilinear(a, b)
    assert torch.allclose(ours, ref, atol=1e-12)
    for x, y in zip(torch.autograd.grad((ours * g).sum(), (a, b)),
                    torch.autograd.grad((ref * g).sum(), (a, b))):
        assert torch.allclose(x, y, atol=1e-9)


@pytest.mark.parametrize("p", [0.5, 0.3])
def test_fused_dropout_head_equals_dropout_then_linear(p, monkeypatch):
    """Training head = Linear(Dropout(p)(z)) with the same mask: values and all gradients."""
    torch.manual_seed(6)
    z = torch.randn(3, 50, dtype=torch.double, requires_grad=True)
    weight = torch.randn(1, 50, dtype=torch.double, requires_grad=True)
    bias = torch.randn(1, dtype=torch.double, requires_grad=True)
    masks = []
    keep = mp._keep_mask
    monkeypatch.setattr(mp, "_keep_mask", lambda *a: masks.append(keep(*a)) or masks[-1])
    ours = mp._DropoutLinear1.apply(z, weight, bias, p)
    mask = masks[0].double()
    ref = torch.nn.functional.linear(z * mask / (1 - p), weight, bias)
    assert torch.allclose(ours, ref, atol=1e-12)
    g = torch.randn(3, 1, dtype=torch.double)
    for x, y in zip(torch.autograd.grad((ours * g).sum(), (z, weight, bias)),
                    torch.autograd.grad((ref * g).sum(), (z, weight, bias))):
        assert torch.allclose(x, y, atol=1e-12)
    assert 0 < mask.mean() < 1  # a real mask, not all kept or all dropped


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_dropout_keep_mask_is_unbiased_and_seeded(p):
    torch.manual_seed(7)
    mask = mp._keep_mask(4, 100_003, p, torch.device("cpu"))
    assert mask.shape == (4, 100_003) and mask.dtype == torch.uint8 and mask.max() == 1
    assert abs(mask.double().mean().item() - (1 - p)) < 0.005
    # every bit position of the random bytes is used (no stuck bit in the p = 0.5 path)
    per_position = mask[:, :100_000].reshape(4, -1, 8).double().mean(dim=(0, 1))
    assert (per_position - (1 - p)).abs().max() < 0.01
    torch.manual_seed(7)
    assert torch.equal(mask, mp._keep_mask(4, 100_003, p, torch.device("cpu")))


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


@pytest.fixture
def twin_model():
    """A folded (so twin-joined) channels_last model of its own: folding is for good."""
    model = _small_varied_model()
    mp.fold_batchnorm(model)
    return model.set_channels_last(True)  # new tensors: the twin is joined over them again


def _record_backbone_calls(model) -> list[str]:
    calls = []
    for name in ("backbone1", "backbone2"):
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    return calls


def _features(model, x):
    with torch.inference_mode():
        return model.features(x)


def test_twin_network_equals_the_two_backbones(twin_model, monkeypatch):
    """fold_batchnorm joins both backbones into one network of grouped convolutions, run for
    CPU inference batches of up to TWIN_MAX_PIXELS pixels per channel; equal to the two backbones
    up to float32 rounding."""
    calls = _record_backbone_calls(twin_model)
    x = torch.rand(3, 3, 67, 61)  # odd sizes: the stride-2 convolutions pad asymmetrically
    monkeypatch.setattr(mp, "TWIN_MAX_PIXELS", 3 * 67 * 61)  # at the limit: still the twin
    twin_a, twin_b = _features(twin_model, x)
    assert calls == []  # neither backbone ran on its own
    twin_model.parallel_backbones = False  # as compile_for_inference does
    a, b = _features(twin_model, x)
    assert calls == ["backbone1", "backbone2"]
    assert a.std() > 0.05 and b.std() > 0.05 and (a - b).abs().max() > 0.1
    torch.testing.assert_close(twin_a, a, rtol=0, atol=1e-5)
    torch.testing.assert_close(twin_b, b, rtol=0, atol=1e-5)
    unfolded = _small_varied_model()  # each backbone still its own weights, in its own place
    unfolded.parallel_backbones = False
    joined_once = _small_varied_model()  # the fixture's is joined twice: fold, channels_last
    mp.fold_batchnorm(joined_once)
    expected = _features(unfolded, x)
    for got in ((twin_a, twin_b), _features(joined_once, x)):
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-5)
    twin_model.parallel_backbones = True
    monkeypatch.setattr(mp, "TWIN_MAX_PIXELS", 3 * 67 * 61 - 1)  # above it: the backbones
    _features(twin_model, x)
    assert sorted(calls[2:]) == ["backbone1", "backbone2"]  # side by side: either may end first
    twin_model.features(x)  # nor under autograd
    assert calls[4:] == ["backbone1", "backbone2"]


def test_twin_network_shares_the_backbones_tensors(twin_model):
    """The backbones' parameters are views of the twin's: one copy of the weights, and an
    in-place change to a backbone is the twin's too."""
    twin = twin_model._twin
    bodies = (twin_model.backbone1.body, twin_model.backbone2.body)
    for key, tensor in twin.state_dict().items():
        for body in bodies:
            assert (body.get_parameter(key).untyped_storage().data_ptr()
                    == tensor.untyped_storage().data_ptr()), key
    x = torch.rand(2, 3, 64, 64)
    before = _features(twin_model, x)[1]
    with torch.no_grad():
        bodies[1].conv_head.weight.mul_(2.0)
    after = _features(twin_model, x)[1]
    assert (after - before).abs().max() > 1e-3
    twin_model.parallel_backbones = False
    torch.testing.assert_close(after, _features(twin_model, x)[1], rtol=0, atol=1e-5)
    assert twin_model.to("cpu")._twin is twin  # tensors unchanged: the same twin


def test_twin_network_never_runs_stale_weights(twin_model):
    """A replaced backbone parameter: the backbones run themselves. A deepcopy or an unpickled
    model joins its own tensors; off the CPU there is no twin."""
    import copy
    import pickle
    import threading
    x = torch.rand(2, 3, 64, 64)
    expected = _features(copy.deepcopy(twin_model).set_channels_last(True), x)[1]
    clone = copy.deepcopy(twin_model)
    assert clone._twin is not None and clone._twin_is_current()
    results = [None] * 4  # a forward changes nothing: threads may share a model

    def run(i):
        results[i] = _features(clone, x)[1]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got in results:  # (threads may split their sums differently: not bit for bit)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    unpickled = pickle.loads(pickle.dumps(twin_model))
    assert unpickled._twin_is_current()
    calls = _record_backbone_calls(twin_model)
    conv = twin_model.backbone2.body.conv_head
    conv.weight = torch.nn.Parameter(conv.weight.detach() * 2, requires_grad=False)
    assert not twin_model._twin_is_current()
    changed = _features(twin_model, x)[1]
    assert sorted(calls) == ["backbone1", "backbone2"] and (changed - expected).abs().max() > 1e-3
    assert clone.to("meta")._twin is None  # off the CPU (CUDA, DirectML): no twin, no views


def test_forward_paths_agree(small_model):
    x = torch.rand(2, 3, 64, 64)
    small_model.eval()
    with torch.no_grad():
        fused = small_model(x)
    unfused = small_model(x)  # grad enabled: the autograd path
    assert fused.shape == (2, 1)
    assert torch.allclose(fused, unfused.detach(), atol=1e-5)
    assert torch.allclose(small_model.predict_proba(x).detach(), torch.sigmoid(unfused.detach()), atol=1e-5)


def _backbone2_threads(model):
    """Records the name of the thread each backbone-2 forward ran on."""
    import threading
    names = []
    handle = model.backbone2.register_forward_hook(
        lambda *_: names.append(threading.current_thread().name))
    return names, handle


def test_small_cpu_batches_run_the_backbones_side_by_side(small_model):
    torch.manual_seed(1)
    x = torch.rand(2, 3, 64, 64)
    small_model.eval()
    names, handle = _backbone2_threads(small_model)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # also on a 1-core machine
    try:
        with torch.inference_mode():
            side_by_side = small_model(x)
            small_model.parallel_backbones = False
            one_after_other = small_model(x)
        with torch.no_grad():  # no_grad without inference mode: the side thread follows it
            small_model.parallel_backbones = True
            a, b = small_model.features(x)
        assert torch.get_num_threads() == 2  # given back after each forward
    finally:
        small_model.parallel_backbones = True
        handle.remove()
        torch.set_num_threads(threads)
    assert names[0].startswith("crbl-backbone2") and names[2].startswith("crbl-backbone2")
    assert not names[1].startswith("crbl-backbone2")
    assert not b.requires_grad and not torch.is_inference(b)
    torch.testing.assert_close(side_by_side, one_after_other, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["training", "grad", "batch 5", "one thread"])
def test_backbones_stay_on_one_thread_otherwise(small_model, monkeypatch, case):
    x = torch.rand(5 if case == "batch 5" else 2, 3, 64, 64)
    small_model.train(case == "training")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1 if case == "one thread" else 2)
    names, handle = _backbone2_threads(small_model)
    try:
        with torch.set_grad_enabled(case == "grad"):
            small_model.features(x)
    finally:
        handle.remove()
        small_model.eval()
    assert not names[0].startswith("crbl-backbone2")


def test_side_thread_errors_surface_and_restore_the_thread_count(small_model, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(small_model.backbone1, "forward", lambda x: 1 / 0)
    small_model.eval()
    with torch.inference_mode(), pytest.raises(ZeroDivisionError):
        mp._both_backbones_at_once(small_model.backbone1, small_model.backbone2,
                                   torch.rand(1, 3, 64, 64))
    assert torch.get_num_threads() == threads


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


def test_inference_imports_neither_timm_nor_torchvision(tmp_path):
    """Loading a checkpoint and scoring needs neither: timm imports torchvision, ~200 MB of
    resident memory before any model; building on the meta device must not pull in sympy &co
    (normal_ on a meta tensor does)."""
    import subprocess
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pth", CRBLModel(CRBLConfig(image_size=64)))
    code = ("import sys, torch, model_pytorch_directml as mp\n"
            f"m = mp.load_model({str(tmp_path / 'm.pth')!r}); mp.fold_batchnorm(m)\n"
            "with torch.inference_mode(): p = m.predict_proba(torch.rand(2, 3, 64, 64))\n"
            "assert p.shape == (2, 1)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'timm', 'torchvision', 'sympy'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(mp.__file__).parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


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


_FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import model_pytorch_directml as mp
assert mp.get_device("cpu").kind == "cpu"
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 << 20)  # 40 MB, above glibc's 32 MB cap on its mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds = [faults() for _ in range(12)]
# the first rounds may still fault while the heap settles (aligned blocks are split differently)
print(mp.keep_freed_memory(), max(rounds[-4:]))  # took (True/False), page faults
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_cpu_device_keeps_freed_memory(opt_out):
    """On the CPU device a 40 MB tensor made again and again reuses the same pages (no page
    faults once the heap has settled); CRBL_KEEP_FREED_MEMORY=0 restores glibc's behaviour
    (~10k faults every time: fresh pages)."""
    import os
    import subprocess
    from pathlib import Path
    env = {k: v for k, v in os.environ.items() if k != mp.KEEP_FREED_MEMORY_ENV}
    if opt_out:
        env[mp.KEEP_FREED_MEMORY_ENV] = "0"
    script = _FAULTS_SCRIPT.format(root=str(Path(mp.__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    took, faults = out.split()[-2:]
    if opt_out:
        assert took == "False" and int(faults) > 5_000
    else:
        if took != "True":
            pytest.skip("no glibc mallopt in this Python (not glibc)")
        assert int(faults) < 1_000


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


def test_folded_batchnorm_gives_the_same_logits_and_cannot_train(tmp_path):
    torch.manual_seed(5)
    model = CRBLModel(CRBLConfig(image_size=64)).set_channels_last(True).eval()
    with torch.no_grad():  # BN statistics far from identity, so a wrong fold shows
        for bn in (m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5), bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.2, 0.2)
        model.head.weight.mul_(3000)
    x = torch.rand(3, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
    assert mp.fold_batchnorm(model) == 98  # 49 per EfficientNetB0: every one of them
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        after = model(x)
    assert before.abs().max() > 0.1 and (after - before).abs().max() < 1e-5
    with pytest.raises(CRBLError, match="folded .* load the checkpoint again"):
        model.train()
    with pytest.raises(CRBLError, match="folded for inference"):
        save_checkpoint(tmp_path / "folded.pth", model)
    assert not (tmp_path / "folded.pth").exists()


def test_compile_is_refused_on_directml(small_model):
    with pytest.raises(CRBLError, match="not available on DirectML"):
        mp.compile_for_inference(small_model, "dml")


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
