"""Where the impurity is: heatmaps of a CRBL model's decision, defect masks and pixel metrics.

A map says, per pixel of the model's input, how strongly the head's reading of the image
responds to that pixel: a gradient with respect to the image, one backward pass through the
backbones after the forward that scores it (anomaly_maps). The head's part of that gradient is
written out in closed form. Methods (HEATMAP_METHODS), chosen by measurement on a synthetic task
whose every image also carries harmless marks as contrasty as its defects (docs/heatmaps.md):

- "evidence-checked" (default): the evidence map, its strongest peaks checked by blurring each
  out of the image and scoring it again (checked_peaks: the peak the score depends on wins);
- "evidence": the gradient of the head's evidence w·y / ‖y‖ with the normaliser ‖y‖ held at
  its value. The logit is scale-free in phi, so in the exact gradient the normaliser's term
  pulls against the weights' term wherever the image is strong, the defect included, and what
  is left points at whatever is contrasty; holding the normaliser (as layer-wise relevance
  propagation does with normalisation layers) leaves what the head's weights read;
- "gradient": the exact d logit / d pixel, the textbook saliency map.

The gradient maps are the max over RGB of its magnitude, Gaussian-blurred (sigma = size / 64).
Gradient-weighted maps of the 4×4 (128 px) feature grid (Grad-CAM, the bilinear split
a_pᵀ·G·b_p), removing one grid cell's outer product and grey-patch occlusion were measured too
and did not point at the defect.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dataset_pytorch_directml import class_label, load_rgb_uint8
from fast_paths_pytorch_directml import InferenceRunner
from model_pytorch_directml import CRBLError, CRBLModel, autocast

DEFAULT_HEATMAP_METHOD = "evidence-checked"
HEATMAP_METHODS = ("evidence-checked", "evidence", "gradient")
# evidence-checked: how many of the evidence map's strongest peaks are checked, the radius of
# the disk blurred out around each (a share of the image side; peaks are two radii apart, so
# the disks never overlap), the weight left where no check lowered the score, and the logit drop
# below which even the largest drop keeps only drop / CHECK_FULL_DROP (blurring any spot of a
# normal image moves its score a little).
CHECK_PEAKS = 3
CHECK_RADIUS = 1 / 8
CHECK_FLOOR = 0.1
CHECK_FULL_DROP = 1.0
# Images whose head gradient is taken at once: phi and each of its temporaries are 6.5 MB per
# image.
HEAD_CHUNK = 8


@dataclass
class Heatmaps:
    logits: torch.Tensor  # (N,) float32, the logits of the images the maps explain
    maps: torch.Tensor    # (N, S, S) float32 >= 0 over the model's input pixels


def anomaly_maps(model: CRBLModel | InferenceRunner, images: torch.Tensor,
                 method: str = DEFAULT_HEATMAP_METHOD, check_from: float | None = None
                 ) -> Heatmaps:
    """Logits and heatmaps of a batch of RGB images in [0, 1], (N, 3, S, S) on the model's device.

    model: a CRBLModel, or the runner prepare_for_inference made of one (its folded, joined
    backbones are the faster way; the scores then equal the runner's within float32 rounding).
    One forward and one backward pass (evidence-checked adds CHECK_PEAKS forwards); samples
    never mix, so each map is its image's own. Works inside torch.inference_mode (the maps need
    autograd and turn it on for themselves).

    check_from: with evidence-checked, check only the images scored (sigmoid of the logit) at
    least this: the inference script passes its decision threshold, since where the impurity is
    matters for the flagged images. The others keep CHECK_FLOOR of their map, as a check that
    lowers nothing leaves it. Choosing reads the logits, so they come back on the CPU.
    """
    if method not in HEATMAP_METHODS:
        raise CRBLError(f"--heatmap-method {method!r} is unknown; choose one of "
                        f"{', '.join(HEATMAP_METHODS)}")
    runner = model if isinstance(model, InferenceRunner) else None
    crbl = runner.model if runner else model
    with torch.inference_mode(False):
        with torch.enable_grad():
            x = images.detach().clone().float().requires_grad_(True)
            a, b = runner.backbone_maps(x) if runner else crbl.features(x)
            logits, grad_a, grad_b = head_gradients(crbl, a.detach(), b.detach(),
                                                    exact=method == "gradient")
            grad_x, = torch.autograd.grad((a, b), x, (grad_a.to(a.dtype), grad_b.to(b.dtype)))
    with torch.no_grad():
        maps = gaussian_blur(grad_x.abs().amax(1, keepdim=True), x.shape[-1] / 64)[:, 0]
        if method == "evidence-checked" and check_from is None:
            maps = checked_peaks(model, images.float(), logits, maps)
        elif method == "evidence-checked":
            logits = logits.cpu()  # the batch's one read of its logits, made before the maps'
            # the score as the script compares it with its threshold (float64)
            chosen = torch.nonzero(torch.sigmoid(logits).double() >= check_from).flatten()
            checked = maps * CHECK_FLOOR
            if len(chosen):
                rows = chosen.to(maps.device)
                checked[rows] = checked_peaks(model, images.index_select(0, rows).float(),
                                              logits[chosen].to(maps.device),
                                              maps.index_select(0, rows))
            maps = checked
        return Heatmaps(logits, maps)


def checked_peaks(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  logits: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """The maps weighted by what their strongest peaks are worth to the score.

    Each of CHECK_PEAKS peaks (two CHECK_RADIUS apart) is blurred out of the image (a disk of
    that radius replaced by the image blurred at size / 16) and the image scored again. A
    peak's disk keeps the map in proportion to the logit it took away (the largest drop, if at
    least CHECK_FULL_DROP, keeps all of it); the rest of the map keeps CHECK_FLOOR. A gradient
    says what the score is sensitive to: a contrasty harmless mark can draw as much of it as
    the defect, but taking the mark away hardly moves the score, taking the defect away does.
    CHECK_PEAKS more forwards a batch, no backward; model maps images to logits (a CRBLModel
    or the inference runner).
    """
    size = x.shape[-1]
    radius = size * CHECK_RADIUS
    coords = torch.arange(size, dtype=torch.float32, device=x.device)
    blurred = gaussian_blur(x, size / 16) / gaussian_blur(torch.ones_like(x[:1, :1]), size / 16)
    search, disks, drops = maps, [], []
    for _ in range(CHECK_PEAKS):
        index = search.flatten(1).argmax(1).float()  # row and column in float: exact to 4096 px
        row = torch.floor(index / size)
        column = index - row * size
        distance2 = ((coords.view(1, 1, -1) - column.view(-1, 1, 1)) ** 2
                     + (coords.view(1, -1, 1) - row.view(-1, 1, 1)) ** 2)
        disk = (distance2 <= radius * radius).float()
        drops.append(logits - model(x + (blurred - x) * disk[:, None]).flatten().float())
        disks.append(disk)
        # maps are >= 0: the next peak lies two radii away, its disk apart from this one
        search = search.masked_fill(distance2 <= 4 * radius * radius, -1.0)
    drops = torch.stack(drops, 1).clamp_min(0)
    share = drops / drops.amax(1, keepdim=True).clamp_min(CHECK_FULL_DROP)
    kept = (share[:, :, None, None] * torch.stack(disks, 1)).amax(1)
    return maps * (CHECK_FLOOR + (1 - CHECK_FLOOR) * kept)


def head_gradients(model: CRBLModel, a: torch.Tensor, b: torch.Tensor, exact: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The head's logits and the gradient of its reading with respect to the two feature maps,
    in closed form, a few images at a time (phi is 1280² per image), float32 as in
    CRBLModel.forward.

    With phi = A·Bᵀ / HW, y = sign(phi)·sqrt(|phi| + eps), n = ‖y‖ and logit = w·y / n + bias:
    d logit / d phi = (w / n − (w·y / n³)·y) / (2·sqrt(|phi| + eps)) (exact), or without the
    normaliser's term (exact=False: the evidence, n held); then d / dA = G·B / HW and
    d / dB = Gᵀ·A / HW.
    """
    channels, height, width = a.shape[1:]
    cells = height * width
    weight = model.head.weight.detach().float().view(channels, channels)
    bias = model.head.bias.detach().float()
    logits, grads_a, grads_b = [], [], []
    with autocast(a.device.type, enabled=False):
        for start in range(0, len(a), HEAD_CHUNK):
            a_part = a[start:start + HEAD_CHUNK].float().reshape(-1, channels, cells)
            b_part = b[start:start + HEAD_CHUNK].float().reshape(-1, channels, cells)
            phi = torch.bmm(a_part, b_part.transpose(1, 2)).div_(cells)
            root = phi.abs().add_(model.pool.eps).sqrt_()
            y = torch.sign(phi).mul_(root)
            norm = (y * y).sum((1, 2), keepdim=True).clamp_(min=model.pool.l2_eps).sqrt_()
            z = y.div_(norm)  # what BilinearPooling returns; the head's Linear as in forward
            logit = F.linear(z.view(len(z), -1), weight.view(1, -1), bias)
            logits.append(logit.detach().flatten())
            grad = weight / norm
            if exact:  # (w·y / n³)·y = (w·z / n)·z
                grad.sub_(z.mul_((logit.detach() - bias).view(-1, 1, 1) / norm))
            # d sign(phi)·sqrt(|phi|) / d phi is 0 where phi is exactly 0 (a channel that never
            # fires), not 1 / (2·sqrt(eps)): as autograd has it
            grad.div_(root.mul_(2 * cells)).masked_fill_(phi == 0, 0)
            grads_a.append(torch.bmm(grad, b_part))
            grads_b.append(torch.bmm(grad.transpose(1, 2), a_part))
    return (torch.cat(logits), torch.cat(grads_a).view(a.shape),
            torch.cat(grads_b).view(b.shape))


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """(N, C, H, W) blurred per channel by a separable Gaussian (zero border): convolutions
    only, which every device runs natively."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-t * t / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    c = maps.shape[1]
    maps = F.conv2d(maps, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), padding=(0, radius),
                    groups=c)
    return F.conv2d(maps, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), padding=(radius, 0),
                    groups=c)


def peak(heatmap: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """(x, y) of the map's maximum in the original image's pixels (0-based, x to the right, y
    down): the map covers the whole image, resized to the model's input as for scoring."""
    row, col = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    x = min(width - 1, int((col + 0.5) * width / heatmap.shape[1]))
    y = min(height - 1, int((row + 0.5) * height / heatmap.shape[0]))
    return x, y


