"""Convert a trained Keras CRBL model (.h5 / .weights.h5) into a CRBL-PyTorch checkpoint.

    python convert_h5_to_pth.py crbl_crop.weights.h5 crbl_crop.pth --model-type crop
    python convert_h5_to_pth.py model_full.h5 crbl_full.pth --model-type full --image-size 128
    python convert_h5_to_pth.py apps_model.h5 out.pth --input-scale 255   # fed raw 0-255 pixels
    python convert_h5_to_pth.py crbl_crop.weights.h5 crbl_crop.pth --export-onnx crbl_crop.onnx

The file is read with h5py only: TensorFlow is not needed, and no Keras code (the Lambda layer of
a full-model file) is ever executed. All four Keras layouts are detected by themselves:
legacy HDF5 weights, full-model .h5, object-graph .weights.h5 (tf-keras >= 2.13, Keras 3) and
Keras-3 legacy .h5. Backbones may be qubvel `efficientnet` or keras.applications EfficientNetB0.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import inspect
import json
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path

try:
    import numpy as np
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from model_pytorch_directml import (IMAGENET_STD, MODEL_TYPE_THRESHOLDS, NUM_FEATURES,
                                        WEIGHTED_KERAS_CLASSES, CRBLConfig, CRBLError, CRBLModel,
                                        HelpFormatter, keras_layer_table, load_model,
                                        save_checkpoint)
except ModuleNotFoundError as exc:  # a Python without the requirements, e.g. outside the venv
    from setup_amd_gpu_directml import exit_missing_module
    exit_missing_module(exc)

# Variables of each weighted Keras layer class, in `trainable + non_trainable` creation order.
KERAS_VARS = {
    "Conv2D": ("kernel", "bias"),
    "DepthwiseConv2D": ("depthwise_kernel",),
    "BatchNormalization": ("gamma", "beta", "moving_mean", "moving_variance"),
    "Normalization": ("mean", "variance", "count"),
    "Dense": ("kernel", "bias"),
}
# Object-graph layer keys are the snake-cased class name (+ "_N"): the class of each.
OBJGRAPH_CLASSES = {"conv2d": "Conv2D", "depthwise_conv2d": "DepthwiseConv2D",
                    "batch_normalization": "BatchNormalization", "normalization": "Normalization",
                    "dense": "Dense"}
KERAS_TO_TIMM_TENSOR = {  # Keras variable -> (timm parameter, transpose to PyTorch layout)
    ("Conv2D", "kernel"): ("weight", (3, 2, 0, 1)),            # HWIO -> OIHW
    ("Conv2D", "bias"): ("bias", None),
    ("DepthwiseConv2D", "depthwise_kernel"): ("weight", (2, 3, 0, 1)),  # (kh,kw,C,1) -> (C,1,kh,kw)
    ("BatchNormalization", "gamma"): ("weight", None),
    ("BatchNormalization", "beta"): ("bias", None),
    ("BatchNormalization", "moving_mean"): ("running_mean", None),
    ("BatchNormalization", "moving_variance"): ("running_var", None),
}


@dataclass
class KerasBackbone:
    name: str                                  # Keras model name, or the object-graph key
    layers: dict[str, dict[str, np.ndarray]]   # Keras layer name -> variable name -> array
    normalization: dict[str, np.ndarray] | None = None  # keras.applications Normalization layer
    std_rescaling: bool | None = None          # second Rescaling (TF issue 49930); None = unknown

    @property
    def flavour(self) -> str:
        return "keras.applications" if self.normalization is not None else "qubvel efficientnet"


@dataclass
class KerasFile:
    path: Path
    layout: str
    backbones: list[KerasBackbone]
    head: dict[str, np.ndarray]
    head_name: str
    image_size: int | None = None              # from model_config, where present
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading the HDF5 layouts
# --------------------------------------------------------------------------------------------

def _text(value) -> str:
    return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _known_layers() -> dict[str, str]:
    """Keras layer name -> class, for every weighted backbone layer (+ Normalization)."""
    known = {l.keras_name: l.keras_class for l in keras_layer_table()
             if l.keras_class in WEIGHTED_KERAS_CLASSES}
    known["normalization"] = "Normalization"
    return known


def match_keras_layer(name: str, known: dict[str, str]) -> str | None:
    """The known layer a (possibly prefixed) Keras name refers to: 'model1_block1a_bn' -> 'block1a_bn'.

    Prefixes such as model1_ or a nested model's path must not matter, so match the longest known
    name that ends the given one at a name boundary.
    """
    best = None
    base = re.sub(r"_\d+$", "", name)  # Keras uniquifies auto names: normalization_1
    for keras_name in known:
        if any(n == keras_name or (n.endswith(keras_name) and not n[-len(keras_name) - 1].isalnum())
               for n in (name, base)):
            if best is None or len(keras_name) > len(best):
                best = keras_name
    return best


def _read_legacy_group(group) -> dict[str, np.ndarray]:
    """weight name -> array of one top-level layer group of a legacy (Keras 2 or 3) HDF5 file."""
    names = [_text(n) for n in group.attrs.get("weight_names", [])]
    return {n: np.asarray(group[n]) for n in names}


def _legacy_backbone(name: str, weights: dict[str, np.ndarray], path: Path) -> KerasBackbone:
    known = _known_layers()
    layers: dict[str, dict[str, np.ndarray]] = {}
    for weight_name, array in weights.items():
        parts = weight_name.split("/")
        if len(parts) < 2:
            raise CRBLError(f"{path}: backbone {name!r}: weight {weight_name!r} has no layer name")
        var = parts[-1].split(":")[0]
        keras_name = match_keras_layer(parts[-2], known)
        if keras_name is None:
            raise CRBLError(f"{path}: backbone {name!r}: layer {parts[-2]!r} (weight {weight_name!r}) "
                            "is not part of EfficientNetB0; only B0 backbones can be converted")
        if known[keras_name] == "DepthwiseConv2D" and var == "kernel":
            var = "depthwise_kernel"  # Keras 3 calls the depthwise variable "kernel"
        layer = layers.setdefault(keras_name, {})
        if var in layer:
            raise CRBLError(f"{path}: backbone {name!r}: weight {keras_name}/{var} appears twice")
        layer[var] = array
    norm = layers.pop("normalization", None)
    return KerasBackbone(name, layers, norm)


def _read_legacy(root, path: Path, layout: str) -> KerasFile:
    backbones, heads = [], []
    for layer_name in (_text(n) for n in root.attrs["layer_names"]):
        weights = _read_legacy_group(root[layer_name])
        if not weights:
            continue  # input, lambda, dropout
        if any(match_keras_layer(w.split("/")[-2], {"stem_conv": ""}) for w in weights if "/" in w):
            backbones.append(_legacy_backbone(layer_name, weights, path))
        elif len(weights) == 2 and any(a.ndim == 2 for a in weights.values()):
            head = {("kernel" if a.ndim == 2 else "bias"): a for a in weights.values()}
            heads.append((layer_name, head))
        else:
            raise CRBLError(f"{path}: layer {layer_name!r} has weights {sorted(weights)[:3]} that belong "
                            "to neither an EfficientNetB0 backbone nor the Dense head; not a CRBL model")
    return _assemble(path, layout, backbones, heads)


def _objgraph_key(key: str) -> tuple[str, int]:
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", key)
    return m.group(1), int(m.group(2) or 0)


def _objgraph_vars(group) -> list[np.ndarray]:
    vars_group = group.get("vars")
    if vars_group is None:
        return []
    return [np.asarray(vars_group[k]) for k in sorted(vars_group, key=int)]


def _objgraph_backbone(name: str, group, path: Path) -> KerasBackbone:
    """Object-graph layers are named by class + ordinal: the k-th Conv2D is conv2d_k, etc."""
    by_class: dict[str, list[str]] = {}
    for layer in keras_layer_table():
        by_class.setdefault(layer.keras_class, []).append(layer.keras_name)
    by_class["Normalization"] = ["normalization"]
    layers, norm = {}, None
    for key in group["layers"]:
        values = _objgraph_vars(group["layers"][key])
        if not values:
            continue  # activations, pooling, dropout, rescaling, padding ...
        class_key, ordinal = _objgraph_key(key)
        keras_class = OBJGRAPH_CLASSES.get(class_key)
        names = by_class.get(keras_class, [])
        if keras_class is None or ordinal >= len(names):
            raise CRBLError(f"{path}: backbone {name!r}: layer {key!r} is not part of EfficientNetB0 "
                            "(only B0 backbones can be converted)")
        keras_name = names[ordinal]
        stored = _text(group["layers"][key]["vars"].attrs.get("name", keras_name))
        if match_keras_layer(stored, {keras_name: ""}) is None:  # Keras >= 3.6 stores the name
            raise CRBLError(f"{path}: backbone {name!r}: {key} holds layer {stored!r}, expected "
                            f"{keras_name!r}; the layer order is not EfficientNetB0's")
        var_names = KERAS_VARS[keras_class]
        if len(values) > len(var_names):
            raise CRBLError(f"{path}: backbone {name!r}: layer {keras_name} ({key}) has {len(values)} "
                            f"variables, expected at most {len(var_names)}")
        entry = dict(zip(var_names, values))
        if keras_class == "Normalization":
            norm = entry
        else:
            layers[keras_name] = entry
    return KerasBackbone(name, layers, norm)


def _read_objgraph(f, path: Path) -> KerasFile:
    backbones, heads = [], []
    top = sorted(f["layers"], key=lambda k: (_objgraph_key(k)[0], _objgraph_key(k)[1]))
    for key in top:
        group = f["layers"][key]
        if "layers" in group:
            if any(_objgraph_vars(group["layers"][k]) for k in group["layers"]):
                backbones.append(_objgraph_backbone(key, group, path))
            continue
        values = _objgraph_vars(group)
        if not values:
            continue
        if _objgraph_key(key)[0] != "dense" or len(values) != 2:
            raise CRBLError(f"{path}: layer {key!r} has weights but is neither a backbone nor the "
                            "Dense head; not a CRBL model")
        heads.append((key, dict(zip(KERAS_VARS["Dense"], values))))
    return _assemble(path, "object-graph .weights.h5", backbones, heads)


def _assemble(path: Path, layout: str, backbones: list[KerasBackbone], heads: list) -> KerasFile:
    if len(backbones) != 2:
        raise CRBLError(f"{path}: found {len(backbones)} EfficientNetB0 backbone(s), a CRBL model has 2")
    if len(heads) != 1:
        raise CRBLError(f"{path}: found {len(heads)} Dense layers, a CRBL model has 1 (the head)")
    head_name, head = heads[0]
    return KerasFile(path, layout, backbones, head, head_name)


def _apply_model_config(kf: KerasFile, config_json: str) -> None:
    """Facts only a full-model file has: image size and the keras.applications std Rescaling."""
    try:
        config = json.loads(config_json)
    except ValueError:
        kf.notes.append("model_config is not valid JSON; ignored")
        return
    layers = config.get("config", {}).get("layers", [])
    for layer in layers:
        shape = layer.get("config", {}).get("batch_input_shape") or layer.get("config", {}).get("batch_shape")
        if layer.get("class_name") == "InputLayer" and shape and len(shape) == 4 and shape[1]:
            kf.image_size = int(shape[1])
    nested = {l.get("config", {}).get("name"): l for l in layers
              if isinstance(l.get("config", {}).get("layers"), list)}
    for backbone in kf.backbones:
        inner = nested.get(backbone.name, {}).get("config", {}).get("layers", [])
        scales = [l["config"].get("scale") for l in inner if l.get("class_name") == "Rescaling"]
        if backbone.normalization is not None and inner:
            backbone.std_rescaling = any(isinstance(s, list) for s in scales)


def read_keras_h5(path: str | Path) -> KerasFile:
    """Read every tensor of a Keras CRBL file, whichever of the four layouts it has."""
    import h5py
    path = Path(path)
    if not path.is_file():
        raise CRBLError(f"{path}: file not found")
    if not h5py.is_hdf5(path):
        raise CRBLError(f"{path}: not an HDF5 file; expected a Keras .h5 or .weights.h5 "
                        "(a SavedModel folder or .keras zip must be re-saved with save_weights('x.weights.h5'))")
    try:
        with h5py.File(path, "r") as f:
            if "layers" in f and isinstance(f["layers"], h5py.Group):
                return _read_objgraph(f, path)
            root = f["model_weights"] if "model_weights" in f else f
            if "layer_names" not in root.attrs:
                raise CRBLError(f"{path}: HDF5 but not a Keras weights file (no 'layer_names' "
                                "attribute and no 'layers' group)")
            keras3 = not any(":0" in _text(n) for ln in root.attrs["layer_names"]
                             for n in root[_text(ln)].attrs.get("weight_names", []))
            kind = "Keras-3 legacy" if keras3 else "legacy (Keras 2)"
            layout = f"{kind} full-model .h5" if "model_weights" in f else f"{kind} HDF5 weights"
            kf = _read_legacy(root, path, layout)
            if "model_config" in f.attrs:
                _apply_model_config(kf, _text(f.attrs["model_config"]))
            return kf
    except CRBLError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise CRBLError(f"{path}: cannot read the HDF5 file ({type(exc).__name__}: {exc}); "
                        "is it truncated or still being written?") from None


# --------------------------------------------------------------------------------------------
# Mapping onto the PyTorch model
# --------------------------------------------------------------------------------------------

def backbone_state_dict(backbone: KerasBackbone, reference: dict, path: Path) -> dict:
    """timm state dict for one backbone; every Keras tensor used once, every timm tensor filled."""
    import torch
    state = {}
    for layer in keras_layer_table():
        if layer.keras_class not in WEIGHTED_KERAS_CLASSES:
            continue
        tensors = backbone.layers.pop(layer.keras_name, None)
        if tensors is None:
            raise CRBLError(f"{path}: backbone {backbone.name!r} has no weights for Keras layer "
                            f"{layer.keras_name!r}; the file is incomplete or not EfficientNetB0")
        for var, array in tensors.items():
            mapping = KERAS_TO_TIMM_TENSOR.get((layer.keras_class, var))
            if mapping is None:
                raise CRBLError(f"{path}: backbone {backbone.name!r}: unexpected variable "
                                f"{layer.keras_name}/{var} ({layer.keras_class})")
            timm_param, perm = mapping
            key = f"{layer.timm_module}.{timm_param}"
            value = torch.from_numpy(np.ascontiguousarray(array.transpose(perm) if perm else array))
            expected = tuple(reference[key].shape)
            if tuple(value.shape) != expected:
                raise CRBLError(f"{path}: backbone {backbone.name!r}: Keras layer {layer.keras_name}/{var} "
                                f"has shape {tuple(array.shape)}, EfficientNetB0 needs {expected} "
                                "(after transposing); is it another EfficientNet (B1..B7)?")
            state[key] = value.float()
    if backbone.layers:
        extra = sorted(backbone.layers)[:5]
        raise CRBLError(f"{path}: backbone {backbone.name!r} has layers not in EfficientNetB0: {extra}")
    for key, value in reference.items():  # buffers Keras does not have
        if key.endswith("num_batches_tracked"):
            state[key] = torch.zeros_like(value)
    missing = sorted(set(reference) - set(state))
    if missing:
        raise CRBLError(f"{path}: backbone {backbone.name!r}: no Keras tensor for {missing[:3]}")
    return state


def input_normalization(kf: KerasFile, input_scale: str, std_rescaling: str
                        ) -> tuple[tuple, tuple, str, str]:
    """mean/std of the model's input normalisation for images in [0, 1], and what was assumed.

    The Keras model saw g·x, x in [0,1], with g = 1 (fed pixels/255) or 255 (fed raw pixels).
    qubvel backbones use g·x directly. keras.applications backbones compute
    (g·x/255 − m) / sqrt(v), and divide by sqrt(v) once more when built with weights='imagenet'
    on Keras >= 2.9 (TF issue 49930: their stored 'variance' is really the std).
    """
    norms = [b.normalization for b in kf.backbones]
    if (norms[0] is None) != (norms[1] is None):
        raise CRBLError(f"{kf.path}: one backbone has a Normalization layer and the other has not; "
                        "mixed backbone flavours are not supported")
    apps = norms[0] is not None
    scale = {"auto": 255.0 if apps else 1.0, "1": 1.0, "255": 255.0}[input_scale]
    if not apps:
        return (0.0,) * 3, (1.0 / scale,) * 3, "none", f"qubvel, fed pixels{'/255' if scale == 1 else ''}"
    stats = []
    for backbone in kf.backbones:
        mean = backbone.normalization["mean"].reshape(-1).astype(np.float64)
        var = backbone.normalization["variance"].reshape(-1).astype(np.float64)
        if std_rescaling == "auto":
            quirk = backbone.std_rescaling
            if quirk is None:  # weights-only file: the variance values tell
                quirk = bool(np.allclose(var, IMAGENET_STD, atol=1e-6))
        else:
            quirk = std_rescaling == "yes"
        std = var if quirk else np.sqrt(var)
        stats.append((tuple(float(v) for v in mean * 255.0 / scale),
                      tuple(float(v) for v in std * 255.0 / scale), quirk))
    if not np.allclose(stats[0][:2], stats[1][:2], rtol=1e-6):
        raise CRBLError(f"{kf.path}: the two backbones normalise their input differently; "
                        "one input normalisation per model is supported")
    mean, std, quirk = stats[0]
    how = (f"keras.applications, fed {'raw 0-255 pixels' if scale == 255 else 'pixels/255'}, "
           f"Normalization{' + 1/sqrt(std) Rescaling (TF issue 49930)' if quirk else ''}")
    return mean, std, "keras", how


def head_state_dict(kf: KerasFile) -> dict:
    import torch
    kernel, bias = kf.head.get("kernel"), kf.head.get("bias")
    if kernel is None or bias is None or kernel.shape != (NUM_FEATURES ** 2, 1) or bias.shape != (1,):
        shapes = {k: tuple(v.shape) for k, v in kf.head.items()}
        raise CRBLError(f"{kf.path}: Dense layer {kf.head_name!r} has {shapes}, expected kernel "
                        f"({NUM_FEATURES ** 2}, 1) and bias (1,): not the CRBL head")
    return {"head.weight": torch.from_numpy(np.ascontiguousarray(kernel.T)).float(),
            "head.bias": torch.from_numpy(bias).float()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def convert(src, dst, image_size: int | None = None, input_scale: str = "auto",
            model_type: str | None = None, std_rescaling: str = "auto") -> dict:
    """Convert SRC (Keras) to DST (.pth); returns the report. Nothing is written on error."""
    import torch
    src, dst = Path(src), Path(dst)
    kf = read_keras_h5(src)
    mean, std, norm_name, how = input_normalization(kf, input_scale, std_rescaling)
    size = image_size or kf.image_size or 128
    config = CRBLConfig(image_size=size, mean=mean, std=std, normalization=norm_name)
    model = CRBLModel(config)
    reference = model.state_dict()
    n_tensors = sum(len(layer) for b in kf.backbones for layer in b.layers.values())
    n_tensors += sum(len(b.normalization or {}) for b in kf.backbones) + len(kf.head)
    state = {"input_mean": reference["input_mean"].new_tensor(mean).view(1, 3, 1, 1),
             "input_std": reference["input_std"].new_tensor(std).view(1, 3, 1, 1)}
    for prefix, backbone in (("backbone1.body.", kf.backbones[0]), ("backbone2.body.", kf.backbones[1])):
        sub = {k[len(prefix):]: v for k, v in reference.items() if k.startswith(prefix)}
        state.update({prefix + k: v for k, v in backbone_state_dict(backbone, sub, src).items()})
    state.update(head_state_dict(kf))
    model.load_state_dict(state, strict=True)
    report = {
        "source": str(src), "layout": kf.layout, "flavour": kf.backbones[0].flavour,
        "backbones": [b.name for b in kf.backbones], "head": kf.head_name,
        "head_shape": list(kf.head["kernel"].shape), "tensors_mapped": n_tensors,
        "image_size": size, "input": how, "mean": list(mean), "std": list(std),
        "model_type": model_type, "notes": kf.notes,
    }
    threshold = MODEL_TYPE_THRESHOLDS.get(model_type) if model_type else None
    save_checkpoint(dst, model, threshold=threshold,
                    threshold_source=f"original {model_type} model threshold" if model_type else None,
                    model_type=model_type,
                    provenance={"converted_from": src.name, "sha256": _sha256(src), **report,
                                "torch": str(torch.__version__)})
    return report


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------

# --------------------------------------------------------------------------------------------
# ONNX export (--export-onnx)
# --------------------------------------------------------------------------------------------

ONNX_TOLERANCE = 1e-4  # max |Δprob| between onnxruntime and PyTorch accepted after an export


class _OnnxCRBL(nn.Module):
    """The model's plain forward (the reference head: no custom autograd, no numpy), returning
    logits and probabilities, (N,1) each."""

    def __init__(self, model: CRBLModel):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
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
            with torch.no_grad():
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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="%(prog)s SRC.h5 DST.pth [options]",
                                formatter_class=HelpFormatter)
    p.add_argument("src", help="Keras weights: .h5 (legacy or full model) or .weights.h5")
    p.add_argument("dst", help="output CRBL checkpoint (.pth)")
    g = p.add_argument_group("model")
    g.add_argument("--image-size", type=int, default=None,
                   help="input size the model was trained at (default: from the file's model_config, else 128)")
    g.add_argument("--model-type", choices=sorted(MODEL_TYPE_THRESHOLDS), default=None,
                   help="store the original decision threshold of this model type (crop 0.01, full 0.5)")
    g = p.add_argument_group("input preprocessing of the Keras model")
    g.add_argument("--input-scale", choices=["auto", "1", "255"], default="auto",
                   help="what the Keras model was fed: 1 = pixels/255, 255 = raw pixels; auto = 1 for "
                        "qubvel backbones (original CRBL), 255 for keras.applications backbones")
    g.add_argument("--std-rescaling", choices=["auto", "yes", "no"], default="auto",
                   help="keras.applications only: whether the backbone has the extra 1/sqrt(std) Rescaling "
                        "of weights='imagenet' on Keras >= 2.9; auto = from model_config, else from the "
                        "Normalization values")
    g = p.add_argument_group("ONNX export (needs onnxruntime)")
    g.add_argument("--export-onnx", metavar="PATH", default=None,
                   help="also write the converted model as ONNX (dynamic batch, input RGB in [0,1]), "
                        "checked with onnxruntime against PyTorch")
    g.add_argument("--onnx-opset", type=int, default=17, help="ONNX opset of --export-onnx")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.image_size is not None and args.image_size < 32:
            raise CRBLError(f"--image-size {args.image_size} is too small; EfficientNetB0 needs >= 32")
        if args.export_onnx:
            require_onnxruntime()  # before converting, not after
        report = convert(args.src, args.dst, args.image_size, args.input_scale, args.model_type,
                         args.std_rescaling)
        # From the written .pth: the ONNX file is what a user reloading the checkpoint would get.
        onnx_report = export_onnx(load_model(args.dst), args.export_onnx,
                                  opset=args.onnx_opset) if args.export_onnx else None
    except CRBLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2  # a user error, as argparse exits for a bad option
    print(f"layout:     {report['layout']}")
    print(f"backbones:  {', '.join(report['backbones'])} ({report['flavour']})")
    print(f"input:      {report['input']}; image size {report['image_size']}")
    print(f"head:       {report['head']} kernel {tuple(report['head_shape'])}")
    print(f"tensors:    {report['tensors_mapped']} mapped, all model parameters filled")
    for note in report["notes"]:
        print(f"note:       {note}")
    print(f"wrote {args.dst}")
    if onnx_report:
        print(f"wrote {onnx_report['path']} (opset {onnx_report['opset']}, dynamic batch); "
              f"onnxruntime {onnx_report['onnxruntime']} vs PyTorch at batch "
              f"{'/'.join(map(str, onnx_report['batch_sizes']))}: max |Δprob| "
              f"{onnx_report['max_abs_prob_diff']:.1e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
