"""fast_paths_pytorch_directml.py: every inference fast path against the reference model, at
every plan the table (CPU_RULES) can choose, and the choice itself."""
import copy
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest
import torch

import fast_paths_pytorch_directml as fp
import model_pytorch_directml as mp
from conftest import chunk_as_on_a_gpu
from fast_paths_pytorch_directml import InferenceRunner, Plan, choose_plan, prepare_for_inference
from model_pytorch_directml import (BilinearPooling, CRBLConfig, CRBLError, CRBLModel, DeviceInfo,
                                    save_checkpoint)

CPU = DeviceInfo(torch.device("cpu"), "cpu", "test CPU")


def reference_logits(a, b, weight, bias):
    """The model's head as written (BilinearPooling then Linear), in float64."""
    z = BilinearPooling()(a.double(), b.double())
    return z @ weight.double().T + bias.double()


def head_runner(weight, bias, head: str, threads: int = 1) -> InferenceRunner:
    """A runner around just a pool and a head (the head's tests need no backbones)."""
    model = types.SimpleNamespace(pool=BilinearPooling(), head=torch.nn.Linear(weight.shape[1], 1))
    model.head.weight.data, model.head.bias.data = weight, bias
    return InferenceRunner(model, Plan("one after the other", head, threads, None))


@pytest.fixture(params=["cpu", "cuda"])
def chunking(request, monkeypatch):
    """Chunks of phi as on the CPU (a few MB) and as on a GPU (the whole batch)."""
    if request.param == "cuda":
        chunk_as_on_a_gpu(monkeypatch, fp)
    return request.param


@pytest.fixture(params=["numba", "torch"])
def head(request, monkeypatch):
    """(plan head, list the numba kernel's calls are counted in, or None)."""
    if request.param == "torch":
        return "torch", None
    pytest.importorskip("numba")
    kernel = fp.fused_head_kernel()
    assert kernel is not None
    calls = []
    monkeypatch.setattr(fp, "_fused_head", lambda *args: calls.append(1) or kernel(*args))
    return "numba", calls


# --------------------------------------------------------------------------------------------
# The head without phi
# --------------------------------------------------------------------------------------------