# --------------------------------------------------------------------------------------------
# Ground truth: masks and pixel-level metrics
# --------------------------------------------------------------------------------------------

def mvtec_mask(image: Path) -> tuple[int, Path | None] | None:
    """(label, mask or None) of an image in MVTec AD's test layout, <root>/test/<defect>/<name>
    with masks in <root>/ground_truth/<defect>/<name>_mask.png; None outside that layout.
    good/ images are normal (no mask); a defect image without its mask file gets None."""
    test_dir = image.parent.parent
    ground_truth = test_dir.parent / "ground_truth"
    if test_dir.name != "test" or not ground_truth.is_dir():
        return None
    if class_label(image.parent.name) == 0:
        return 0, None
    mask = ground_truth / image.parent.name / f"{image.stem}_mask.png"
    return 1, mask if mask.is_file() else None


def load_mask(path: str | os.PathLike) -> np.ndarray:
    """A defect mask as bool (H, W): any non-zero pixel is defect."""
    return load_rgb_uint8(path).any(axis=2)


def mask_at(mask: np.ndarray, size: int) -> np.ndarray:
    """The mask resized to the model's (size, size) input: a pixel is defect where the defect
    covers at least half of it."""
    from PIL import Image
    cover = Image.fromarray(mask.astype(np.float32)).resize((size, size), Image.BOX)
    return np.asarray(cover) >= 0.5


