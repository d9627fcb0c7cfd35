"""CRBL in PyTorch: two EfficientNetB0 backbones fused by bilinear pooling.

The one model module every script imports. It reproduces the original Keras model
(see ../shared/ORIGINAL_MODEL.md) exactly:

    x (N,3,H,W) RGB in [0,1] -> input normalisation (buffers; identity for the original CRBL)
      -> backbone 1 (ImageNet)        -> A (N,1280,h,w)
      -> backbone 2 (Noisy-Student)   -> B (N,1280,h,w)
      -> bilinear pooling: phi = A·Bᵀ/(h·w), sign·sqrt(|phi|+1e-12), L2 normalise -> z (N,1280²)
      -> Dropout(0.5) -> Linear(1280², 1) -> logit

Also here: the Keras-layer <-> timm-module table (used by the converter and the freezing
helper), get_device (DirectML > CUDA/ROCm > CPU) and checkpoint save/load.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import itertools
import math
import os
import pickle
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

CHECKPOINT_FORMAT = "crbl-pytorch"
CHECKPOINT_VERSION = 1
ARCH = "crbl_bilinear_efficientnet_b0"
NUM_FEATURES = 1280  # EfficientNetB0 top_conv channels

# Thresholds the original inference used per model type.
MODEL_TYPE_THRESHOLDS = {"crop": 0.01, "full": 0.5}
# Keras `layers[:150]` of each backbone are frozen in the crop model (layer 150 = block5c_se_expand).
CROP_TRAINABLE_FROM = 150

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# timm tags of the pretrained sources the original Keras backbones came from.
PRETRAINED_TAGS = {
    "imagenet": "tf_efficientnet_b0.aa_in1k",  # qubvel weights="imagenet" (AutoAugment TF ckpt)
    "noisy-student": "tf_efficientnet_b0.ns_jft_in1k",
}
WEIGHTS_DIR_ENV = "CRBL_WEIGHTS_DIR"


class CRBLError(Exception):
    """Something the user gave us is wrong; scripts print the message and exit 2 (as argparse
    does for a bad option)."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """The scripts' --help: every option's default once, after its help. Not for options whose
    default is None (their help says what happens then), nor for on/off flags (off unless
    given), nor where the help names the default itself, e.g. "(default: 128; 64 with --demo)"."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is None or action.default is False or "(default" in text:
            return text
        return super()._get_help_string(action)


# --------------------------------------------------------------------------------------------
# Keras EfficientNetB0 layer table
# --------------------------------------------------------------------------------------------

# (expand ratio, kernel, stride, output channels, repeats) per stage: EfficientNet-B0.
B0_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3),
             (6, 5, 1, 112, 3), (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
B0_STEM, B0_BN_EPS = 32, 1e-3


@dataclass(frozen=True)
class KerasLayer:
    index: int            # position in the Keras backbone's `model.layers` (qubvel order)
    keras_name: str       # e.g. "block5c_se_expand"
    keras_class: str      # "Conv2D", "DepthwiseConv2D", "BatchNormalization", or a weightless class
    timm_module: str | None  # e.g. "blocks.4.2.se.conv_expand"; None for weightless layers


def _block_layers(stage: int, j: int, expand: int, skip: bool) -> list[tuple[str, str, str | None]]:
    prefix = f"block{stage + 1}{'abcdefghijklmnopqrstuvwxyz'[j]}_"
    timm = f"blocks.{stage}.{j}."
    if expand == 1:  # depthwise-separable block (timm DepthwiseSeparableConv)
        names = {"dwconv": "conv_dw", "bn": "bn1", "project_conv": "conv_pw", "project_bn": "bn2"}
    else:  # inverted residual (timm InvertedResidual)
        names = {"expand_conv": "conv_pw", "expand_bn": "bn1", "dwconv": "conv_dw", "bn": "bn2",
                 "project_conv": "conv_pwl", "project_bn": "bn3"}
    rows = []
    if expand != 1:
        rows += [("expand_conv", "Conv2D"), ("expand_bn", "BatchNormalization"),
                 ("expand_activation", "Activation")]
    rows += [("dwconv", "DepthwiseConv2D"), ("bn", "BatchNormalization"), ("activation", "Activation"),
             ("se_squeeze", "GlobalAveragePooling2D"), ("se_reshape", "Reshape"),
             ("se_reduce", "Conv2D"), ("se_expand", "Conv2D"), ("se_excite", "Multiply"),
             ("project_conv", "Conv2D"), ("project_bn", "BatchNormalization")]
    if skip:  # qubvel: drop connect (FixedDropout) + add on repeated blocks
        rows += [("drop", "FixedDropout"), ("add", "Add")]
    se = {"se_reduce": "se.conv_reduce", "se_expand": "se.conv_expand"}
    out = []
    for short, cls in rows:
        module = names.get(short) or se.get(short)
        out.append((prefix + short, cls, timm + module if module else None))
    return out


def keras_layer_table() -> list[KerasLayer]:
    """Every layer of a qubvel EfficientNetB0 (include_top=False) in Keras `model.layers` order.

    Index 150 is `block5c_se_expand`, the original crop model's freezing boundary.
    keras.applications' B0 has the same weighted layers in the same order (plus preprocessing
    and padding layers), so the converter uses the weighted rows of this table for both.
    """
    rows: list[tuple[str, str, str | None]] = [
        ("input_1", "InputLayer", None), ("stem_conv", "Conv2D", "conv_stem"),
        ("stem_bn", "BatchNormalization", "bn1"), ("stem_activation", "Activation", None)]
    for stage, (expand, _kernel, _stride, _out, repeats) in enumerate(B0_STAGES):
        for j in range(repeats):
            rows += _block_layers(stage, j, expand, skip=j > 0)
    rows += [("top_conv", "Conv2D", "conv_head"), ("top_bn", "BatchNormalization", "bn2"),
             ("top_activation", "Activation", None)]
    return [KerasLayer(i, name, cls, module) for i, (name, cls, module) in enumerate(rows)]


WEIGHTED_KERAS_CLASSES = ("Conv2D", "DepthwiseConv2D", "BatchNormalization")


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

@dataclass
class CRBLConfig:
    """Everything needed to rebuild a CRBL model; stored in every checkpoint."""
    image_size: int = 128
    # Input normalisation applied inside the model to RGB floats in [0, 1]: (x - mean) / std.
    # The original CRBL feeds pixels/255 straight into qubvel backbones: mean 0, std 1.
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    normalization: str = "none"  # "none" | "imagenet" | "keras" (read from a Normalization layer)
    bilinear_eps: float = 1e-12  # sqrt(|phi| + eps) in the Keras Lambda
    l2_eps: float = 1e-12        # tf.nn.l2_normalize epsilon (on the squared norm)
    dropout: float = 0.5
    drop_path_rate: float = 0.2  # qubvel drop_connect_rate; only active in training
    bn_momentum: float = 0.01    # Keras BatchNormalization momentum 0.99
    backbones: tuple[str, str] = ("imagenet", "noisy-student")  # provenance tags of the backbones
    backbone_arch: str = "tf_efficientnet_b0"

    def __post_init__(self):
        self.mean = tuple(float(v) for v in self.mean)
        self.std = tuple(float(v) for v in self.std)
        self.backbones = tuple(self.backbones)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise CRBLError(f"config: mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> "CRBLConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CRBLError(f"checkpoint config has unknown fields {unknown}: it was written by a "
                            "newer version of CRBL-PyTorch; update this code")
        return cls(**d)


def normalization_preset(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """mean, std for the named input normalisation ('none' = original CRBL, 'imagenet')."""
    if name == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if name == "imagenet":
        return IMAGENET_MEAN, IMAGENET_STD
    raise CRBLError(f"unknown normalization {name!r}: use 'none' or 'imagenet'")


# --------------------------------------------------------------------------------------------
# Backbone
# --------------------------------------------------------------------------------------------

def find_local_weights(tag: str, weights_dir: str | os.PathLike | None) -> Path | None:
    roots = [weights_dir, os.environ.get(WEIGHTS_DIR_ENV)]
    for root in [Path(r) for r in roots if r]:
        for candidate in (root / f"{tag}.safetensors", root / f"{tag}.pth",
                          root / tag / "model.safetensors", root / tag / "pytorch_model.bin"):
            if candidate.is_file():
                return candidate
    return None


def read_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors or a torch file, never unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise CRBLError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CRBLError(f"{path}: not a loadable torch weights file ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CRBLError(f"{path}: expected a dict of tensors (a timm state dict)")
    return obj


# EfficientNet-B0 (tf_efficientnet_b0), written out here rather than built by timm 1.0: its
# parameter names, layer order and arithmetic (outputs and gradients bit-identical to timm's,
# tests/test_model.py), so timm state dicts, hub weights and every checkpoint load unchanged.
# Fewer modules than timm's (no BatchNormAct2d, DropPath or Identity placeholders), and random
# initialisation draws the same distributions in a different order (timm also builds throwaway
# SE layers). Why: timm imports torchvision (and with them sympy, torch._dynamo, ...), ~200 MB
# of resident memory before any model; a batch-1 CPU inference process peaked at ~790 MB with
# them and ~590 MB without.


def _same_padding(size, kernel: int, stride: int):
    """Total TensorFlow "SAME" padding along one axis. torch.jit.trace (ONNX export) hands sizes
    over as tensors: tensor math keeps the padding a function of the input size in the graph
    instead of a constant for the traced size."""
    if isinstance(size, torch.Tensor):
        return torch.clamp(((size / stride).ceil() - 1) * stride + kernel - size, min=0)
    return max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)


class Conv2dSame(nn.Conv2d):
    """TensorFlow "SAME" padding for odd kernels (all of B0's). Stride 1 pads k//2 on every
    side, as a plain Conv2d does; stride 2 pads the bottom/right one more than the top/left where
    the total is odd, sized from the input (timm Conv2dSame, Keras padding="same")."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        if kernel % 2 == 0:
            raise ValueError(f"Conv2dSame: odd kernels only, got {kernel}")
        super().__init__(in_chs, out_chs, kernel, stride, padding=kernel // 2 if stride == 1 else 0,
                         groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] == 1:
            return super().forward(x)
        height, width = x.size()[-2:]
        pad_h = _same_padding(height, self.kernel_size[0], self.stride[0])
        pad_w = _same_padding(width, self.kernel_size[1], self.stride[1])
        pads = (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2)
        x = _zero_border(x, *pads) if _eager_cpu_inference(x) else F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _eager_cpu_inference(x: torch.Tensor) -> bool:
    """A CPU tensor with autograd off and no graph capture: where the in-place and border-only
    shortcuts below apply (autograd needs the out-of-place ops, also where only a later layer
    trains; ONNX and compile their graphs)."""
    return x.device.type == "cpu" and not (torch.is_grad_enabled() or _capturing_graph())


def _zero_border(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """F.pad(x, (left, right, top, bottom)) writing each output element once: F.pad zero-fills
    the whole output, then copies x in. On 2 CPU cores its fill was 6-7% of a forward at 224 px
    batch 32 (a stride-2 block pads its widest tensor). Keeps x's memory format."""
    n, c, h, w = x.shape
    layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
              else torch.contiguous_format)
    out = torch.empty((n, c, top + h + bottom, left + w + right), dtype=x.dtype, device=x.device,
                      memory_format=layout)
    out[:, :, top:top + h, left:left + w] = x
    out[:, :, :top].zero_()
    out[:, :, top + h:].zero_()
    out[:, :, top:top + h, :left].zero_()
    out[:, :, top:top + h, left + w:].zero_()
    return out


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=B0_BN_EPS)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample (Keras drop_connect: Dropout with noise_shape (N,1,1,1))."""
    if p == 0.0 or not training:
        return x
    keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(1 - p)
    return x * (keep.div_(1 - p) if p < 1 else keep)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduced: int, groups: int = 1):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1, groups=groups)
        self.conv_expand = nn.Conv2d(reduced, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)), inplace=True)
        gate = torch.sigmoid(self.conv_expand(s))
        # the blocks hand SE an activation of their own that nothing reads afterwards
        return x.mul_(gate) if _eager_cpu_inference(x) else x * gate


class _Block(nn.Module):
    """The residual connection (with drop path) where a block keeps its shape.

    The blocks (and EfficientNetB0) take `twins`: 2 builds both CRBL backbones as one network,
    each layer with twice the channels in two groups (see _twin_backbones); 1 is the model."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path_rate: float):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path_rate = drop_path_rate

    def _residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return drop_path(y, self.drop_path_rate, self.training) + x if self.has_skip else y


class DepthwiseSeparableConv(_Block):
    """Stage 1 (expand ratio 1): depthwise conv, BN, SiLU, SE, pointwise conv, BN."""
    CONV_BN_PAIRS = (("conv_dw", "bn1"), ("conv_pw", "bn2"))

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, drop_path_rate: float,
                 twins: int = 1):
        super().__init__(in_chs, out_chs, stride, drop_path_rate)
        t = twins
        self.conv_dw = Conv2dSame(t * in_chs, t * in_chs, kernel, stride, groups=t * in_chs)
        self.bn1 = _bn(t * in_chs)
        self.se = SqueezeExcite(t * in_chs, t * (in_chs // 4), groups=t)
        self.conv_pw = nn.Conv2d(t * in_chs, t * out_chs, 1, bias=False, groups=t)
        self.bn2 = _bn(t * out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x)), inplace=True))))
        return self._residual(y, x)