def test_head_equals_the_reference(chunking, head):
    kind, calls = head
    torch.manual_seed(3)
    c = mp.NUM_FEATURES
    a, b = torch.randn(5, c, 4, 4), torch.randn(5, c, 4, 4)
    a[1, 7] = 0  # a row of phi == 0: sign 0, so no sqrt(eps) term (TF's sign)
    weight, bias = torch.randn(1, c * c) * 1e-3, torch.randn(1)
    got = head_runner(weight, bias, kind).head_logits(a, b)
    assert got.shape == (5, 1) and got.dtype == torch.float32
    assert (got.double() - reference_logits(a, b, weight, bias)).abs().max() < 1e-5
    assert calls in (None, [1] * -(-c // fp.FUSED_HEAD_ROWS))  # one call per share of rows


@pytest.mark.parametrize("c, h, w", [(7, 3, 5), (6, 1, 1), (9, 2, 3), (mp.NUM_FEATURES, 7, 7)])
def test_head_at_any_shape(head, c, h, w):
    """Channels that are no multiple of the kernel's 4 rows and position counts that are no
    multiple of its 4 positions (15, 1, 6, 49) take its remainder loops; both maps
    channels_last (the kernel reads them as they are) and contiguous (copied)."""
    kind, calls = head
    torch.manual_seed(11)
    a, b = torch.randn(3, c, h, w), torch.randn(3, c, h, w)
    weight, bias = torch.randn(1, c * c) * 1e-2, torch.randn(1)
    runner, ref = head_runner(weight, bias, kind), reference_logits(a, b, weight, bias)
    for layout in (torch.channels_last, torch.contiguous_format):
        got = runner.head_logits(a.contiguous(memory_format=layout), b.contiguous(memory_format=layout))
        assert (got.double() - ref).abs().max() < 1e-5
        if calls is not None:  # each sample alone, bit for bit as in the batch
            assert torch.equal(got[1:2], runner.head_logits(a[1:2], b[1:2]))
    assert calls in (None, [1] * 4 * -(-c // fp.FUSED_HEAD_ROWS))


def test_numba_head_shares_rows_between_two_threads(monkeypatch):
    """With 2 threads the second thread takes shares of rows too, and the logits are bit for
    bit those of one thread: each share's sums have their own slot, added in row order."""
    pytest.importorskip("numba")
    kernel = fp.fused_head_kernel()
    threads = []
    monkeypatch.setattr(fp, "_fused_head", lambda *args: threads.append(threading.get_ident())
                        or time.sleep(0.002) or kernel(*args))
    torch.manual_seed(12)
    c = mp.NUM_FEATURES
    a, b = torch.randn(3, c, 2, 3), torch.randn(3, c, 2, 3)
    weight, bias = torch.randn(1, c * c) * 1e-3, torch.randn(1)
    results = {}
    for n_threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda: n_threads)
        threads.clear()
        results[n_threads] = head_runner(weight, bias, "numba", n_threads).head_logits(a, b)
        assert len(threads) == -(-c // fp.FUSED_HEAD_ROWS) and len(set(threads)) == n_threads
    assert torch.equal(results[1], results[2])
    assert (results[2].double() - reference_logits(a, b, weight, bias)).abs().max() < 1e-5


def test_head_zero_products_have_no_sqrt_eps_term(head):
    """phi == 0 gives y = sign(0)·sqrt(eps) = 0 (TF's sign): with one live channel, 99.9 % of
    phi is zero and a ±sqrt(eps) there would move the logit by ~1.6 per unit weight."""
    c = mp.NUM_FEATURES
    a, b = torch.zeros(2, c, 2, 2), torch.rand(2, c, 2, 2)
    a[:, 3] = torch.rand(2, 2, 2)
    weight, bias = torch.ones(1, c * c), torch.zeros(1)
    got = head_runner(weight, bias, head[0]).head_logits(a, b)
    assert torch.allclose(got.double(), reference_logits(a, b, weight, bias), rtol=1e-5)


def test_head_propagates_nan(head):
    """A NaN feature gives that sample a NaN logit and leaves the others alone."""
    torch.manual_seed(5)
    c = mp.NUM_FEATURES
    a, b = torch.rand(3, c, 2, 2), torch.rand(3, c, 2, 2)
    a[1, 9, 1, 0] = float("nan")
    logits = head_runner(torch.randn(1, c * c) * 1e-3, torch.zeros(1), head[0]).head_logits(a, b)
    assert logits[1].isnan().all() and logits[[0, 2]].isfinite().all()


def test_numba_head_steps_aside_for_what_it_cannot_read(head, monkeypatch):
    """float64 maps (no kernel for them) and graph capture (tracing, ONNX) take torch's ops."""
    kind, calls = head
    if calls is None:
        pytest.skip("numba case only")
    a = b = torch.rand(2, 4, 2, 2)
    weight, bias = torch.rand(1, 16), torch.zeros(1)
    runner = head_runner(weight, bias, "numba")
    expected = reference_logits(a, b, weight, bias)
    outputs = [head_runner(weight.double(), bias.double(), "numba").head_logits(a.double(),
                                                                                b.double())]
    with monkeypatch.context() as m:
        m.setattr(torch.jit, "is_tracing", lambda: True)
        outputs.append(runner.head_logits(a, b))
    assert calls == []
    for out in outputs:
        assert torch.allclose(out.double(), expected, atol=1e-6)
    runner.head_logits(a, b)
    assert calls == [1]  # and the same call, where it applies, runs it


def test_numba_kernel_falls_back_to_torch(monkeypatch):
    """No numba, or a numba that cannot compile: the torch head, with one warning for the latter."""
    a, b = torch.rand(2, 8, 2, 2), torch.rand(2, 8, 2, 2)
    weight, bias = torch.rand(1, 64), torch.zeros(1)
    expected = reference_logits(a, b, weight, bias)
    monkeypatch.setattr(fp, "_fused_head", None)
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba -> ImportError
    assert fp.fused_head_kernel() is None
    runner = head_runner(weight, bias, "numba")  # planned, but the kernel is not there
    assert torch.allclose(runner.head_logits(a, b).double(), expected, atol=1e-6)
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
        monkeypatch.setattr(fp, "_fused_head", None)
        monkeypatch.setattr(builtins, "__import__", import_broken_numba)
        with pytest.warns(RuntimeWarning, match=f"import numba failed.*{str(exc)[:20]}"):
            assert fp.fused_head_kernel() is None
        monkeypatch.undo()
    numba = pytest.importorskip("numba")
    monkeypatch.setattr(fp, "_fused_head", None)

    def broken(*args, **kwargs):
        raise RuntimeError("LLVM ERROR: no target")
    monkeypatch.setattr(numba, "njit", broken)
    with pytest.warns(RuntimeWarning, match="LLVM ERROR: no target.*CRBL_FUSED_HEAD=0"):
        assert fp.fused_head_kernel() is None
    assert fp.fused_head_kernel() is None  # decided once: no second try, no second warning
    monkeypatch.setenv(fp.FUSED_HEAD_ENV, "0")
    monkeypatch.setattr(fp, "_fused_head", None)
    assert fp.fused_head_kernel() is None  # CRBL_FUSED_HEAD=0: not even tried


def test_numba_kernel_compiles_without_a_writable_cache(monkeypatch, recwarn):
    """numba refuses cache=True where neither the source folder nor a user cache is writable:
    the kernel is then compiled for this process alone, silently."""
    numba = pytest.importorskip("numba")
    njit = numba.njit

    def no_cache_folder(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function '_bilinear_terms': no locator available for file")
        return njit(*args, **kwargs)
    monkeypatch.setattr(numba, "njit", no_cache_folder)
    monkeypatch.setattr(fp, "_fused_head", None)
    kernel = fp.fused_head_kernel()
    assert kernel is not None and not recwarn.list
    a = b = np.ones((1, 2, 3), np.float32)  # 2 positions: phi = Aᵀ·B / 2 = 1 everywhere
    w, dot, sq = np.full((3, 3), 2.0, np.float32), np.zeros(1), np.zeros(1)
    kernel(a, b, w, np.float32(0.5), np.float32(0.0), dot, sq, 0, 3)
    assert dot[0] == 18.0 and sq[0] == 9.0


# --------------------------------------------------------------------------------------------
# The plan: one table
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, batch, size, threads, folded, compiled, fp16, plan", [
    ("cpu", 1, 128, 2, True, False, False, ("twin", "numba", None)),
    ("cpu", 8, 128, 2, True, False, False, ("twin", "numba", None)),   # at the pixel limit
    ("cpu", 9, 128, 2, True, False, False, ("one after the other", "numba", None)),
    ("cpu", 2, 224, 2, True, False, False, ("twin", "numba", None)),
    ("cpu", 3, 224, 2, True, False, False, ("side by side", "numba", None)),
    ("cpu", 4, 224, 2, True, False, False, ("side by side", "numba", None)),
    ("cpu", 5, 224, 2, True, False, False, ("one after the other", "numba", None)),
    ("cpu", 3, 224, 1, True, False, False, ("one after the other", "numba", None)),
    ("cpu", 2, 128, 2, False, False, False, ("side by side", "numba", None)),  # validation
    ("cpu", 32, 128, 4, True, False, False, ("one after the other", "torch", None)),
    ("cpu", 1, 128, 8, True, False, True, ("twin", "torch", None)),  # no float16 on the CPU
    ("cpu", 32, 128, 2, True, True, False, ("compiled", "compiled", None)),
    ("cuda", 1, 128, 2, True, False, True, ("one after the other", "torch", "autocast")),
    ("rocm", 32, 224, 16, True, False, False, ("one after the other", "torch", None)),
    ("dml", 8, 128, 2, True, False, True, ("one after the other", "torch", "half")),
])
def test_the_table_chooses_once(kind, batch, size, threads, folded, compiled, fp16, plan):
    got = choose_plan(kind, batch, size, threads, folded=folded, compiled=compiled, fp16=fp16,
                      numba_ok=True)
    assert (got.backbones, got.head, got.half) == plan and got.threads == threads
    if kind == "cpu" and not compiled:  # no numba: torch's head, the rest alike
        assert choose_plan(kind, batch, size, threads, folded=folded).head == "torch"


# --------------------------------------------------------------------------------------------
# Runners against the reference model
# --------------------------------------------------------------------------------------------

def images(n: int, size: int, seed: int) -> torch.Tensor:
    """Varied RGB images in [0,1] (N,3,size,size): noise images all look alike to the model."""
    from keras_reference import synthetic_images  # numpy only: no TensorFlow here
    return torch.from_numpy(synthetic_images(n, size, seed) / 255.0).float().permute(0, 3, 1, 2)


def varied_model(size: int = 64, seed: int = 0) -> CRBLModel:
    """BatchNorm statistics calibrated on varied images (as the training script's --init none
    does) and a head that points from one image's bilinear vector to another's: features and
    logits that differ between images. With random weights alone the vectors of all images
    nearly coincide, and a comparison of logits would be blind or ill-conditioned."""
    torch.manual_seed(seed)
    model = CRBLModel(CRBLConfig(image_size=size))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        model.eval()
        for m in norms:
            m.momentum = 1.0  # running statistics := this batch's
            m.train()
        model.features(images(16, size, seed + 1))
        model.eval()
        z = model.pool(*model.features(images(2, size, seed + 3))).double()
        direction = 10 * (z[0] - z[1]) / (z[0] - z[1]).square().sum()  # logits 10 apart
        model.head.weight.copy_(direction.float()[None])
        model.head.bias.fill_(-float(direction.dot(z[1])))
    return model


def assert_same_probs(logits, expected_logits):
    """The port's parity bar: probabilities within 1e-5."""
    torch.testing.assert_close(torch.sigmoid(logits), torch.sigmoid(expected_logits), rtol=0,
                               atol=1e-5)


@pytest.fixture(scope="module")
def reference_64():
    return varied_model(64)


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("batch, size, threads, fold, backbones", [
    (3, 67, 2, True, "twin"),                    # odd sizes: stride-2 SAME pads asymmetrically
    (2, 96, 1, True, "twin"),
    (3, 224, 2, True, "side by side"),           # above the twin's pixels, up to 4 images
    (3, 96, 2, False, "side by side"),           # validation: nothing folded, no twin
    (9, 128, 2, True, "one after the other"),    # above both limits
    (4, 224, 1, True, "one after the other"),    # one thread: nothing to put side by side
    (5, 96, 1, False, "one after the other"),
])
def test_every_plan_equals_the_reference_model(batch, size, threads, fold, backbones,
                                               keep_threads):
    reference = varied_model(size)
    x = images(batch, size, seed=batch)
    with torch.no_grad():
        expected = reference(x)
    model = copy.deepcopy(reference).set_channels_last(True)
    runner = prepare_for_inference(model, CPU, batch_size=batch, fold=fold, threads=threads)
    assert runner.plan.backbones == backbones
    assert runner.plan.threads == threads == torch.get_num_threads()
    with torch.inference_mode():
        got = runner(x)
    assert expected.std() > 0.2  # logits spread: the comparison is not blind
    assert_same_probs(got, expected)
    if not fold:  # the runner reads the model's weights as they are at each call
        with torch.no_grad():
            model.head.bias.add_(1.0)
        assert_same_probs(runner(x), expected + 1.0)


def test_twin_network_takes_the_backbones_over(reference_64, keep_threads):
    """One network of grouped convolutions for both folded backbones; their own tensors are
    released (meta), so the weights are held once, and the output halves are backbone 1's then
    backbone 2's."""
    x = images(3, 64, seed=4)
    folded = copy.deepcopy(reference_64)
    fp.fold_batchnorm(folded)
    with torch.no_grad():
        a, b = folded.features(x)
    model = copy.deepcopy(reference_64)
    calls = []
    for name in ("backbone1", "backbone2"):
        getattr(model, name).register_forward_hook(lambda *_, n=name: calls.append(n))
    runner = prepare_for_inference(model, CPU, batch_size=3, threads=2)
    assert runner.plan.backbones == "twin"
    assert all(p.is_meta for p in model.backbone1.parameters())
    assert sum(p.numel() for p in runner.twin.parameters()) == sum(
        p.numel() for p in (*folded.backbone1.parameters(), *folded.backbone2.parameters()))
    twin_a, twin_b = runner.features(x)
    assert calls == []  # neither backbone ran on its own
    assert a.std() > 0.05 and b.std() > 0.05 and (a - b).abs().max() > 0.1
    # float32: rounding only (grouped sums in another order), within 5e-5 of the largest value
    for got, want in ((twin_a, a), (twin_b, b)):
        torch.testing.assert_close(got, want, rtol=0, atol=5e-5 * float(want.abs().max()))
    # float64: the very same function
    with torch.no_grad():
        a64, b64 = folded.double().features(x.double())
        y64 = copy.deepcopy(runner.twin).double()(folded.normalize_input(x.double()))
    torch.testing.assert_close(y64, torch.cat([a64, b64], 1), rtol=0, atol=1e-9)


def test_side_by_side_runs_backbone_2_on_its_own_thread(reference_64, keep_threads):
    model = copy.deepcopy(reference_64)
    names = []
    model.backbone2.register_forward_hook(lambda *_: names.append(threading.current_thread().name))
    runner = prepare_for_inference(model, CPU, batch_size=2, fold=False, threads=2)
    assert runner.plan.backbones == "side by side"
    x = torch.rand(2, 3, 64, 64)
    with torch.inference_mode():
        runner(x)
    with torch.no_grad():  # no_grad without inference mode: the side thread follows it
        a, b = runner.features(x)
    assert names[0].startswith("crbl-backbone2") and names[1].startswith("crbl-backbone2")
    assert not b.requires_grad and not torch.is_inference(b)
    assert torch.get_num_threads() == 2  # given back after each forward


def test_side_thread_errors_surface_and_restore_the_thread_count(reference_64, monkeypatch):
    threads = torch.get_num_threads()
    monkeypatch.setattr(reference_64.backbone1, "forward", lambda x: 1 / 0)
    with torch.inference_mode(), pytest.raises(ZeroDivisionError):
        fp.both_backbones_at_once(reference_64.backbone1, reference_64.backbone2,
                                  torch.rand(1, 3, 64, 64))
    assert torch.get_num_threads() == threads


def test_compiled_plan_pads_short_batches(reference_64, keep_threads, monkeypatch):
    """A compiled plan has one batch shape: a short batch is padded with black images whose
    rows are dropped (here with compile itself stubbed: what is tested is the padding)."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: seen.append(type(self)))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    runner = prepare_for_inference(copy.deepcopy(reference_64), CPU, batch_size=4, compile=True,
                                   threads=2)
    assert runner.plan.backbones == "compiled" and len(seen) == 2
    sizes = []
    runner.model.backbone1.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    x = images(3, 64, seed=6)
    with torch.no_grad():
        expected = reference_64(x)
    assert_same_probs(runner(x), expected)
    assert sizes == [4]


def test_compile_is_refused_on_directml(reference_64):
    dml = DeviceInfo(torch.device("cpu"), "dml", "pretend DirectML")
    with pytest.raises(CRBLError, match="not available on DirectML"):
        prepare_for_inference(copy.deepcopy(reference_64), dml, compile=True)


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
    assert fp.fold_batchnorm(model) == 98  # 49 per EfficientNetB0: every one of them
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.inference_mode():
        after = model(x)
    assert before.abs().max() > 0.1 and (after - before).abs().max() < 1e-5
    with pytest.raises(CRBLError, match="folded .* load the checkpoint again"):
        model.train()
    with pytest.raises(CRBLError, match="folded for inference"):
        save_checkpoint(tmp_path / "folded.pth", model)
    assert not (tmp_path / "folded.pth").exists()


# --------------------------------------------------------------------------------------------
# The process: threads and memory
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(not Path("/proc/loadavg").is_file(), reason="reads Linux's /proc")
def test_free_cpus_counts_other_processes_only():
    allowed = len(fp.os.sched_getaffinity(0))
    assert 1 <= fp.free_cpus() <= allowed
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(allowed)]
    try:
        time.sleep(0.3)
        assert fp.free_cpus() == 1  # every CPU taken: one thread, never none
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()


def test_inference_runner_chooses_fewer_threads_beside_busy_processes(reference_64, keep_threads,
                                                                      monkeypatch):
    monkeypatch.setattr(fp, "free_cpus", lambda: 1)
    torch.set_num_threads(2)
    runner = prepare_for_inference(copy.deepcopy(reference_64), CPU, batch_size=2)
    assert runner.plan.threads == 1 == torch.get_num_threads()
    assert runner.plan.backbones == "twin"  # the twin pays on one thread too


_FAULTS_SCRIPT = """
import resource, sys, torch
sys.path.insert(0, {root!r})
import fast_paths_pytorch_directml as fp
took = fp.keep_freed_memory()
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(10 << 20)  # 40 MB, above glibc's 32 MB cap on its mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
rounds = [faults() for _ in range(12)]
# the first rounds may still fault while the heap settles (aligned blocks are split differently)
print(took, max(rounds[-4:]))  # took (True/False), page faults
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning is Linux-only")
@pytest.mark.parametrize("opt_out", [False, True])
def test_keep_freed_memory(opt_out):
    """With it, a 40 MB tensor made again and again reuses the same pages (no page faults once
    the heap has settled); CRBL_KEEP_FREED_MEMORY=0 keeps glibc's behaviour (~10k faults every
    time: fresh pages)."""
    import os
    env = {k: v for k, v in os.environ.items() if k != fp.KEEP_FREED_MEMORY_ENV}
    if opt_out:
        env[fp.KEEP_FREED_MEMORY_ENV] = "0"
    script = _FAULTS_SCRIPT.format(root=str(Path(fp.__file__).parent))
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         check=True).stdout
    took, faults = out.split()[-2:]
    if opt_out:
        assert took == "False" and int(faults) > 5_000
    else:
        if took != "True":
            pytest.skip("no glibc mallopt in this Python (not glibc)")
        assert int(faults) < 1_000


def test_scoring_imports_neither_timm_nor_torchvision(tmp_path):
    """Loading a checkpoint and scoring needs neither: timm imports torchvision, ~200 MB of
    resident memory before any model; building on the meta device must not pull in sympy &co
    (normal_ on a meta tensor does)."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "m.pth", CRBLModel(CRBLConfig(image_size=64)))
    code = ("import sys, torch, model_pytorch_directml as mp, fast_paths_pytorch_directml as fp\n"
            f"m = mp.load_model({str(tmp_path / 'm.pth')!r})\n"
            "r = fp.prepare_for_inference(m, mp.get_device('cpu'), batch_size=2)\n"
            "with torch.inference_mode(): p = torch.sigmoid(r(torch.rand(2, 3, 64, 64)))\n"
            "assert p.shape == (2, 1)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'timm', 'torchvision', 'sympy'}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(mp.__file__).parent))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"
