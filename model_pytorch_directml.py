"""CRBL in PyTorch: two EfficientNetB0 backbones fused by bilinear pooling.

The one model module every script imports. It reproduces the original Keras model
(see ../shared/ORIGINAL_MODEL.md) exactly:

    x (N,3,H,W) RGB in [0,1] -> input normalisation (buffers; identity for the original CRBL)
      -> backbone 1 (ImageNet)        -> A (N,1280,h,w)
      -> backbone 2 (Noisy-Student)   -> B (N,1280,h,w)
      -> bilinear pooling: phi = A·Bᵀ/(h·w), sign·sqrt(|phi|+1e-12), L2 normalise -> z (N,1280²)
      -> Dropout(0.5) -> Linear(1280², 1) -> logit

Read top-down: constants, the Keras-layer <-> timm-module table (the converter and freezing use
it), the config, EfficientNet-B0, bilinear pooling (the reference formula), CRBLModel, freezing,
get_device (DirectML > CUDA/ROCm > CPU), checkpoints. How training saves memory lives in
train_memory_pytorch_directml.py, how inference runs fast in fast_paths_pytorch_directml.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

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
    return x.device.type == "cpu" and not (torch.is_grad_enabled() or capturing_graph())


def _zero_border(x: torch.Tensor, left: int, right: int, top: int, bottom: int) -> torch.Tensor:
    """F.pad(x, (left, right, top, bottom)) writing each output element once: F.pad zero-fills
    the whole output, then copies x in: a full extra pass over the widest tensor of a stride-2
    block. Keeps x's memory format."""
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
    def __init__(self, channels: int, reduced: int):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)), inplace=True)
        gate = torch.sigmoid(self.conv_expand(s))
        # the blocks hand SE an activation of their own that nothing reads afterwards
        return x.mul_(gate) if _eager_cpu_inference(x) else x * gate