class InvertedResidual(_Block):
    """MBConv: 1x1 expand, BN, SiLU, depthwise conv, BN, SiLU, SE, 1x1 project, BN (+ skip)."""
    CONV_BN_PAIRS = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expand: int,
                 drop_path_rate: float, twins: int = 1):
        super().__init__(in_chs, out_chs, stride, drop_path_rate)
        t, mid = twins, in_chs * expand
        self.conv_pw = nn.Conv2d(t * in_chs, t * mid, 1, bias=False, groups=t)
        self.bn1 = _bn(t * mid)
        self.conv_dw = Conv2dSame(t * mid, t * mid, kernel, stride, groups=t * mid)
        self.bn2 = _bn(t * mid)
        self.se = SqueezeExcite(t * mid, t * (in_chs // 4), groups=t)
        self.conv_pwl = nn.Conv2d(t * mid, t * out_chs, 1, bias=False, groups=t)
        self.bn3 = _bn(t * out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)), inplace=True)
        y = F.silu(self.bn2(self.conv_dw(y)), inplace=True)
        return self._residual(self.bn3(self.conv_pwl(self.se(y))), x)


class EfficientNetB0(nn.Module):
    """timm `tf_efficientnet_b0` without classifier: forward returns the top activation
    (N,1280,H/32,W/32), Keras `top_activation`. State dict keys are timm's (conv_stem, bn1,
    blocks.<stage>.<block>.*, conv_head, bn2)."""
    CONV_BN_PAIRS = (("conv_stem", "bn1"), ("conv_head", "bn2"))

    def __init__(self, drop_path_rate: float = 0.0, twins: int = 1):
        super().__init__()
        self.conv_stem = Conv2dSame(3, twins * B0_STEM, 3, 2)  # twins share the input image
        self.bn1 = _bn(twins * B0_STEM)
        total = sum(stage[4] for stage in B0_STAGES)
        in_chs, index, stages = B0_STEM, 0, []
        for expand, kernel, stride, out_chs, repeats in B0_STAGES:
            blocks = []
            for j in range(repeats):
                # timm/Keras: the rate grows linearly with the block's index over all 16 blocks
                rate, s = drop_path_rate * index / total, stride if j == 0 else 1
                blocks.append(
                    DepthwiseSeparableConv(in_chs, out_chs, kernel, s, rate, twins) if expand == 1
                    else InvertedResidual(in_chs, out_chs, kernel, s, expand, rate, twins))
                in_chs, index = out_chs, index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(twins * in_chs, twins * NUM_FEATURES, 1, bias=False, groups=twins)
        self.bn2 = _bn(twins * NUM_FEATURES)
        if not self.conv_stem.weight.is_meta:  # meta: weights come from a checkpoint (and
            self._init_weights()               # normal_ on meta imports ~900 modules, +115 MB)

    def _init_weights(self) -> None:
        """TensorFlow's initialisers, as timm's _init_weight_goog."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0, math.sqrt(2.0 / (fan_out // module.groups)))
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autograd, the leading parts that train nothing (the frozen layers of a fine-tune)
        # run without it: no graph would be recorded there anyway, the values and random draws
        # are the same, and the in-place and border-only shortcuts of inference apply.
        frozen = self._leading_frozen_parts(x)
        parts = [run for run, _ in self._parts()]
        with torch.no_grad():
            for part in parts[:frozen]:
                x = part(x)
        for part in parts[frozen:]:
            x = part(x)
        return x

    def _parts(self) -> tuple:
        """forward in order, as (callable, the modules whose parameters it uses): the stem, the 7
        stages, the head."""
        return ((self._stem, (self.conv_stem, self.bn1)),
                *((stage, (stage,)) for stage in self.blocks),
                (self._head, (self.conv_head, self.bn2)))

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn1(self.conv_stem(x)), inplace=True)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.bn2(self.conv_head(x)), inplace=True)

    def _leading_frozen_parts(self, x: torch.Tensor) -> int:
        """How many of forward's parts (stem, the 7 stages, head), from the input on, hold no
        parameter that requires a gradient; 0 without autograd, for an input that needs its
        gradient (saliency maps), and while a graph is captured (tracing, compiling, ONNX)."""
        if not torch.is_grad_enabled() or x.requires_grad or _capturing_graph():
            return 0
        parts = self._parts()
        for count, (_, modules) in enumerate(parts):
            if any(p.requires_grad for module in modules for p in module.parameters()):
                return count
        return len(parts)


class EfficientNetB0FeatureExtractor(nn.Module):
    """EfficientNetB0 (timm `tf_efficientnet_b0` layout: TF-SAME padding, BN eps 1e-3) in
    `self.body`, returning the top activation.

    Equals the Keras `top_activation` output (N,H,W,1280) of qubvel's and keras.applications'
    EfficientNetB0, as (N,1280,H,W). timm is imported only to download pretrained weights.
    """

    def __init__(self, weights: str | None = None, drop_path_rate: float = 0.0,
                 bn_momentum: float = 0.01, arch: str = "tf_efficientnet_b0",
                 weights_dir: str | os.PathLike | None = None):
        super().__init__()
        if arch != "tf_efficientnet_b0":
            raise CRBLError(f"backbone architecture {arch!r} is not supported: CRBL uses "
                            "'tf_efficientnet_b0'")
        self.body = EfficientNetB0(drop_path_rate)
        for m in self.body.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = bn_momentum
        if weights not in (None, "none"):
            self.load_pretrained(weights, weights_dir)

    def load_pretrained(self, weights: str, weights_dir=None) -> None:
        """Load 'imagenet' / 'noisy-student' (hub online, local file offline) or a file path."""
        if weights in PRETRAINED_TAGS:
            tag = PRETRAINED_TAGS[weights]
            local = find_local_weights(tag, weights_dir)
            state = read_state_dict_file(local) if local else self._download(tag, weights)
        else:
            state = read_state_dict_file(weights)
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
        own = self.body.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise CRBLError(f"backbone weights {weights!r} do not fit tf_efficientnet_b0: "
                            f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shape {wrong[:3]}")
        self.body.load_state_dict(state, strict=True)

    @staticmethod
    def _download(tag: str, kind: str) -> dict[str, torch.Tensor]:
        import timm
        try:
            model = timm.create_model(tag, pretrained=True, num_classes=0, global_pool="")
        except Exception as exc:  # no network, no hub cache, hub errors: all mean "get the file"
            hub_id = f"timm/{tag}"
            raise CRBLError(
                f"cannot load {kind} backbone weights ({hub_id}): {type(exc).__name__}. Offline? "
                f"download https://huggingface.co/{hub_id}/resolve/main/model.safetensors and save it "
                f"as <dir>/{tag}.safetensors, then pass --weights-dir <dir> or set {WEIGHTS_DIR_ENV}"
            ) from None
        return model.state_dict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


# --------------------------------------------------------------------------------------------
# Bilinear pooling
# --------------------------------------------------------------------------------------------

def _chunk(total: int, per_item: int, device: torch.device) -> int:
    """Items per chunk. CPU: about 2 MB of floats, math that stays in cache. GPU: about 128 MB,
    few large kernels (2 MB chunks meant ~2,500 tiny launches per batch of 128 and a bilinear
    head 4x slower than the two backbones on an H200).

    Buffers are allocated once per call and reused: on CPU every fresh large tensor costs page
    faults (a 32×1280² float tensor ~150 ms to touch), more than the arithmetic itself.
    """
    budget = 1 << 19 if device.type == "cpu" else 1 << 25
    return max(1, min(total, budget // max(1, per_item)))


def _signed_sqrt_(chunk: torch.Tensor, sign: torch.Tensor, eps: float) -> torch.Tensor:
    """chunk := sign(chunk)·sqrt(|chunk| + eps) in place; returns Σ(|chunk| + eps) per row (= Σy²)."""
    torch.sign(chunk, out=sign)
    chunk.abs_().add_(eps)
    sq_norm = chunk.sum(dim=tuple(range(1, chunk.dim())))
    chunk.sqrt_().mul_(sign)
    return sq_norm


def _chunk_terms(phi: torch.Tensor, w: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·sign(phi)·sqrt(|phi|+eps), Σ(|phi|+eps)) per sample of a (N, rows, C) chunk, in plain
    ops: torch.compile fuses them into one pass over phi (eager would build 3 temporaries)."""
    magnitude = phi.abs() + eps
    dot = (torch.sign(phi) * torch.sqrt(magnitude) * w).sum((1, 2))
    return dot, magnitude.sum((1, 2))


