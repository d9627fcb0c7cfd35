"""Training's head without its largest intermediates: what lets a crop model train on a 4-8 GB card.

The reference head (model_pytorch_directml: BilinearPooling, Dropout, Linear) keeps, per image,
phi, |phi|, sqrt, sign, y and y² for autograd (six N×1280² float tensors: ~1.3 GB at batch 32)
plus a dropped-out float copy of z for Linear's backward (210 MB). `use_lean_head(model)` swaps
in modules that compute the same values and gradients while keeping one N×1280² tensor and a
uint8 dropout mask. The training script calls it once, before training; checkpoints do not
change (the Linear keeps its parameter names).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from model_pytorch_directml import BilinearPooling, CRBLModel, rows_per_chunk


def use_lean_head(model: CRBLModel) -> CRBLModel:
    """Swap the model's pooling, dropout and head for their memory-saving equals, in place."""
    pool, head = model.pool, model.head
    lean_pool = LeanBilinearPooling(pool.eps, pool.l2_eps)
    lean_head = DropoutLinear(head.in_features, head.out_features, p=model.dropout.p,
                              device="meta")
    lean_head.weight, lean_head.bias = head.weight, head.bias  # the same Parameters
    model.pool, model.dropout, model.head = lean_pool, nn.Identity(), lean_head
    return model


