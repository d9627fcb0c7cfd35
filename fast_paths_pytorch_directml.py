"""How CRBL inference runs fast: chosen once per run, apart from the model.

`model_pytorch_directml.CRBLModel` computes CRBL plainly and is the reference. `prepare_for_inference`
turns a loaded model into an `InferenceRunner` that computes the same logits faster where it runs
(tests/test_fast_paths.py holds every path against the reference). `choose_plan` decides once,
from the device, the batch size, the image size and the threads free (one table, `CPU_RULES`):

- BatchNorm folded into the convolution before it (inference only: the model cannot train after).
- Backbones on the CPU: small batches run both as one "twin" network of grouped convolutions
  (half the operations, each twice as large) or side by side, one per thread; larger batches
  run them one after the other on every thread.
- Head: the logit straight from the two feature maps, never storing the 1280² bilinear vector:
  a numba one-pass kernel on up to two threads on the CPU, torch ops over row chunks elsewhere
  (GPUs, more threads, no numba), torch.compile's fused chunk math with --compile.
- Precision: float16 backbones on DirectML (it has no autocast), autocast on CUDA/ROCm; the head
  always stays float32 (its 1280² sums overflow float16).
- The process: glibc keeps freed memory (keep_freed_memory); fewer threads while other processes
  hold the cores (free_cpus).
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import itertools
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from model_pytorch_directml import (NUM_FEATURES, Conv2dSame, CRBLError, CRBLModel, DeviceInfo,
                                    EfficientNetB0, SqueezeExcite, autocast, capturing_graph,
                                    rows_per_chunk)

# Where each CPU implementation pays (docs/speed.md says why).
CPU_RULES = {
    # The twin network: up to this many pixels per channel in a batch (8 images at 128 px); from
    # ~400k pixels per channel on, its larger operations gain nothing over two networks.
    "twin_max_pixels": 8 * 128 * 128,
    # One backbone per thread (two threads): batches up to this size, where one network of ~300
    # small operations splits poorly over threads.
    "side_by_side_max_batch": 4,
    # The numba head runs on this thread and one more; with more threads torch's own ops win.
    "fused_head_max_threads": 2,
}
FUSED_HEAD_ENV = "CRBL_FUSED_HEAD"
KEEP_FREED_MEMORY_ENV = "CRBL_KEEP_FREED_MEMORY"


def opted_out(env: str) -> bool:
    """Whether an on-by-default speed setting (CRBL_FUSED_HEAD, CRBL_KEEP_FREED_MEMORY) is turned
    off with ENV=0."""
    return os.environ.get(env, "1") == "0"


# --------------------------------------------------------------------------------------------
# The plan, chosen once
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    backbones: str     # "twin" | "side by side" | "one after the other" | "compiled"
    head: str          # "numba" | "torch" | "compiled"
    threads: int       # torch threads for this run
    half: str | None   # None | "half" (float16 weights, DirectML) | "autocast" (CUDA/ROCm)

    def __str__(self) -> str:
        return (f"backbones {self.backbones}, head {self.head}, {self.threads} thread"
                f"{'s' if self.threads != 1 else ''}" + (f", float16 {self.half}" if self.half else ""))


def choose_plan(device_kind: str, batch_size: int, image_size: int, threads: int, *,
                folded: bool, compiled: bool = False, fp16: bool = False,
                numba_ok: bool = False) -> Plan:
    """Which implementation of each part runs, from CPU_RULES."""
    half = ("autocast" if device_kind in ("cuda", "rocm") else "half" if device_kind == "dml"
            else None) if fp16 else None
    if compiled:
        return Plan("compiled", "compiled", threads, half)
    if device_kind != "cpu":
        return Plan("one after the other", "torch", threads, half)
    if folded and batch_size * image_size ** 2 <= CPU_RULES["twin_max_pixels"]:
        backbones = "twin"
    elif threads > 1 and batch_size <= CPU_RULES["side_by_side_max_batch"]:
        backbones = "side by side"
    else:
        backbones = "one after the other"
    head = "numba" if numba_ok and threads <= CPU_RULES["fused_head_max_threads"] else "torch"
    return Plan(backbones, head, threads, None)


def prepare_for_inference(model: CRBLModel, device: DeviceInfo, *, fp16: bool = False,
                          batch_size: int = 32, compile: bool = False, fold: bool = True,
                          threads: int | None = None) -> "InferenceRunner":
    """The model's logits, fast, for batches of up to batch_size images on device.

    The model becomes the runner's: BatchNorm folded into its convolutions (fold) and, where
    the twin network runs, its backbones' weights moved into the twin; load the checkpoint again
    to train or save. fold=False (training's validation, whose weights keep changing): nothing
    is folded or joined, the runner reads the model's current weights at every call.
    threads: torch threads to run on; None: on the CPU those not kept busy by other processes
    (free_cpus), at most torch's current number.
    """
    model.eval()
    if compile and device.kind == "dml":
        raise CRBLError("--compile is not available on DirectML (torch.compile has no DirectML "
                        "backend); leave it out")
    if device.kind == "cpu":
        keep_freed_memory()
        if threads is None:
            threads = max(1, min(torch.get_num_threads(), free_cpus()))
    threads = threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    folded = fold and fold_batchnorm(model) > 0
    # numba itself loads in InferenceRunner, after the twin took the backbones over: the memory
    # their weights leave behind then serves numba's, not a new peak.
    plan = choose_plan(device.kind, batch_size, model.config.image_size, threads, folded=folded,
                       compiled=compile, fp16=fp16, numba_ok=bool(device.kind == "cpu"
                       and not opted_out(FUSED_HEAD_ENV) and importlib.util.find_spec("numba")))
    if plan.half == "half":  # DirectML has no autocast: the backbones (and input buffers) in float16
        for module in (model.backbone1, model.backbone2):
            module.half()
        model.input_mean, model.input_std = model.input_mean.half(), model.input_std.half()
    twin = join_backbones(model) if plan.backbones == "twin" else None
    if compile:
        for backbone in (model.backbone1, model.backbone2):
            backbone.compile(dynamic=False)
    return InferenceRunner(model, plan, twin, pad_to=batch_size if compile else 0)


class InferenceRunner:
    """CRBL logits by `plan`: call it on (N,3,H,W) RGB floats in [0, 1] on the model's device."""

    def __init__(self, model: CRBLModel, plan: Plan, twin: EfficientNetB0 | None = None,
                 pad_to: int = 0):
        self.model, self.twin, self.pad_to = model, twin, pad_to
        self.kernel = fused_head_kernel() if plan.head == "numba" else None
        if plan.head == "numba" and self.kernel is None:  # numba there but unusable (it warned)
            plan = dataclasses.replace(plan, head="torch")
        self.plan = plan
        self.terms = torch.compile(chunk_terms, dynamic=False) if plan.head == "compiled" \
            else chunk_terms

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both backbones' maps (N,1280,h,w), as this plan runs them."""
        return self.backbone_maps(x)

    def backbone_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features, with autograd where the caller enables it (heatmaps differentiate the
        logit with respect to the image through it)."""
        model = self.model
        x = model.normalize_input(x.half() if self.plan.half == "half" else x)
        with autocast(x.device.type, enabled=self.plan.half == "autocast"):
            if self.plan.backbones == "twin":
                y = self.twin(x)
                return y[:, :NUM_FEATURES], y[:, NUM_FEATURES:]
            if self.plan.backbones == "side by side":
                return both_backbones_at_once(model.backbone1, model.backbone2, x)
            return model.backbone1(x), model.backbone2(x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N, 1), float32. A compiled plan has one batch shape: a shorter batch is padded
        with black images whose rows are dropped (samples never mix in CRBL)."""
        n = len(x)
        if n < self.pad_to:
            x = torch.cat([x, x.new_zeros((self.pad_to - n, *x.shape[1:]))])
        a, b = self.features(x)
        return self.head_logits(a.float(), b.float())[:n]

    def head_logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """`head(pool(a, b))` of the model without storing phi or z:
        logit = Σ w·sign(phi)·sqrt(|phi|+eps) / sqrt(max(Σ(|phi|+eps), l2_eps)) + bias."""
        pool, head = self.model.pool, self.model.head
        n, c, h, w = a.shape
        w_mat = head.weight.reshape(c, b.shape[1])
        if (self.kernel is not None and a.dtype == b.dtype == w_mat.dtype == torch.float32
                and type(a) is torch.Tensor  # FakeTensor, functorch wrappers: no .numpy()
                and not capturing_graph()):
            dot, sq_norm = fused_terms(self.kernel, by_position(a).numpy(), by_position(b).numpy(),
                                       w_mat.detach().contiguous().numpy(), 1 / (h * w), pool.eps)
        else:
            dot, sq_norm = chunked_terms(a, b, w_mat, pool.eps, self.terms)
        logits = dot / sq_norm.clamp_min(pool.l2_eps).sqrt()
        return logits.to(a.dtype)[:, None] + head.bias


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------

_thread_pools: dict[tuple[int, str, int], ThreadPoolExecutor] = {}


def thread_pool(name: str, threads: int, initializer=None, initargs: tuple = ()
                ) -> ThreadPoolExecutor:
    """This process's `threads` threads named `name`, started once and kept. Keyed by process
    id: a forked child inherits the parent's pool without its threads but with its idle count,
    and work handed to it would never run."""
    key = (os.getpid(), name, threads)
    if key not in _thread_pools:
        _thread_pools[key] = ThreadPoolExecutor(threads, thread_name_prefix=name,
                                                initializer=initializer, initargs=initargs)
    return _thread_pools[key]


def second_thread() -> ThreadPoolExecutor:
    """One more single-threaded worker: backbone 2 beside backbone 1, half of the numba head."""
    return thread_pool("crbl-backbone2", 1, initializer=torch.set_num_threads, initargs=(1,))


def free_cpus(samples: int = 5, interval: float = 0.01) -> int:
    """CPUs this process may use that other processes are not keeping busy: the allowed CPUs
    less the most free of a few looks at the machine's runnable tasks outside this process
    (/proc/loadavg's running count less this process's running threads). Two OpenMP threads
    on two cores, one of which another process holds, wait for each other at every operation;
    one thread on the free core does not. Elsewhere than Linux: the allowed CPUs."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)
    busy = []
    for i in range(samples):
        try:
            with open("/proc/loadavg") as f:
                running = int(f.read().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):  # not Linux
            return allowed
        busy.append(max(0, running - _running_threads_here()))
        if i + 1 < samples:
            time.sleep(interval)
    return max(1, allowed - min(busy))


def _running_threads_here() -> int:
    """This process's threads in state R (running or runnable), from /proc/self/task."""
    count = 0
    for task in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{task}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except OSError:  # the thread ended meanwhile
            continue
    return max(1, count)


def both_backbones_at_once(backbone1: nn.Module, backbone2: nn.Module, x: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone 2 on a second thread while this one runs backbone 1, each single-threaded; the
    head then gets every thread back. Same results up to float32 rounding (sums whose order
    depends on the thread count)."""
    threads = torch.get_num_threads()
    inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

    def second() -> torch.Tensor:  # grad and inference mode are per thread
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return backbone2(x)

    torch.set_num_threads(1)
    try:
        pending = second_thread().submit(second)
        try:
            a = backbone1(x)
        finally:
            b = pending.result()  # never leave it running with our thread count changed
    finally:
        torch.set_num_threads(threads)
    return a, b


# --------------------------------------------------------------------------------------------
# BatchNorm folding and the twin network
# --------------------------------------------------------------------------------------------

def conv_bn_pairs(model: nn.Module):
    """(module, convolution name, BatchNorm name) for every convolution that feeds a BatchNorm,
    from the blocks' CONV_BN_PAIRS."""
    return ((m, conv, bn) for m in model.modules() for conv, bn in getattr(m, "CONV_BN_PAIRS", ()))


def _cpu_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()  # on the CPU: DirectML has no float64


@torch.no_grad()
def fold_batchnorm(model: CRBLModel) -> int:
    """Inference only: fold every eval-mode BatchNorm into the convolution before it, in place
    (w' = w·γ/√(var+eps), b' = β − mean·γ/√(var+eps), in float64), leaving its activation: 98
    fewer passes over the activations per image. Returns the number of BatchNorms folded. The
    model can no longer be trained or saved (load the checkpoint again for that)."""
    if model.training:
        raise CRBLError("fold_batchnorm is for inference: call model.eval() first")
    folded = 0
    for module, conv_name, bn_name in conv_bn_pairs(model):
        conv, bn = getattr(module, conv_name, None), getattr(module, bn_name, None)
        if not (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
                and bn.track_running_stats and bn.affine):
            continue
        scale = _cpu_f64(bn.weight) / torch.sqrt(_cpu_f64(bn.running_var) + bn.eps)
        shift = _cpu_f64(bn.bias) - _cpu_f64(bn.running_mean) * scale
        bias = shift if conv.bias is None else _cpu_f64(conv.bias) * scale + shift
        conv.weight.copy_(_cpu_f64(conv.weight) * scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bias.to(conv.weight), requires_grad=False)
        setattr(module, bn_name, nn.Identity())  # the SiLU after it stays in forward
        folded += 1
    model.batchnorm_folded = model.batchnorm_folded or folded > 0
    return folded


def _wider(conv: nn.Conv2d) -> nn.Conv2d:
    """conv for two networks at once: twice the channels in two groups (the stem, which reads
    the one input image, only twice the outputs), with a bias (BatchNorm folded in)."""
    stem = conv.in_channels == 3
    in_chs, groups = (3, conv.groups) if stem else (2 * conv.in_channels, 2 * conv.groups)
    if isinstance(conv, Conv2dSame):
        return Conv2dSame(in_chs, 2 * conv.out_channels, conv.kernel_size[0], conv.stride[0],
                          groups=groups, bias=True)
    return nn.Conv2d(in_chs, 2 * conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     groups=groups, bias=True)


@torch.no_grad()
def join_backbones(model: CRBLModel) -> EfficientNetB0:
    """Both folded backbones as one EfficientNetB0 of twice the channels, every convolution in
    two groups: channels [0, 1280) of its output are backbone 1's, the rest backbone 2's, equal
    to the separate backbones up to float32 rounding (a grouped convolution sums in another
    order). The twin takes the weights over: the backbones are left empty (meta)."""
    body1, body2 = model.backbone1.body, model.backbone2.body
    with torch.device("meta"):
        twin = EfficientNetB0()
        for module, conv_name, bn_name in list(conv_bn_pairs(twin)):
            setattr(module, conv_name, _wider(getattr(module, conv_name)))
            setattr(module, bn_name, nn.Identity())
        for se in [m for m in twin.modules() if isinstance(m, SqueezeExcite)]:
            se.conv_reduce, se.conv_expand = _wider(se.conv_reduce), _wider(se.conv_expand)
    own1, own2 = body1.state_dict(), body2.state_dict()
    twin.load_state_dict({k: torch.cat([v, own2[k]]) for k, v in own1.items()},  # keeps the layout
                         strict=True, assign=True)
    body1.to_empty(device="meta")
    body2.to_empty(device="meta")
    return twin.requires_grad_(False).eval()


# --------------------------------------------------------------------------------------------
# The head without phi: torch ops over row chunks, and the numba kernel
# --------------------------------------------------------------------------------------------

def by_position(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps as (N, H·W, C), C-contiguous: a view of channels_last maps, else a copy."""
    n, c, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()


def chunk_terms(phi: torch.Tensor, w: torch.Tensor, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·sign(phi)·sqrt(|phi|+eps), Σ(|phi|+eps)) per sample of a (N, rows, C) chunk of phi:
    Σy² of the signed square root is Σ(|phi|+eps), so y² is never formed. Plain ops, which
    torch.compile fuses into one pass over the chunk."""
    magnitude = phi.abs() + eps
    dot = (torch.sign(phi) * torch.sqrt(magnitude) * w).sum((1, 2))
    return dot, magnitude.sum((1, 2))


def chunked_terms(a: torch.Tensor, b: torch.Tensor, w_mat: torch.Tensor, eps: float,
                  terms=chunk_terms) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·y, Σy²) per sample, phi built a chunk of rows at a time (rows_per_chunk: a few MB
    that stay in cache on the CPU, few large kernels on a GPU)."""
    n, c, h, w = a.shape
    a = a.reshape(n, c, h * w)
    # 1/(H·W) folded into the small B matrix: one pass less over the N×C² products.
    bt = b.reshape(n, b.shape[1], h * w).transpose(1, 2).div(h * w).contiguous()
    c2 = bt.shape[2]
    dot, sq_norm = a.new_zeros(n), a.new_zeros(n)
    rows = rows_per_chunk(c, n * c2, a.device)
    buf = a.new_empty(n, rows, c2)
    for r in range(0, c, rows):
        k = min(rows, c - r)
        phi = buf if k == rows else buf[:, :k].contiguous()
        # a contiguous copy of the row slice: batched GEMM is several times slower on the view
        torch.bmm(a[:, r:r + k].contiguous(), bt, out=phi)
        chunk_dot, chunk_sq = terms(phi, w_mat[None, r:r + k], eps)
        dot += chunk_dot
        sq_norm += chunk_sq
    return dot, sq_norm


FUSED_HEAD_ROWS = 128  # phi rows per call of the kernel: the share a thread takes at a time
_fused_head: Any = None  # numba's compiled _bilinear_terms once built; False: not available


def fused_terms(kernel, a: np.ndarray, b: np.ndarray, w: np.ndarray, scale: float, eps: float
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·y, Σy²) per sample from the numba kernel, on this thread and, with 2 torch threads,
    on the second one too: each takes the next FUSED_HEAD_ROWS rows until none are left.

    Shares as they go, not halves: after the backbones' last parallel op torch's OpenMP worker
    keeps spinning on one core for a while, so the two threads run at unequal speed. Each
    share's sums have their own slot, added in row order: the logits do not depend on which
    thread ran what."""
    n, c = len(a), a.shape[2]
    shares = -(-c // FUSED_HEAD_ROWS)
    parts = np.zeros((shares, 2, n))
    take = itertools.count().__next__  # atomic under the GIL
    scale, eps = np.float32(scale), np.float32(eps)

    def work() -> None:
        for i in iter(take, None):
            if i >= shares:
                return
            r = i * FUSED_HEAD_ROWS
            kernel(a, b, w, scale, eps, parts[i, 0], parts[i, 1], r, min(c, r + FUSED_HEAD_ROWS))

    helper = second_thread().submit(work) if torch.get_num_threads() > 1 and shares > 1 else None
    try:
        work()
    finally:
        if helper is not None and not helper.cancel():  # not started (busy elsewhere): all done here
            helper.result()
    dot, sq_norm = parts.sum(axis=0)
    return torch.from_numpy(dot), torch.from_numpy(sq_norm)


def _bilinear_terms(a, b, w, scale, eps, dot, sq, r_lo, r_hi):
    """dot[s] = Σ w·sign(phi)·sqrt(|phi|+eps), sq[s] = Σ(|phi|+eps) over rows [r_lo, r_hi) of phi
    = scale·Aᵀ·B, A = a[s], B = b[s] (N, H·W, C) float32, w the (C, C) head weight: four rows at a
    time in an L1-resident buffer, summed in the pass that builds them; float64 totals."""
    n, k = a.shape[:2]
    c2 = b.shape[2]
    zero = np.float32(0.0)
    rows = np.empty((4, c2), dtype=np.float32)
    k4 = k - k % 4
    for s in range(n):
        dot_s = 0.0
        sq_s = 0.0
        for i in range(r_lo, r_hi, 4):
            m = min(4, r_hi - i)
            for r in range(4):
                for j in range(c2):
                    rows[r, j] = zero
            for p in range(0, k4, 4):
                if m == 4:
                    x00 = a[s, p, i] * scale; x01 = a[s, p + 1, i] * scale
                    x02 = a[s, p + 2, i] * scale; x03 = a[s, p + 3, i] * scale
                    x10 = a[s, p, i + 1] * scale; x11 = a[s, p + 1, i + 1] * scale
                    x12 = a[s, p + 2, i + 1] * scale; x13 = a[s, p + 3, i + 1] * scale
                    x20 = a[s, p, i + 2] * scale; x21 = a[s, p + 1, i + 2] * scale
                    x22 = a[s, p + 2, i + 2] * scale; x23 = a[s, p + 3, i + 2] * scale
                    x30 = a[s, p, i + 3] * scale; x31 = a[s, p + 1, i + 3] * scale
                    x32 = a[s, p + 2, i + 3] * scale; x33 = a[s, p + 3, i + 3] * scale
                    for j in range(c2):
                        v0 = b[s, p, j]
                        v1 = b[s, p + 1, j]
                        v2 = b[s, p + 2, j]
                        v3 = b[s, p + 3, j]
                        rows[0, j] += x00 * v0 + x01 * v1 + x02 * v2 + x03 * v3
                        rows[1, j] += x10 * v0 + x11 * v1 + x12 * v2 + x13 * v3
                        rows[2, j] += x20 * v0 + x21 * v1 + x22 * v2 + x23 * v3
                        rows[3, j] += x30 * v0 + x31 * v1 + x32 * v2 + x33 * v3
                else:  # the last rows where C is not a multiple of 4
                    for r in range(m):
                        for q in range(p, p + 4):
                            x = a[s, q, i + r] * scale
                            for j in range(c2):
                                rows[r, j] += x * b[s, q, j]
            for q in range(k4, k):  # positions left over after the groups of four
                for r in range(m):
                    x = a[s, q, i + r] * scale
                    for j in range(c2):
                        rows[r, j] += x * b[s, q, j]
            for r in range(m):
                row_dot = zero
                row_sq = zero
                for j in range(c2):
                    v = rows[r, j]
                    magnitude = abs(v) + eps
                    row_sq += magnitude
                    y = math.sqrt(magnitude)
                    row_dot += w[i + r, j] * (y if v > 0 else (-y if v < 0 else zero))  # TF's sign(0) = 0
                dot_s += row_dot
                sq_s += row_sq
        dot[s] = dot_s
        sq[s] = sq_s


def fused_head_kernel():
    """The CPU inference head's fused kernel (`_bilinear_terms` compiled by numba), or None where
    numba is not installed, cannot load or compile (a warning says why) or CRBL_FUSED_HEAD=0.
    Compiled once per machine and cached beside this file or in the user's cache folder
    (per process where neither is writable). Loading numba and LLVM costs a process ~100 MB of
    resident memory, which is why only CPU runs ask for it. A thread that asks while another
    compiles gets None (torch ops)."""
    global _fused_head
    if opted_out(FUSED_HEAD_ENV):
        return None
    if _fused_head is None:
        _fused_head = False
        try:
            import numba
        except ModuleNotFoundError as exc:
            if exc.name != "numba":  # numba is there, something it needs is not
                _fused_head_failed("import numba", exc)
            return None
        except Exception as exc:  # installed but broken: built for another numpy, llvmlite, ...
            _fused_head_failed("import numba", exc)
            return None
        signature = ("void(float32[:, :, ::1], float32[:, :, ::1], float32[:, ::1], float32, float32, "
                     "float64[::1], float64[::1], int64, int64)")
        # reassoc/contract: SIMD sums and FMA; no "fast" math: sqrt, NaN and inf stay exact
        options = dict(fastmath={"reassoc", "contract", "nsz"}, nogil=True, boundscheck=False)
        try:
            try:
                _fused_head = numba.njit(signature, cache=True, **options)(_bilinear_terms)
            except RuntimeError as exc:  # "cannot cache ...": no writable cache folder
                if "cache" not in str(exc):
                    raise
                _fused_head = numba.njit(signature, **options)(_bilinear_terms)
        except Exception as exc:  # a broken llvmlite, no target machine, ...
            _fused_head_failed(f"numba {numba.__version__} compiling it", exc)
    return _fused_head or None


def _fused_head_failed(step: str, exc: Exception) -> None:
    warnings.warn(f"fused CPU head unavailable, the torch one runs instead: {step} failed "
                  f"({type(exc).__name__}: {exc}); set {FUSED_HEAD_ENV}=0 to skip it",
                  RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------------------------
# The process's memory
# --------------------------------------------------------------------------------------------

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters


def keep_freed_memory() -> bool:
    """Linux/glibc: keep freed memory in the process instead of handing it back to the kernel.

    glibc serves large blocks with a fresh mmap() and trims the heap on free(), so every batch's
    activations would land on new pages that the kernel must zero and fault in, 4 KB at a time
    (costly, above all in a VM). With mmap off and no trimming, a batch reuses the last one's
    pages. The cost: the process keeps its peak heap until it exits, as GPU caching allocators
    do. CRBL_KEEP_FREED_MEMORY=0 opts out; a preloaded jemalloc or tcmalloc ignores it. Returns
    whether the settings took."""
    if opted_out(KEEP_FREED_MEMORY_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