def _by_position(features: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) maps as (N, H·W, C), C-contiguous: a view of channels_last maps, else a copy."""
    n, c, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(n, h * w, c).contiguous()


def _opted_out(env: str) -> bool:
    """Whether an on-by-default CPU speed setting (CRBL_FUSED_HEAD, CRBL_KEEP_FREED_MEMORY) is
    turned off with ENV=0."""
    return os.environ.get(env, "1") == "0"


def _capturing_graph() -> bool:
    """torch.jit tracing, or dynamo/torch.compile/export: the eager-only CPU paths (a second
    thread, numpy views for numba) must stay out of a captured graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _bilinear_terms(a, b, w, scale, eps, dot, sq, r_lo, r_hi):
    """dot[s] = Σ w·sign(phi)·sqrt(|phi|+eps) and sq[s] = Σ(|phi|+eps) over rows [r_lo, r_hi) of
    phi = scale·Aᵀ·B per sample, A = a[s] and B = b[s] of float32 (N, H·W, C) features
    (channels_last maps are this layout already), w the (C, C) head weight; phi itself is never
    stored.

    Numba compiles it (fused_head_kernel): four rows of phi at a time, built in a buffer that
    stays in the L1 cache from four positions per pass (each load of B serves 16 products),
    then summed in the same pass that reads them. On one core of a 2-core CPU it took 0.50 ms
    per image at 128 px (1.05 at 224 px) where torch's batched matrix product into 2 MB chunks
    plus a one-pass kernel over them took 0.60 (1.40) on two. Rows are summed in float32, like
    the eager head's chunk sums; rows add up in float64 (dot, sq)."""
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