def hits_mask(mask: np.ndarray, x: int, y: int, width: int, height: int) -> bool:
    """Whether the image pixel (x, y) falls on the mask (scaled if the mask has another size)."""
    mask_y = min(mask.shape[0] - 1, int((y + 0.5) * mask.shape[0] / height))
    mask_x = min(mask.shape[1] - 1, int((x + 0.5) * mask.shape[1] / width))
    return bool(mask[mask_y, mask_x])


@dataclass
class Localisation:
    """Pixel AUROC and pointing game over the images that have ground truth: a mask, or a
    normal label (0) in a data set that has masks (then every pixel is normal)."""
    maps: list[np.ndarray] = field(default_factory=list)    # (S, S) float16
    masks: list[np.ndarray] = field(default_factory=list)   # (S, S) bool
    pointed: list[bool] = field(default_factory=list)       # per anomalous image with a mask

    def add(self, heatmap: np.ndarray, mask: np.ndarray | None, peak_xy: tuple[int, int],
            width: int, height: int) -> None:
        """One image: mask None means defect-free."""
        size = heatmap.shape[-1]
        self.maps.append(heatmap.astype(np.float16))
        self.masks.append(np.zeros((size, size), bool) if mask is None else mask_at(mask, size))
        if mask is not None and mask.any():
            self.pointed.append(hits_mask(mask, *peak_xy, width, height))

    def metrics(self) -> dict:
        from sklearn.metrics import roc_auc_score
        pixels = np.concatenate([m.ravel() for m in self.masks]) if self.masks else np.zeros(0)
        both = pixels.any() and not pixels.all()
        return {
            "pixel_auroc": (float(roc_auc_score(pixels, np.concatenate(
                [m.ravel().astype(np.float32) for m in self.maps]))) if both else None),
            "pointing_game": float(np.mean(self.pointed)) if self.pointed else None,
            "pixel_metric_images": len(self.masks),
            "pointing_game_images": len(self.pointed),
        }