class LeanBilinearPooling(BilinearPooling):
    """BilinearPooling whose signed square root and normalisation run in place on phi."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = _SignedSqrtL2Normalize.apply(self.outer(a, b), self.eps, self.l2_eps)
        return z.reshape(len(z), -1)


class DropoutLinear(nn.Linear):
    """Linear(Dropout(p)(z)) whose backward keeps the dropout mask as uint8, not a float copy of
    the dropped-out z (the usual Linear(in, 1) of CRBL's head: one logit)."""

    def __init__(self, in_features: int, out_features: int, p: float, **kwargs):
        super().__init__(in_features, out_features, **kwargs)
        self.p = p

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training and 0 < self.p < 1 and self.out_features == 1:
            return _DropoutLinear1.apply(z, self.weight, self.bias, self.p)
        return F.linear(F.dropout(z, self.p, self.training), self.weight, self.bias)


def _signed_sqrt_(chunk: torch.Tensor, sign: torch.Tensor, eps: float) -> torch.Tensor:
    """chunk := sign(chunk)·sqrt(|chunk| + eps) in place; returns Σ(|chunk| + eps) per row (= Σy²)."""
    torch.sign(chunk, out=sign)
    chunk.abs_().add_(eps)
    sq_norm = chunk.sum(dim=tuple(range(1, chunk.dim())))
    chunk.sqrt_().mul_(sign)
    return sq_norm


class _SignedSqrtL2Normalize(torch.autograd.Function):
    """z = l2_normalize(sign(phi) * sqrt(|phi| + eps)) per sample, computed in place on phi
    (N, ...), flattened per sample inside.

    Saves only z and the norm: autograd's version keeps phi, |phi|, sqrt, sign, y and y² alive
    (six N×1280² tensors, ~1.3 GB at batch 32) where this keeps one. phi must be a tensor of its
    own, not a view (a reshape): in place on a view, autograd copies the whole gradient through
    CopySlices, a full extra pass over N×1280² floats.
    """

    @staticmethod
    def forward(ctx, phi_nd: torch.Tensor, eps: float, l2_eps: float) -> torch.Tensor:
        phi = phi_nd.view(len(phi_nd), -1)
        n, d = phi.shape
        step = rows_per_chunk(n, d, phi.device)
        sign = phi.new_empty(step, d)
        sq_norm = phi.new_empty(n)
        for i in range(0, n, step):
            k = min(step, n - i)
            sq_norm[i:i + k] = _signed_sqrt_(phi[i:i + k], sign[:k], eps)
        norm = sq_norm.clamp_min_(l2_eps).sqrt_()
        phi.div_(norm[:, None])
        ctx.mark_dirty(phi_nd)
        ctx.save_for_backward(phi_nd, norm)
        return phi_nd

    @staticmethod
    def backward(ctx, grad_nd: torch.Tensor):
        z_nd, norm = ctx.saved_tensors
        z, grad = z_nd.view(len(z_nd), -1), grad_nd.reshape(len(z_nd), -1)
        # dz/dy = (I - z zᵀ)/‖y‖ ; dy/dphi = 1/(2|y|), |y| = |z|·‖y‖  =>
        # dphi = (g - z (z·g)) / (2‖y‖²|z|), and 0 where phi == 0 (TF's gradient of sign there).
        n, d = z.shape
        dphi = torch.empty_like(z)
        step = rows_per_chunk(n, d, z.device)
        tmp = z.new_empty(step, d)
        for i in range(0, n, step):
            k = min(step, n - i)
            zc, gc, out, t = z[i:i + k], grad[i:i + k], dphi[i:i + k], tmp[:k]
            zg = torch.mul(zc, gc, out=t).sum(dim=1, keepdim=True)
            torch.mul(zc, zg, out=out)
            torch.sub(gc, out, out=out)
            torch.abs(zc, out=t).mul_(2 * norm[i:i + k, None] ** 2)
            out.div_(t).masked_fill_(t == 0, 0.0)
        return dphi.view_as(z_nd), None, None


def _keep_mask(n: int, d: int, p: float, device: torch.device) -> torch.Tensor:
    """Dropout's keep mask (N, D) as uint8 0/1, each entry 1 with probability 1 - p. uint8, not
    bool: converting bool to float is an order of magnitude slower on the CPU. For p = 0.5 on
    the CPU: 8 random bits per random byte instead of one random float per entry."""
    if p == 0.5 and device.type == "cpu":
        random_bytes = torch.randint(0, 256, (n, (d + 7) // 8), dtype=torch.uint8)
        bits = torch.arange(8, dtype=torch.uint8)
        return (random_bytes[:, :, None] >> bits).bitwise_and_(1).view(n, -1)[:, :d]
    return (torch.rand(n, d, device=device) >= p).to(torch.uint8)


class _DropoutLinear1(torch.autograd.Function):
    """Linear(D -> 1)(Dropout(p)(z)) for training. nn.Dropout + nn.Linear keep a dropped-out
    float copy of z for Linear's backward (210 MB at batch 32); this keeps only the uint8 mask
    (52 MB); every product is a matrix product with a column (mm): DirectML has no mv."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float
                ) -> torch.Tensor:
        n, d = z.shape
        keep = _keep_mask(n, d, p, z.device)
        scale = 1.0 / (1.0 - p)
        w_col = weight.reshape(-1, 1)  # mm with a column: torch-directml has no addmv (mv)
        logits = z.new_empty(n, 1)
        step = rows_per_chunk(n, d, z.device)
        buf = z.new_empty(step, d)
        for i in range(0, n, step):
            k = min(step, n - i)
            torch.mm(buf[:k].copy_(keep[i:i + k]).mul_(z[i:i + k]), w_col, out=logits[i:i + k])
        ctx.save_for_backward(z, weight, keep)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return logits * scale + bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weight, keep = ctx.saved_tensors
        n, d = z.shape
        g = grad.reshape(n) * ctx.scale
        w = weight.reshape(-1)
        grad_z = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        step = rows_per_chunk(n, d, z.device)
        buf = z.new_empty(step, d)
        for i in range(0, n, step):
            k = min(step, n - i)
            mask = buf[:k].copy_(keep[i:i + k])  # one float copy of the mask serves both grads
            if grad_z is not None:
                torch.mul(mask, w, out=grad_z[i:i + k]).mul_(g[i:i + k, None])
            if grad_w is not None:
                grad_w += g[i:i + k] @ mask.mul_(z[i:i + k])
        if grad_w is not None:
            grad_w = grad_w.view_as(weight)
        return grad_z, grad_w, grad.sum(0).reshape(ctx.bias_shape), None