FUSED_HEAD_ENV = "CRBL_FUSED_HEAD"
# Where the fused kernel pays, as measured: up to 2 torch threads (it runs on at most two). On a
# 16-core machine torch's own element-wise ops caught up with the older one-pass kernel (the
# matrix product still torch's) at 4 threads and were faster from 8.
FUSED_HEAD_MAX_THREADS = 2
_fused_head: Any = None  # numba's compiled _bilinear_terms once built; False: not available


def fused_head_kernel():
    """The CPU inference head's fused kernel (`_bilinear_terms` compiled by numba), or None where
    numba is not installed, cannot load or compile (a warning says why) or CRBL_FUSED_HEAD=0.

    Measured on 2 CPU cores (one process, alternating): 0.50 ms per image at 128 px batch 32
    against 0.60 for torch's matrix product plus the older one-pass kernel, 0.55 against 1.5 at
    batch 1 (where torch's eager ops ran), 1.05 against 1.4 at 224 px batch 32. Compiled once
    per machine (~1 s) and cached beside this file or in the user's cache folder (compiled per
    process where neither is writable). Loading numba and LLVM costs a process ~100 MB of
    resident memory. A thread that asks while another compiles gets None (torch ops).
    """
    global _fused_head
    if _opted_out(FUSED_HEAD_ENV):
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


FUSED_HEAD_ROWS = 128  # phi rows per call of the kernel: the share a thread takes at a time