class _Block(nn.Module):
    """The residual connection (with drop path) where a block keeps its shape."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, drop_path_rate: float):
        super().__init__()
        self.has_skip = stride == 1 and in_chs == out_chs
        self.drop_path_rate = drop_path_rate

    def _residual(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return drop_path(y, self.drop_path_rate, self.training) + x if self.has_skip else y


class DepthwiseSeparableConv(_Block):
    """Stage 1 (expand ratio 1): depthwise conv, BN, SiLU, SE, pointwise conv, BN."""
    CONV_BN_PAIRS = (("conv_dw", "bn1"), ("conv_pw", "bn2"))

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, drop_path_rate: float):
        super().__init__(in_chs, out_chs, stride, drop_path_rate)
        self.conv_dw, self.bn1 = Conv2dSame(in_chs, in_chs, kernel, stride, groups=in_chs), _bn(in_chs)
        self.se = SqueezeExcite(in_chs, in_chs // 4)
        self.conv_pw, self.bn2 = nn.Conv2d(in_chs, out_chs, 1, bias=False), _bn(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv_pw(self.se(F.silu(self.bn1(self.conv_dw(x)), inplace=True))))
        return self._residual(y, x)


class InvertedResidual(_Block):
    """MBConv: 1x1 expand, BN, SiLU, depthwise conv, BN, SiLU, SE, 1x1 project, BN (+ skip)."""
    CONV_BN_PAIRS = (("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"))

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int, expand: int,
                 drop_path_rate: float):
        super().__init__(in_chs, out_chs, stride, drop_path_rate)
        mid = in_chs * expand
        self.conv_pw, self.bn1 = nn.Conv2d(in_chs, mid, 1, bias=False), _bn(mid)
        self.conv_dw, self.bn2 = Conv2dSame(mid, mid, kernel, stride, groups=mid), _bn(mid)
        self.se = SqueezeExcite(mid, in_chs // 4)
        self.conv_pwl, self.bn3 = nn.Conv2d(mid, out_chs, 1, bias=False), _bn(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.silu(self.bn1(self.conv_pw(x)), inplace=True)
        y = F.silu(self.bn2(self.conv_dw(y)), inplace=True)
        return self._residual(self.bn3(self.conv_pwl(self.se(y))), x)


class EfficientNetB0(nn.Module):
    """timm `tf_efficientnet_b0` without classifier: forward returns the top activation
    (N,1280,H/32,W/32), Keras `top_activation`. State dict keys are timm's (conv_stem, bn1,
    blocks.<stage>.<block>.*, conv_head, bn2)."""
    CONV_BN_PAIRS = (("conv_stem", "bn1"), ("conv_head", "bn2"))

    def __init__(self, drop_path_rate: float = 0.0):
        super().__init__()
        self.conv_stem = Conv2dSame(3, B0_STEM, 3, 2)
        self.bn1 = _bn(B0_STEM)
        total = sum(stage[4] for stage in B0_STAGES)
        in_chs, index, stages = B0_STEM, 0, []
        for expand, kernel, stride, out_chs, repeats in B0_STAGES:
            blocks = []
            for j in range(repeats):
                # timm/Keras: the rate grows linearly with the block's index over all 16 blocks
                rate, s = drop_path_rate * index / total, stride if j == 0 else 1
                blocks.append(
                    DepthwiseSeparableConv(in_chs, out_chs, kernel, s, rate) if expand == 1
                    else InvertedResidual(in_chs, out_chs, kernel, s, expand, rate))
                in_chs, index = out_chs, index + 1
            stages.append(nn.Sequential(*blocks))
        self.blocks = nn.Sequential(*stages)
        self.conv_head = nn.Conv2d(in_chs, NUM_FEATURES, 1, bias=False)
        self.bn2 = _bn(NUM_FEATURES)
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
        if not torch.is_grad_enabled() or x.requires_grad or capturing_graph():
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

def rows_per_chunk(total: int, per_item: int, device: torch.device) -> int:
    """Items per chunk of work on phi (1280² floats an image): about 2 MB on the CPU, math that
    stays in cache; about 128 MB on a GPU, few large kernels instead of thousands of tiny ones.
    Callers allocate a chunk's buffers once and reuse them: on the CPU every fresh large tensor
    costs page faults, more than the arithmetic itself."""
    budget = 1 << 19 if device.type == "cpu" else 1 << 25
    return max(1, min(total, budget // max(1, per_item)))


def capturing_graph() -> bool:
    """torch.jit tracing, or dynamo/torch.compile/export: eager-only shortcuts (in-place ops,
    numpy views, a second thread) must stay out of a captured graph."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class BilinearPooling(nn.Module):
    """The Keras Lambda of the original CRBL, per sample, in plain ops: the reference that every
    faster implementation (training's in fast memory, inference's without phi) is tested against.

    phi = Aᵀ·B / (H·W) with A, B reshaped to (H·W, C); flattened row-major (index i·C + j, i over
    backbone-1 channels); y = sign(phi)·sqrt(|phi| + eps); z = y / sqrt(max(Σy², l2_eps)).
    """

    def __init__(self, eps: float = 1e-12, l2_eps: float = 1e-12):
        super().__init__()
        self.eps, self.l2_eps = eps, l2_eps

    @staticmethod
    def outer(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """phi as (N, C, C), a tensor of its own. One matrix product per sample: never (N·H·W, C),
        which would mix samples across the batch. -1 keeps the batch axis dynamic in ONNX."""
        c, h, w = a.shape[1:]
        phi = torch.bmm(a.reshape(-1, c, h * w), b.reshape(-1, b.shape[1], h * w).transpose(1, 2))
        return phi.div_(h * w)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        phi = self.outer(a, b).flatten(1)
        y = torch.sign(phi) * torch.sqrt(phi.abs() + self.eps)
        return y / torch.sqrt(torch.clamp((y * y).sum(1, keepdim=True), min=self.l2_eps))


# --------------------------------------------------------------------------------------------
# CRBL model
# --------------------------------------------------------------------------------------------

class CRBLModel(nn.Module):
    """Two EfficientNetB0 extractors + bilinear pooling + Dropout + Linear(1280², 1).

    `forward` takes RGB floats in [0, 1] (N,3,H,W) and returns logits (N,1);
    `predict_proba` returns sigmoid probabilities. This is CRBL written plainly: training swaps
    in its memory-saving head (train_memory_pytorch_directml.py), inference runs it through
    fast_paths_pytorch_directml.prepare_for_inference.
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
        self.batchnorm_folded = False  # set by fast_paths_pytorch_directml.fold_batchnorm
        self.meta: dict[str, Any] = {}

    def normalize_input(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.input_mean) / self.input_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.normalize_input(x)
        return self.backbone1(x), self.backbone2(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.features(x)
        # Bilinear pooling sums 1280² products per image: float16 overflows, so the head always
        # runs in float32, also under --amp autocast or with half-precision backbones (--fp16).
        with autocast(a.device.type, enabled=False):
            return self.head(self.dropout(self.pool(a.float(), b.float())))

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.forward(x))

    def set_channels_last(self, enabled: bool = True) -> "CRBLModel":
        """NHWC convolutions: faster backbones on CPU and CUDA. Not on DirectML, whose
        convolutions expect NCHW (it falls back to slow copies)."""
        self.channels_last = enabled
        return self.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)

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


# --------------------------------------------------------------------------------------------
# Freezing (Keras layers[:150] of each backbone)
# --------------------------------------------------------------------------------------------

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

    @property
    def cuda_like(self) -> bool:
        """CUDA or ROCm: both run through torch.cuda (autocast, pinned memory, NCCL)."""
        return self.kind in ("cuda", "rocm")


def autocast(device_kind: str, enabled: bool = True):
    """float16 autocast on CUDA/ROCm (device kind or type "cuda"/"rocm"); a no-op elsewhere:
    DirectML has no autocast and the CPU gains nothing from float16. enabled=False switches it
    off for a region inside an autocast one."""
    if device_kind not in ("cuda", "rocm"):
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.float16, enabled=enabled)


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


def _cpu(index: int = 0) -> DeviceInfo:
    import platform
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


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> CRBLModel:
    """Rebuild a CRBL model from a checkpoint alone, in eval mode, metadata in `model.meta`."""
    model = model_from_checkpoint(load_checkpoint(path), path)
    return place_model(model, device).eval()
