"""Images, manifests, datasets and metrics shared by training, validation and inference.

One preprocessing path for every script, with parity to the original Keras pipeline
(cv2.imread -> cv2.resize(INTER_CUBIC) -> RGB -> /255):

    file -> load_rgb_uint8 (Pillow, EXIF orientation, any mode -> 8-bit RGB)
         -> resize_cubic_uint8 (OpenCV INTER_CUBIC on uint8, within 1 grey level)
         -> preprocess_image: float32 (3,S,S) in [0,1]; normalisation happens inside the model.

Manifests are the original CSV files: `image_path` (relative to an images folder) and
`impurity` (0 = normal, 1 = anomaly; `label` is accepted too).
"""
from __future__ import annotations

import csv
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from model_pytorch_directml import CRBLError

# What a folder scan picks up (case-insensitive). Extensions of image formats Pillow cannot
# decode are listed too, so such files get an error row instead of silently vanishing.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".jpe", ".bmp", ".dib", ".tif", ".tiff", ".webp",
                    ".gif", ".ppm", ".pgm", ".pbm", ".pnm", ".jp2", ".j2k", ".tga", ".ico")
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".svg", ".psd", ".raw", ".cr2",
                                ".nef", ".arw", ".dng", ".jxl", ".exr", ".hdr")
LABEL_COLUMNS = ("impurity", "label")