def _fused_terms(kernel, a: np.ndarray, b: np.ndarray, w: np.ndarray, scale: float, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ w·y, Σy²) per sample from the fused kernel, on this thread and, with 2 torch threads,
    on the second one too: each takes the next FUSED_HEAD_ROWS rows until none are left.

    Taking shares as they go, not halves: for ~8-10 ms after the backbones' last parallel op,
    torch's OpenMP worker still spins on one of the two cores, so the threads run at unequal
    speed (on 2 cores with that spinner 0.41-0.51 ms per image at 128 px against 0.52-0.82 on
    one thread, 0.8 against 1.2-1.4 at 224 px). Each share's sums have their own slot, added in
    row order: the logits do not depend on which thread ran what."""
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

    helper = _second_thread().submit(work) if torch.get_num_threads() > 1 and shares > 1 else None
    try:
        work()
    finally:
        if helper is not None and not helper.cancel():  # not started (busy elsewhere): all done here
            helper.result()
    dot, sq_norm = parts.sum(axis=0)
    return torch.from_numpy(dot), torch.from_numpy(sq_norm)


def _fused_head_failed(step: str, exc: Exception) -> None:
    warnings.warn(f"fused CPU head unavailable, the eager one runs instead: {step} failed "
                  f"({type(exc).__name__}: {exc}); set {FUSED_HEAD_ENV}=0 to skip it",
                  RuntimeWarning, stacklevel=3)


class _SignedSqrtL2Normalize(torch.autograd.Function):
    """z = l2_normalize(sign(phi) * sqrt(|phi| + eps)) per sample, computed in place on phi
    (N, ...), flattened per sample inside.

    Saves only z and the norm: autograd's version keeps phi, |phi|, sqrt, sign, y and y² alive
    (six N×1280² tensors, ~1.3 GB at batch 32) where this keeps one. phi must be a tensor of its
    own, not a view (a reshape): in place on a view, autograd copies the whole gradient through
    CopySlices (0.7 s per batch of 32 on 2 CPU cores).
    """

    @staticmethod
    def forward(ctx, phi_nd: torch.Tensor, eps: float, l2_eps: float) -> torch.Tensor:
        phi = phi_nd.view(len(phi_nd), -1)
        n, d = phi.shape
        step = _chunk(n, d, phi.device)
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
        step = _chunk(n, d, z.device)
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
    bool: converting bool to float is ~10x slower on CPU. For p = 0.5 on CPU: 8 random bits per
    random byte (torch's dropout of a 32×1280² batch takes ~1.1 s on 2 CPU cores, this ~0.1 s)."""
    if p == 0.5 and device.type == "cpu":
        random_bytes = torch.randint(0, 256, (n, (d + 7) // 8), dtype=torch.uint8)
        bits = torch.arange(8, dtype=torch.uint8)
        return (random_bytes[:, :, None] >> bits).bitwise_and_(1).view(n, -1)[:, :d]
    return (torch.rand(n, d, device=device) >= p).to(torch.uint8)


class _DropoutLinear1(torch.autograd.Function):
    """Linear(D -> 1)(Dropout(p)(z)) for training. nn.Dropout + nn.Linear keep a dropped-out
    float copy of z for Linear's backward (210 MB at batch 32); this keeps only the uint8 mask
    (52 MB) and uses element-wise/gemv math where Linear's backward runs a k=1 matrix product."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, p: float
                ) -> torch.Tensor:
        n, d = z.shape
        keep = _keep_mask(n, d, p, z.device)
        scale = 1.0 / (1.0 - p)
        w = weight.reshape(-1)
        logits = z.new_empty(n)
        step = _chunk(n, d, z.device)
        buf = z.new_empty(step, d)
        for i in range(0, n, step):
            k = min(step, n - i)
            logits[i:i + k] = buf[:k].copy_(keep[i:i + k]).mul_(z[i:i + k]) @ w
        ctx.save_for_backward(z, weight, keep)
        ctx.scale, ctx.bias_shape = scale, bias.shape
        return (logits * scale)[:, None] + bias

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        z, weight, keep = ctx.saved_tensors
        n, d = z.shape
        g = grad.reshape(n) * ctx.scale
        w = weight.reshape(-1)
        grad_z = torch.empty_like(z) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        step = _chunk(n, d, z.device)
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


class BilinearPooling(nn.Module):
    """The Keras Lambda of the original CRBL, batch-safe, per sample:

    phi = Aᵀ·B / (H·W) with A, B reshaped to (H·W, C); flattened row-major (index i·C + j, i over
    backbone-1 channels); y = sign(phi)·sqrt(|phi| + eps); z = y / sqrt(max(Σy², l2_eps)).
    """

    def __init__(self, eps: float = 1e-12, l2_eps: float = 1e-12):
        super().__init__()
        self.eps, self.l2_eps = eps, l2_eps
        self.compiled_terms = None  # torch.compile(_chunk_terms), set by compile_for_inference

    @staticmethod
    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """phi as (N, C, C): a tensor of its own, which the normalisation works on in place."""
        n, c, h, w = a.shape
        # (N,C,HW) @ (N,HW,C): one matmul per sample, never mixing samples across the batch.
        phi = torch.bmm(a.reshape(n, c, h * w), b.reshape(n, b.shape[1], h * w).transpose(1, 2))
        return phi.div_(h * w)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        z = _SignedSqrtL2Normalize.apply(self.outer(a, b), self.eps, self.l2_eps)
        return z.reshape(len(z), -1)

    @torch.no_grad()
    def linear(self, a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
        """`Linear(forward(a, b))` without building z or phi: the fused CPU kernel where it
        applies (_fused_terms), else chunks of phi rows that stay in cache (_chunked_terms).

        logit = (Σ w·sign(phi)·sqrt(|phi|+eps)) / sqrt(max(Σ(|phi|+eps), l2_eps)) + bias.
        Inference only (no autograd); equals the unfused path to float32 rounding.
        """
        n, c, h, w = a.shape
        w_mat = weight.reshape(c, b.shape[1])
        kernel = self._fused_kernel(a, b, w_mat)
        if kernel is not None:
            dot, sq_norm = _fused_terms(kernel, _by_position(a).numpy(), _by_position(b).numpy(),
                                        w_mat.detach().contiguous().numpy(), 1 / (h * w), self.eps)
        else:
            dot, sq_norm = self._chunked_terms(a, b, w_mat)
        logits = dot / sq_norm.clamp_min(self.l2_eps).sqrt()
        return logits.to(a.dtype)[:, None] + bias

    def _chunked_terms(self, a: torch.Tensor, b: torch.Tensor, w_mat: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ w·y, Σy²) per sample in torch ops: phi rows in chunks that stay in cache (GPU, no
        numba, --compile's fused chunk math)."""
        n, c, h, w = a.shape
        a = a.reshape(n, c, h * w)
        # 1/(H·W) folded into the small B matrix: one pass less over the N×C² products.
        bt = b.reshape(n, b.shape[1], h * w).transpose(1, 2).div(h * w).contiguous()
        c2 = bt.shape[2]
        dot, sq_norm = a.new_zeros(n), a.new_zeros(n)
        rows = _chunk(c, n * c2, a.device)
        buf = a.new_empty(n, rows, c2)
        sign = a.new_empty(n, rows, c2) if self.compiled_terms is None else None
        for r in range(0, c, rows):
            k = min(rows, c - r)
            phi = buf if k == rows else buf[:, :k].contiguous()
            # a contiguous copy of the row slice: MKL's batched GEMM is ~5x slower on the strided view
            torch.bmm(a[:, r:r + k].contiguous(), bt, out=phi)
            if self.compiled_terms is not None:
                chunk_dot, chunk_sq = self.compiled_terms(phi, w_mat[None, r:r + k], self.eps)
                dot += chunk_dot
                sq_norm += chunk_sq
                continue
            sq_norm += _signed_sqrt_(phi, sign if k == rows else sign[:, :k].contiguous(), self.eps)
            dot += phi.reshape(n, -1) @ w_mat[r:r + k].reshape(-1)  # BLAS gemv: no product tensor
        return dot, sq_norm

    def _fused_kernel(self, a: torch.Tensor, b: torch.Tensor, w_mat: torch.Tensor):
        """fused_head_kernel() where it applies and pays: float32 plain tensors on the CPU, at most
        FUSED_HEAD_MAX_THREADS threads; not torch.compile'd (its own fused chunk math wins
        there), not while tracing or exporting."""
        if (a.device.type != "cpu" or not a.dtype == b.dtype == w_mat.dtype == torch.float32
                or type(a) is not torch.Tensor  # FakeTensor, functorch wrappers: no .numpy()
                or torch.get_num_threads() > FUSED_HEAD_MAX_THREADS
                or self.compiled_terms is not None or _capturing_graph()):
            return None
        return fused_head_kernel()


# --------------------------------------------------------------------------------------------
# CRBL model
# --------------------------------------------------------------------------------------------

class CRBLModel(nn.Module):
    """Two EfficientNetB0 extractors + bilinear pooling + Dropout + Linear(1280², 1).

    `forward` takes RGB floats in [0, 1] (N,3,H,W) and returns logits (N,1);
    `predict_proba` returns sigmoid probabilities.
    """

    def __init__(self, config: CRBLConfig | None = None, pretrained: bool = False,
                 weights_dir: str | os.PathLike | None = None):
        super().__init__()
        self.config = config = config or CRBLConfig()
        self.register_buffer("input_mean", torch.tensor(config.mean).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(config.std).view(1, 3, 1, 1))
        self.backbone1, self.backbone2 = (
            EfficientNetB0FeatureExtractor(
                weights=tag if pretrained else None, drop_path_rate=config.drop_path_rate,
                bn_momentum=config.bn_momentum, arch=config.backbone_arch, weights_dir=weights_dir)
            for tag in config.backbones)
        self.pool = BilinearPooling(config.bilinear_eps, config.l2_eps)
        self.dropout = nn.Dropout(config.dropout)
        self.head = nn.Linear(NUM_FEATURES * NUM_FEATURES, 1)
        self.channels_last = False
        self.batchnorm_folded = False
        self.parallel_backbones = True  # twin or side by side (see features); off when compiled
        self.__dict__["_twin"] = None  # not a submodule: no state dict entries (_twin_backbones)
        self.meta: dict[str, Any] = {}

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = (x - self.input_mean) / self.input_std
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if (self.parallel_backbones and not self.training and not torch.is_grad_enabled()
                and x.device.type == "cpu" and not _capturing_graph()):
            if (self._twin is not None and len(x) * x.shape[-2] * x.shape[-1] <= TWIN_MAX_PIXELS
                    and self._twin_is_current()):
                y = self._twin(x)
                return y[:, :NUM_FEATURES], y[:, NUM_FEATURES:]
            if len(x) <= PARALLEL_BACKBONES_MAX_BATCH and torch.get_num_threads() > 1:
                return _both_backbones_at_once(self.backbone1, self.backbone2, x)
        return self.backbone1(x), self.backbone2(x)

    def _twin_is_current(self) -> bool:
        """Whether the backbones still hold the modules and parameters the twin was joined from,
        each parameter still its view (~0.3 ms on 2 cores). Not after a backbone, a layer or a
        parameter was replaced or converted on its own: the backbones then run themselves (a
        forward never rebuilds the twin: threads may share a model)."""
        if self._twin is None:
            return False
        modules, params = self.__dict__["_twin_sources"]
        return (all(parent._modules.get(name) is child for parent, name, child in modules)
                and all(module._parameters.get(name) is p and p.data_ptr() - t.data_ptr() == at
                        for module, name, p, t, at in params))

    def _rebuild_twin(self) -> None:
        """Join the folded backbones into the twin again, over their current tensors. Only on
        the CPU, the one place it runs: on CUDA and DirectML they keep tensors of their own."""
        on_cpu = self.backbone1.body.conv_stem.weight.device.type == "cpu"
        twin = (_twin_backbones(self.backbone1.body, self.backbone2.body)
                if self.batchnorm_folded and on_cpu else None)
        self.__dict__["_twin"] = twin
        if twin is not None:
            self.__dict__["_twin_sources"] = self._twin_links(twin)

    def _twin_links(self, twin: EfficientNetB0) -> tuple[list, list]:
        """What _twin_is_current checks: every (parent, name, submodule) from this model down
        through both backbones, and every (module, name, parameter, twin tensor, offset)."""
        modules, params = [], []
        for backbone in (self.backbone1, self.backbone2):
            modules += [(self, n, c) for n, c in self._modules.items() if c is backbone]
            modules.append((backbone, "body", backbone.body))
            for prefix, parent in backbone.body.named_modules():
                modules += [(parent, n, c) for n, c in parent._modules.items()]
                for name, p in parent._parameters.items():
                    if p is not None:
                        t = twin.get_parameter(f"{prefix}.{name}" if prefix else name)
                        params.append((parent, name, p, t, p.data_ptr() - t.data_ptr()))
        return modules, params

    def _apply(self, fn, recurse=True):
        """.to(), .float(), a memory format: new tensors, so a new twin (not when the tensors
        stayed, as with .to() to where they are or share_memory())."""
        super()._apply(fn, recurse)
        if self.batchnorm_folded and not self._twin_is_current():
            self._rebuild_twin()
        return self

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_twin"] = None  # a deepcopy or an unpickled model joins its own tensors
        state.pop("_twin_sources", None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("_twin", None)  # a model pickled before the twin existed
        if self.__dict__.get("batchnorm_folded"):
            self._rebuild_twin()

    def set_channels_last(self, enabled: bool = True) -> "CRBLModel":
        """NHWC convolutions: ~1.3-1.5x faster backbones on CPU and CUDA. Not on DirectML,
        whose convolutions expect NCHW (it falls back to slow copies)."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.features(x)
        # Bilinear pooling sums 1280² products per image: float16 overflows, so the head always
        # runs in float32, also under --amp autocast or with half-precision backbones (--fp16).
        if a.is_cuda:
            with torch.autocast("cuda", enabled=False):
                return self._logits(a.float(), b.float())
        return self._logits(a.float(), b.float())

    def _logits(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if not self.training and not torch.is_grad_enabled():
            return self.pool.linear(a, b, self.head.weight, self.head.bias)
        z = self.pool(a, b)
        if self.dropout.training and 0 < self.dropout.p < 1:
            return _DropoutLinear1.apply(z, self.head.weight, self.head.bias, self.dropout.p)
        return self.head(self.dropout(z))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def train(self, mode: bool = True) -> "CRBLModel":
        if mode and self.batchnorm_folded:
            raise CRBLError("this model's BatchNorm layers were folded into its convolutions for "
                            "inference; load the checkpoint again to train it")
        super().train(mode)
        # Keras runs a BatchNormalization with trainable=False in inference mode even inside
        # fit(): frozen BN must use (and keep) its moving statistics.
        for m in frozen_batchnorms(self):
            m.eval()
        return self


# Small CPU batches: the two backbones side by side, one core each (below).
PARALLEL_BACKBONES_MAX_BATCH = 4
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


def _second_thread() -> ThreadPoolExecutor:
    return thread_pool("crbl-backbone2", 1, initializer=torch.set_num_threads, initargs=(1,))


def _both_backbones_at_once(backbone1: nn.Module, backbone2: nn.Module, x: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inference on a small CPU batch: backbone 2 on a second thread while this one runs
    backbone 1, each single-threaded; the head then gets every thread back.

    At batch 1 an EfficientNet-B0 is ~300 small operations that two threads split poorly. On 2
    cores one backbone per core made the whole forward 1.06-1.2x faster at batch 1-4 (128 and
    224 px) and no faster at batch 8, where holding both backbones' activations at once also
    raised peak memory (+90 MB at 224 px). Same results up to float32 rounding (sums whose
    order depends on the thread count).
    """
    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()

    def second() -> torch.Tensor:  # grad and inference mode are per thread
        with torch.inference_mode(inference), torch.no_grad():
            return backbone2(x)

    torch.set_num_threads(1)
    try:
        pending = _second_thread().submit(second)
        try:
            a = backbone1(x)
        finally:
            b = pending.result()  # never leave it running with our thread count changed
    finally:
        torch.set_num_threads(threads)
    return a, b


def _cpu_f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().double()  # on the CPU: DirectML has no float64


def _conv_bn_pairs(model: nn.Module) -> Iterable[tuple[nn.Module, str, str]]:
    """(module, convolution name, BatchNorm name) for every convolution that feeds a BatchNorm,
    from the blocks' CONV_BN_PAIRS."""
    return ((m, conv, bn) for m in model.modules() for conv, bn in getattr(m, "CONV_BN_PAIRS", ()))


@torch.no_grad()
def fold_batchnorm(model: CRBLModel) -> int:
    """Inference only: fold every eval-mode BatchNorm into the convolution before it, in place
    (w' = w·γ/√(var+eps), b' = β − mean·γ/√(var+eps), in float64), leaving its activation.

    98 fewer passes over the activations per image: on 2 CPU cores 7% faster at batch 1 and
    ~22% at batch 8-32, logits equal to ~1e-9. Returns the number of BatchNorms folded. The
    model can no longer be trained or saved (load the checkpoint again for that).
    """
    if model.training:
        raise CRBLError("fold_batchnorm is for inference: call model.eval() first")
    folded = 0
    for module, conv_name, bn_name in _conv_bn_pairs(model):
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
    if isinstance(model, CRBLModel):
        model._rebuild_twin()
    return folded


# Small CPU batches of a folded model: both backbones as one network (below), up to this many
# pixels per channel in a batch (8 images at 128 px).
TWIN_MAX_PIXELS = 8 * 128 * 128


@torch.no_grad()
def _twin_backbones(body1: EfficientNetB0, body2: EfficientNetB0) -> EfficientNetB0 | None:
    """Both folded backbones as one EfficientNetB0 of twice the channels: every convolution
    grouped in two (the depthwise ones per channel anyway), the stem reading the shared image,
    channels [0, 1280) of the output backbone 1's and the rest backbone 2's.

    Half the operations, each twice as large: on 2 CPU cores at 128 px 0.79x the time of the
    two backbones side by side at batch 1, ~0.9x at batch 2-8; no gain from ~400k pixels per
    channel (224 px batch 8, 128 px batch 32) on, hence TWIN_MAX_PIXELS. Equal to the separate
    backbones up to float32 rounding (a grouped convolution sums in another order).
    The backbones' own tensors become views of the twin's: one copy of the weights in memory,
    and an in-place change to either is seen by both. None unless both are fully folded.
    """
    def folded(body: EfficientNetB0) -> bool:
        return all(isinstance(getattr(m, bn), nn.Identity) and getattr(m, conv).bias is not None
                   for m, conv, bn in _conv_bn_pairs(body))

    if not (folded(body1) and folded(body2)):
        return None
    with torch.device("meta"):
        twin = EfficientNetB0(twins=2)
        for module, conv_name, bn_name in _conv_bn_pairs(twin):  # folded, as the backbones
            conv = getattr(module, conv_name)
            conv.bias = nn.Parameter(torch.empty(conv.out_channels))
            setattr(module, bn_name, nn.Identity())
    own1, own2 = body1.state_dict(keep_vars=True), body2.state_dict(keep_vars=True)
    state = {k: torch.cat([v, own2[k]]) for k, v in own1.items()}  # keeps channels_last
    twin.load_state_dict(state, strict=True, assign=True)
    twin.requires_grad_(False).eval()
    for key, tensor in state.items():
        half = len(own1[key])
        own1[key].data, own2[key].data = tensor[:half], tensor[half:]
    return twin


def frozen_batchnorms(model: nn.Module) -> Iterable[nn.BatchNorm2d]:
    return (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)
            and m.weight is not None and not m.weight.requires_grad)


def freeze_backbones(model: CRBLModel, model_type: str = "crop",
                     trainable_from: int | None = None) -> dict[str, int]:
    """Reproduce the Keras freezing: backbone layers with Keras index < trainable_from are frozen.

    model_type 'crop' = trainable_from 150 (from block5c_se_expand, timm blocks.4.2.se.conv_expand);
    'full' = whole backbones frozen (only the head trains). The head always trains.
    Returns counts of trainable / frozen parameters.
    """
    if model_type not in MODEL_TYPE_THRESHOLDS:
        raise CRBLError(f"unknown model type {model_type!r}: use 'crop' or 'full'")
    table = keras_layer_table()
    if trainable_from is None:
        trainable_from = CROP_TRAINABLE_FROM if model_type == "crop" else len(table)
    if trainable_from < 0:
        raise CRBLError(f"--trainable-from must be >= 0, got {trainable_from}")
    for backbone in (model.backbone1, model.backbone2):
        backbone.requires_grad_(False)
        for layer in table:
            if layer.timm_module and layer.index >= trainable_from:
                backbone.body.get_submodule(layer.timm_module).requires_grad_(True)
    model.head.requires_grad_(True)
    model.train(model.training)  # re-apply eval mode to the now-frozen BatchNorms
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return {"trainable_from": trainable_from, "trainable": trainable, "frozen": frozen}


# --------------------------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------------------------

@dataclass
class DeviceInfo:
    device: torch.device
    kind: str   # "dml" | "cuda" | "rocm" | "cpu"
    name: str
    notes: list[str] = field(default_factory=list)  # why preferred devices were skipped

    def __str__(self) -> str:
        return f"{self.kind} ({self.device}): {self.name}"


def _smoke_test(device: torch.device) -> None:
    # A real op round trip: an installed-but-broken backend fails here, not mid-training.
    x = torch.arange(4, dtype=torch.float32, device=device)
    if float((x * 2).sum().cpu()) != 12.0:
        raise RuntimeError("wrong result from a test op")


def _split_index(preference: str) -> tuple[str, int]:
    kind, _, index = preference.partition(":")
    if index and not index.isdigit():
        raise CRBLError(f"bad device {preference!r}: use auto, dml, dml:N, cuda, cuda:N, rocm or cpu")
    return kind, int(index or 0)


def _directml(index: int) -> DeviceInfo:
    try:
        import torch_directml
    except Exception as exc:  # ImportError, OSError (DX12 DLLs), RuntimeError (torch mismatch)
        raise RuntimeError(f"torch_directml unavailable ({type(exc).__name__}: {exc})") from None
    count = torch_directml.device_count()
    if index >= count:
        raise RuntimeError(f"DirectML device {index} requested, {count} available")
    device = torch_directml.device(index)
    _smoke_test(device)
    return DeviceInfo(torch.device(device), "dml", torch_directml.device_name(index))


def _cuda(index: int) -> DeviceInfo:
    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False (CPU-only torch or no driver)")
    if index >= torch.cuda.device_count():
        raise RuntimeError(f"GPU {index} requested, {torch.cuda.device_count()} available")
    device = torch.device("cuda", index)
    _smoke_test(device)
    # Float32 means float32: TF32 convolutions (torch's default on Ampere and later) move a
    # probability by more than the 1e-4 parity bound; --amp/--fp16 are the opt-in speed modes.
    # CRBL's input size is fixed, so cuDNN may time its algorithms once and keep the fastest.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    kind = "rocm" if getattr(torch.version, "hip", None) else "cuda"
    return DeviceInfo(device, kind, torch.cuda.get_device_name(index))


KEEP_FREED_MEMORY_ENV = "CRBL_KEEP_FREED_MEMORY"
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc <malloc.h> mallopt parameters


def keep_freed_memory() -> bool:
    """Linux/glibc: keep freed memory in the process instead of handing it back to the kernel.

    glibc serves large blocks (above a threshold floating between 128 KB and 32 MB) with a fresh
    mmap() and trims the heap on free(), so every batch's activations land on new pages that the
    kernel must zero and fault in, 4 KB at a time (1.7 GB of faults per forward at 224 px batch 32;
    costly, above all in a VM). With mmap off and no trimming, a batch reuses the last one's pages.
    Measured on 2 cores: forward at 224 px batch 32 1.9-2.1 -> 1.0-1.2 s, training step at 128 px
    batch 32 2.6-3.0 -> 1.7-2.0 s; batch 1 is unchanged (nothing faults there). The cost: the
    process keeps its peak heap until it exits, as GPU caching allocators do.
    CRBL_KEEP_FREED_MEMORY=0 opts out; a preloaded jemalloc or tcmalloc simply ignores it.
    Returns whether the settings took.
    """
    if _opted_out(KEEP_FREED_MEMORY_ENV) or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # no mallopt: not glibc
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))