# --------------------------------------------------------------------------------------------
# Pictures: overlays and the localisation plot
# --------------------------------------------------------------------------------------------

def overlay(image: np.ndarray, heatmap: np.ndarray, text: str, peak_xy: tuple[int, int],
            mask: np.ndarray | None = None):
    """The image at its own size with the map (scaled to its own maximum) blended in where it
    is strong, a cross on the peak, `text` in the top-left corner and, given a mask, its
    outline in white. Returns a PIL image."""
    import matplotlib
    from PIL import Image, ImageDraw, ImageFilter
    height, width = image.shape[:2]
    scaled = Image.fromarray(heatmap.astype(np.float32)).resize((width, height), Image.BILINEAR)
    level = np.asarray(scaled) / max(float(heatmap.max()), 1e-30)
    colours = matplotlib.colormaps["jet"](level)[:, :, :3] * 255
    alpha = 0.6 * level[:, :, None]
    picture = Image.fromarray((image * (1 - alpha) + colours * alpha).round().astype(np.uint8))
    draw = ImageDraw.Draw(picture)
    if mask is not None:
        edge = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
        edge = np.asarray(edge.filter(ImageFilter.FIND_EDGES)) > 0
        picture.paste((255, 255, 255), mask=Image.fromarray(edge.astype(np.uint8) * 255))
    arm = max(3, min(width, height) // 40)
    x, y = peak_xy
    for colour, thick in (((0, 0, 0), 3), ((255, 255, 255), 1)):
        draw.line([(x - arm, y), (x + arm, y)], fill=colour, width=thick)
        draw.line([(x, y - arm), (x, y + arm)], fill=colour, width=thick)
    font_size = max(10, min(width, height) // 16)
    draw.text((4, 4), text, fill=(255, 255, 255), stroke_width=max(1, font_size // 10),
              stroke_fill=(0, 0, 0), font_size=font_size)
    return picture


def save_localisation_plot(examples: list, prefix: str | os.PathLike, columns: int = 4) -> Path:
    """`<prefix>_heatmaps.png`: a grid of overlays (with mask outlines) of a few anomalous images."""
    from PIL import Image
    prefix = Path(prefix)
    tile = 256
    rows = math.ceil(len(examples) / columns)
    grid = Image.new("RGB", (columns * tile, rows * tile), (255, 255, 255))
    for i, picture in enumerate(examples):
        scale = tile / max(picture.size)
        picture = picture.resize((round(picture.width * scale), round(picture.height * scale)))
        grid.paste(picture, ((i % columns) * tile, (i // columns) * tile))
    path = prefix.with_name(f"{prefix.name}_heatmaps.png")
    grid.save(path)
    return path


def overlay_path(folder: str | os.PathLike, image_path: str) -> Path:
    """Where an image's overlay goes: its relative path under folder, '.heatmap.png' added
    (photo.jpg -> photo.jpg.heatmap.png, so photo.png and photo.jpg never collide)."""
    rel = Path(image_path)
    if rel.is_absolute() or ".." in rel.parts:
        rel = Path(rel.name)
    return Path(folder) / rel.parent / f"{rel.name}.heatmap.png"


class HeatmapWriter:
    """--heatmaps DIR of the inference script: per scored image its overlay and peak, and the
    localisation metrics over the images with ground truth."""

    def __init__(self, folder: str | os.PathLike, samples, threshold: float, examples: int = 8):
        self.folder, self.threshold, self.wanted = Path(folder), threshold, examples
        # normal images count as defect-free only where the data set has masks at all
        self.has_masks = any(s.mask_path is not None for s in samples)
        self.localisation = Localisation()
        self.examples: list = []  # overlays of anomalous images with masks, for the plot

    def add(self, sample, score: float, heatmap: np.ndarray) -> tuple[int, int]:
        """Write the sample's overlay; returns its peak (x, y) in the image's pixels."""
        image = load_rgb_uint8(sample.path)  # at its own size, EXIF orientation applied
        height, width = image.shape[:2]
        peak_xy = peak(heatmap, width, height)
        mask = load_mask(sample.mask_path) if sample.mask_path is not None else None
        verdict = "impurity" if score >= self.threshold else "normal"
        picture = overlay(image, heatmap, f"{score:.3f} {verdict}", peak_xy, mask)
        path = overlay_path(self.folder, sample.image_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        picture.save(path, compress_level=1)  # overlays are many; small files matter less
        if mask is not None or (self.has_masks and sample.label == 0):
            self.localisation.add(heatmap, mask, peak_xy, width, height)
            if mask is not None and mask.any() and len(self.examples) < self.wanted:
                self.examples.append(picture)
        return peak_xy