class ImageError(CRBLError):
    """One image cannot be used; `reason` is the message without the path (for CSV rows)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# --------------------------------------------------------------------------------------------
# Decoding and resizing
# --------------------------------------------------------------------------------------------

def _open_decoded(path: Path):
    """Pillow image fully decoded, EXIF orientation applied; ImageError for every bad file."""
    from PIL import Image, ImageOps
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise ImageError(path, "file not found") from None
    except OSError as exc:
        raise ImageError(path, f"cannot read file ({exc.strerror or type(exc).__name__})") from None
    if path.is_dir():
        raise ImageError(path, "is a folder, not an image file")
    if size == 0:
        raise ImageError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a decompression bomb
            # that size still takes GBs of memory per DataLoader worker, so refuse it too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # palette-transparency notes etc.
            with Image.open(path) as im:
                im.load()  # decoded pixels stay valid after the file is closed
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(path, f"image too large (over {Image.MAX_IMAGE_PIXELS} pixels, "
                               "possible decompression bomb); downscale it first") from None
    except Image.UnidentifiedImageError:
        raise ImageError(path, "not an image, or an image format Pillow cannot read "
                               "(convert it to PNG or JPEG)") from None
    except Exception as exc:  # untrusted bytes: Pillow raises OSError, SyntaxError, struct.error...
        detail = str(exc).splitlines()[0][:120] if str(exc) else ""
        raise ImageError(path, f"corrupt or truncated image data ({type(exc).__name__}: {detail})") from None
    try:
        # cv2.imread (the original loader) applies the EXIF orientation tag.
        im = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block: OpenCV ignores it as well
        pass
    return im


def load_rgb_uint8(path: str | os.PathLike) -> np.ndarray:
    """Decode any image file to (H,W,3) uint8 RGB like cv2.imread(IMREAD_COLOR) (then BGR->RGB).

    Grayscale, palette, 1-bit, LA/RGBA (alpha dropped, colours kept as stored) and CMYK become
    RGB; 16-bit samples keep their high byte, as OpenCV's `>> 8` conversion does.
    """
    path = Path(path)
    im = _open_decoded(path)
    if im.mode.startswith("I;16") or im.mode == "I":
        grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode == "F":  # OpenCV converts float samples to 8 bit by saturation, no scaling
        grey = np.asarray(im).clip(0, 255).round().astype(np.uint8)
        return np.ascontiguousarray(np.repeat(grey[:, :, None], 3, axis=2))
    if im.mode != "RGB":
        try:
            im = im.convert("RGB")
        except ValueError as exc:
            raise ImageError(path, f"unsupported colour mode {im.mode} ({exc})") from None
    return np.array(im, dtype=np.uint8)


def resize_cubic_uint8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC) on uint8, within 1 grey level.

    Both use Keys' cubic with a = -0.75, half-pixel centres, replicated borders and no
    antialiasing when shrinking; OpenCV's fixed-point weights cause the rare 1-level
    differences. An image already at the target size is returned unchanged, so pixels of such
    images reach the model exactly as Keras saw them.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (height, width):
        return img
    x = torch.from_numpy(np.ascontiguousarray(img))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x.float(), size=(height, width), mode="bicubic", align_corners=False,
                      antialias=False)
    y = y.round_().clamp_(0, 255).to(torch.uint8)[0]
    return (y[0] if img.ndim == 2 else y.permute(1, 2, 0)).contiguous().numpy()


def preprocess_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """THE preprocessing of CRBL-PyTorch: float32 (3,S,S) RGB in [0,1] = uint8 / 255."""
    img = resize_cubic_uint8(load_rgb_uint8(path), image_size)
    return torch.from_numpy(img).permute(2, 0, 1).float().div_(255.0)


# --------------------------------------------------------------------------------------------
# Inputs: manifests and folders
# --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    path: Path          # where the file is read from
    image_path: str     # as the user wrote it (CSV) or relative to the scanned folder
    label: int | None   # 0 normal, 1 anomaly, None unknown


def _parse_label(value: str, where: str, column: str, required: bool) -> int | None:
    text = (value or "").strip()
    if not text and not required:
        return None
    try:
        number = float(text)
    except ValueError:
        number = math.nan
    if number not in (0.0, 1.0):
        raise CRBLError(f"{where}: column '{column}' must be 0 (normal) or 1 (anomaly), got "
                        f"{text!r}; fix that row")
    return int(number)


def _read_csv_rows(csv_path: Path) -> list[dict]:
    raw = csv_path.read_bytes()
    # Excel writes UTF-8 with a BOM, or the ANSI code page (cp949 on Korean Windows).
    for encoding in ("utf-8-sig", "cp949"):
        try:
            text = raw.decode(encoding)
            break
        except UnicodeDecodeError:
            continue
    else:
        raise CRBLError(f"{csv_path}: not UTF-8 or CP949 text; save the CSV as UTF-8")
    return list(csv.DictReader(text.splitlines()))


def read_manifest(csv_path: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                  require_label: bool = False) -> list[Sample]:
    """Samples of a CSV with `image_path` and optional `impurity`/`label` (0/1).

    Paths are relative to image_dir (default: the CSV's folder) unless absolute. Files are not
    checked here: inference reports a missing file in its row, training decides for itself.
    """
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise CRBLError(f"{csv_path}: manifest CSV not found")
    rows = _read_csv_rows(csv_path)
    if not rows:
        raise CRBLError(f"{csv_path}: no rows; a manifest needs a header 'image_path,impurity' "
                        "and one row per image")
    columns = [c.strip() for c in rows[0].keys() if c is not None]
    if "image_path" not in columns:
        raise CRBLError(f"{csv_path}: no 'image_path' column (found {columns}); add a header "
                        "row 'image_path,impurity'")
    label_column = next((c for c in LABEL_COLUMNS if c in columns), None)
    if require_label and label_column is None:
        raise CRBLError(f"{csv_path}: no 'impurity' (or 'label') column with 0/1 labels; add it")
    root = Path(image_dir) if image_dir is not None else csv_path.parent
    samples = []
    for row_number, row in enumerate(rows, start=2):  # row 1 is the header
        row = {(k or "").strip(): v for k, v in row.items()}
        where = f"{csv_path} row {row_number}"
        image_path = (row.get("image_path") or "").strip()
        if not image_path:
            raise CRBLError(f"{where}: column 'image_path' is empty; fill it or delete the row")
        label = (_parse_label(row.get(label_column), where, label_column, require_label)
                 if label_column else None)
        samples.append(Sample(root / image_path, image_path, label))
    return samples


def scan_folder(folder: str | os.PathLike) -> tuple[list[Sample], int]:
    """Image files under folder (recursive, sorted), and how many other files were skipped.

    Hidden files and folders (".*", e.g. macOS "._x.jpg" resource forks) are skipped.
    """
    folder = Path(folder)
    samples, skipped = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            suffix = os.path.splitext(name)[1].lower()
            if name.startswith(".") or suffix not in IMAGE_EXTENSIONS + UNSUPPORTED_IMAGE_EXTENSIONS:
                skipped += 1
                continue
            path = Path(dirpath) / name
            samples.append(Sample(path, path.relative_to(folder).as_posix(), None))
    samples.sort(key=lambda s: s.path.relative_to(folder).parts)  # folder by folder, like `ls -R`
    return samples, skipped


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class TestDataset(Dataset):
    """Inference/validation items `(image (3,S,S), index, error)`: a bad image yields zeros and
    the reason instead of raising, so one broken file never kills a batch."""
    __test__ = False  # not a pytest test class

    def __init__(self, samples: Sequence[Sample], image_size: int):
        self.samples, self.image_size = list(samples), int(image_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = preprocess_image(self.samples[index].path, self.image_size)
        except ImageError as exc:
            return torch.zeros(3, self.image_size, self.image_size), index, exc.reason
        return image, index, ""


def worker_init(_worker_id: int) -> None:
    # Each DataLoader worker decodes one image at a time; torch's default intra-op threads per
    # worker would oversubscribe the cores the model needs.
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------
# Metrics (inference and training validation)
# --------------------------------------------------------------------------------------------

def compute_metrics(labels: Sequence[int], scores: Sequence[float], threshold: float) -> dict:
    """Accuracy, precision, recall, F1, AUROC, AP and the confusion matrix at `threshold`.

    prediction = score >= threshold. AUROC/AP are None when only one class is present.
    """
    from sklearn.metrics import average_precision_score, roc_auc_score
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    pred = (s >= threshold).astype(np.int64)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    both_classes = len(np.unique(y)) == 2
    return {
        "n": int(len(y)), "positives": int((y == 1).sum()), "threshold": float(threshold),
        "accuracy": (tp + tn) / len(y) if len(y) else 0.0,
        "precision": precision, "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "auroc": float(roc_auc_score(y, s)) if both_classes else None,
        "ap": float(average_precision_score(y, s)) if both_classes else None,
        # rows = true class (0 normal, 1 anomaly), columns = predicted class, as sklearn
        "confusion_matrix": [[tn, fp], [fn, tp]],
    }


def save_metric_plots(labels: Sequence[int], scores: Sequence[float], threshold: float,
                      prefix: str | os.PathLike) -> list[Path]:
    """ROC curve, PR curve and score histogram as `<prefix>_roc.png`, `_pr.png`, `_hist.png`."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    prefix = Path(prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, suffix):
        path = prefix.with_name(f"{prefix.name}_{suffix}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC")
        save(fig, "roc")
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(recall, precision)
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall")
        save(fig, "pr")
    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0, 1, 51)
    for cls, name in ((0, "normal (0)"), (1, "anomaly (1)")):
        if (y == cls).any():
            ax.hist(s[y == cls], bins=bins, alpha=0.6, label=name)
    ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="score", ylabel="images", title="Score histogram")
    ax.legend()
    save(fig, "hist")
    return written