def _cpu(index: int = 0) -> DeviceInfo:
    import platform
    keep_freed_memory()
    return DeviceInfo(torch.device("cpu"), "cpu", platform.processor() or platform.machine())


_BACKENDS = {"dml": _directml, "directml": _directml, "cuda": _cuda, "rocm": _cuda, "cpu": _cpu}


def get_device(preference: str = "auto", auto_order: tuple[str, ...] = ("dml", "cuda", "cpu")
               ) -> DeviceInfo:
    """Pick the compute device: 'auto' tries auto_order (DirectML > CUDA/ROCm > CPU).

    An explicit 'dml[:N]', 'cuda[:N]', 'rocm[:N]' that is not usable is a CRBLError, never a
    silent CPU run.
    """
    kind, index = _split_index(preference.strip().lower())
    if kind != "auto":
        if kind not in _BACKENDS:
            raise CRBLError(f"unknown device {preference!r}: use auto, dml, dml:N, cuda, cuda:N, rocm or cpu")
        try:
            return _BACKENDS[kind](index)
        except RuntimeError as exc:
            raise CRBLError(f"device {preference!r} is not usable: {exc}. Use --device auto or cpu, "
                            "or run setup_amd_gpu_directml.py --check") from None
    notes = []
    for candidate in auto_order:
        try:
            info = _BACKENDS[candidate](0)
        except Exception as exc:
            notes.append(f"{candidate}: {exc}")
            continue
        info.notes = notes
        return info
    raise CRBLError(f"no usable device among {auto_order}: {'; '.join(notes)}")


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

def atomic_write(path: str | os.PathLike, write) -> None:
    """Call write(file) on a temp file beside path, fsync, then os.replace: never a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(path: str | os.PathLike, model: CRBLModel, *, threshold: float | None = None,
                    threshold_source: str | None = None, model_type: str | None = None,
                    provenance: dict | None = None, **extra: Any) -> None:
    """Write a self-describing checkpoint: any script rebuilds the model from it alone.

    Tensors are moved to CPU first (DirectML tensors cannot be loaded back directly).
    `extra` holds training state (optimizer, scheduler, epoch, ...), all weights_only-safe.
    """
    if getattr(model, "batchnorm_folded", False):
        raise CRBLError(f"cannot save {path}: this model's BatchNorm layers were folded for "
                        "inference; save the model as loaded or trained instead")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "arch": ARCH,
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()},
        "threshold": None if threshold is None else float(threshold),
        "threshold_source": threshold_source,
        "model_type": model_type,
        "provenance": provenance or {},
        **extra,
    }
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and validate a CRBL checkpoint safely (weights_only, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise CRBLError(f"{path}: checkpoint not found")
    with open(path, "rb") as f:
        if f.read(8) == b"\x89HDF\r\n\x1a\n":
            raise CRBLError(f"{path}: a Keras HDF5 weights file, not a PyTorch checkpoint; convert "
                            f"it first: python convert_h5_to_pth.py {path} model.pth")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message also says how to bypass the check; only the offending global is useful.
        text = str(exc)
        offending = text.split("GLOBAL ", 1)[1].split()[0] if "GLOBAL " in text else None
        if offending is None:  # not a pickle payload: random bytes, a raw pickle, another format
            raise CRBLError(f"{path}: not a PyTorch checkpoint (unreadable data); is it truncated "
                            "or some other file? Use a .pth from training or convert_h5_to_pth.py") from None
        raise CRBLError(f"{path}: refused: loading it would call {offending} (a pickle payload, "
                        "possibly malicious); it was not unpickled. Use a checkpoint from training "
                        "or convert_h5_to_pth.py") from None
    except Exception as exc:
        raise CRBLError(f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}); "
                        "is it truncated, or a Keras .h5? Convert .h5 files with convert_h5_to_pth.py") from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CRBLError(f"{path}: not a CRBL checkpoint (no format={CHECKPOINT_FORMAT!r}); "
                        "make one with convert_h5_to_pth.py or train_CRBL_pytorch_directml.py")
    if payload.get("format_version", 0) > CHECKPOINT_VERSION:
        raise CRBLError(f"{path}: checkpoint format {payload['format_version']} is newer than this "
                        f"code ({CHECKPOINT_VERSION}); update CRBL-PyTorch")
    for key in ("config", "state_dict"):
        if not isinstance(payload.get(key), dict):
            raise CRBLError(f"{path}: checkpoint has no {key!r}")
    return payload


def model_from_checkpoint(payload: dict, path: str | os.PathLike = "checkpoint") -> CRBLModel:
    """The float32 model, its tensors taken over from the payload (assign): built on the meta
    device, it holds no random weights of its own, so loading needs no second copy of the
    weights (a peak of ~40 MB less) and no random initialisation. The model shares its tensors
    with payload["state_dict"]: build a second model from a second payload, not the same one."""
    with torch.device("meta"):
        model = CRBLModel(CRBLConfig.from_dict(payload["config"]))
    # float32 like the model (a float64 or float16 file would otherwise set the weights' dtype)
    state = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
             for k, v in payload["state_dict"].items()}
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise CRBLError(f"{path}: weights do not fit the CRBL model: "
                        f"{str(exc).splitlines()[1].strip() if len(str(exc).splitlines()) > 1 else exc}") from None
    unset = [name for name, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta]
    if unset:  # a tensor outside the state dict (none today): refuse rather than run on nothing
        raise CRBLError(f"{path}: the checkpoint does not set {', '.join(unset[:3])}; save it again "
                        "with convert_h5_to_pth.py or train_CRBL_pytorch_directml.py")
    model.meta = {k: v for k, v in payload.items() if k not in ("state_dict",)}
    return model


def place_model(model: CRBLModel, device: str | torch.device) -> CRBLModel:
    """Move to the device in its fastest memory layout: channels_last except on DirectML."""
    device = torch.device(device)
    model = model.to(device)
    return model.set_channels_last(device.type in ("cpu", "cuda"))


def compile_for_inference(model: CRBLModel, device_kind: str) -> None:
    """torch.compile both backbones and the inference head's per-chunk math, in place, for one
    fixed input shape (feed full batches).

    Measured on a 2-core CPU, 128 px: the bare backbones run 1.4x faster at batch 1 and 1.7x at
    batch 32; compiling costs ~55 s per new shape (~8 s from inductor's on-disk cache). Needs a
    C++ compiler on CPU and Triton on CUDA/ROCm; torch.compile has no DirectML backend. The
    compilation happens at the first forward: run one before real work to surface errors.
    """
    if device_kind == "dml":
        raise CRBLError("--compile is not available on DirectML (torch.compile has no DirectML "
                        "backend); leave it out")
    for backbone in (model.backbone1, model.backbone2):
        backbone.compile(dynamic=False)
    model.pool.compiled_terms = torch.compile(_chunk_terms, dynamic=False)
    model.parallel_backbones = False  # measured as compiled, one after the other


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> CRBLModel:
    """Rebuild a CRBL model from a checkpoint alone, in eval mode, metadata in `model.meta`."""
    model = model_from_checkpoint(load_checkpoint(path), path)
    return place_model(model, device).eval()


def resolve_threshold(cli_threshold: float | None, meta: dict, model_type: str | None = None
                      ) -> tuple[float, str]:
    """Threshold and where it came from: --threshold, else --model-type preset, else the
    checkpoint's (chosen on validation), else 0.5."""
    if cli_threshold is not None:
        return float(cli_threshold), "--threshold"
    if model_type is not None:
        return MODEL_TYPE_THRESHOLDS[model_type], f"--model-type {model_type} preset"
    if meta.get("threshold") is not None:
        return float(meta["threshold"]), f"checkpoint ({meta.get('threshold_source') or 'stored'})"
    return 0.5, "default 0.5"


# --------------------------------------------------------------------------------------------
# ONNX export
# --------------------------------------------------------------------------------------------

ONNX_TOLERANCE = 1e-4  # max |Δprob| between onnxruntime and PyTorch accepted after an export


class _OnnxCRBL(nn.Module):
    """CRBL inference in plain ops: the fused head's out= buffers and the training head's
    custom autograd.Function have no ONNX form. Outputs logits and probabilities, (N,1) each."""

    def __init__(self, model: CRBLModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.model
        a, b = m.features(images)
        c, h, w = a.shape[1:]  # static; -1 keeps the batch axis dynamic in the graph
        phi = torch.bmm(a.reshape(-1, c, h * w), b.reshape(-1, c, h * w).transpose(1, 2))
        phi = (phi / (h * w)).reshape(-1, c * c)
        magnitude = phi.abs() + m.pool.eps
        y = torch.sign(phi) * torch.sqrt(magnitude)  # Σy² = Σ(|phi| + eps): no y*y tensor
        norm = torch.sqrt(torch.clamp(magnitude.sum(1, keepdim=True), min=m.pool.l2_eps))
        logits = (y @ m.head.weight.t()) / norm + m.head.bias
        return logits, torch.sigmoid(logits)


def _smooth_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Random smooth RGB images in [0,1] for the export check. Not pixel noise: far from what a
    model was trained on, it drove a test model's features to 2e4, where float32 rounding alone
    moved probabilities by 1e-3 (float64 PyTorch disagreed with float32 PyTorch as much as
    onnxruntime did), so the check would fail on good exports."""
    coarse = torch.rand(n, 3, 6, 6, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def require_onnxruntime():
    """The onnxruntime module, or a CRBLError saying how to install it (an optional extra)."""
    try:
        import onnxruntime
    except ImportError:
        raise CRBLError("ONNX export needs onnxruntime to verify the file: pip install onnxruntime "
                        "(or onnxruntime-directml on Windows); it is an optional extra, not in "
                        "requirements_directml.txt") from None
    return onnxruntime


def export_onnx(model: CRBLModel, path: str | os.PathLike, opset: int = 17,
                image_size: int | None = None, batch_sizes: tuple[int, ...] = (1, 3)) -> dict:
    """Write model as ONNX (input `images` (N,3,S,S) RGB in [0,1]; outputs `logits`, `probs`;
    N dynamic) and check it with onnxruntime on CPU against PyTorch at `batch_sizes`.

    The file appears only after it passed (max |Δprob| <= ONNX_TOLERANCE). Returns a report.
    Uses the TorchScript exporter (dynamo=False): it needs no onnxscript and works on torch
    2.4.1, the version torch-directml pins.
    """
    import copy
    import inspect
    import warnings
    ort = require_onnxruntime()
    size = int(image_size or model.config.image_size)
    # A CPU float32 NCHW copy: the caller's model (device, layout, mode) stays as it was.
    # eval() on the wrapper too: the exporter restores the wrapper's mode afterwards, recursively,
    # and a fresh Module is in training mode (BatchNorm on batch statistics, dropout on).
    wrapper = _OnnxCRBL(copy.deepcopy(model).cpu().float().set_channels_last(False)).eval()
    example = _smooth_images(2, size, seed=0)
    kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notices
            torch.onnx.export(wrapper, (example,), str(tmp), opset_version=opset,
                              input_names=["images"], output_names=["logits", "probs"],
                              dynamic_axes={k: {0: "batch"} for k in ("images", "logits", "probs")},
                              **kwargs)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        max_diff = 0.0
        for n in batch_sizes:
            x = _smooth_images(n, size, seed=n)
            with torch.no_grad():  # the model's own (fused) inference path is the reference
                expected = torch.sigmoid(wrapper.model(x)).numpy()
            got = session.run(["probs"], {"images": x.numpy()})[0]
            if got.shape != expected.shape:
                raise CRBLError(f"ONNX export check failed: batch {n} gave shape {got.shape}, "
                                f"expected {expected.shape}")
            max_diff = max(max_diff, float(abs(got - expected).max()))
        if max_diff > ONNX_TOLERANCE:
            raise CRBLError(f"ONNX export check failed: onnxruntime differs from PyTorch by "
                            f"{max_diff:.2e} (> {ONNX_TOLERANCE:g}) in probability; not written")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {"path": str(path), "opset": opset, "image_size": size, "batch_sizes": list(batch_sizes),
            "max_abs_prob_diff": max_diff, "onnxruntime": ort.__version__,
            "bytes": path.stat().st_size}
