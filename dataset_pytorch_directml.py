"""Images, manifests, datasets and metrics shared by training, validation and inference.

One preprocessing path for every script, with parity to the original Keras pipeline
(cv2.imread -> cv2.resize(INTER_CUBIC) -> RGB -> /255):

    file -> load_rgb_uint8 (PNG: OpenCV; else Pillow; EXIF orientation, any mode -> 8-bit RGB)
         -> resize_cubic_uint8 (OpenCV's INTER_CUBIC itself; without OpenCV, torch within 1 grey level)
         -> preprocess_image: float32 (3,S,S) in [0,1]; normalisation happens inside the model.

Manifests are the original CSV files: `image_path` (relative to an images folder) and
`impurity` (0 = normal, 1 = anomaly; `label` is accepted too).
"""
from __future__ import annotations

import contextlib
import csv
import functools
import math
import os
import re
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, get_worker_info

from fast_paths_pytorch_directml import thread_pool
from model_pytorch_directml import CRBLError

# A folder scan picks up every extension the installed Pillow decodes (image_extensions), plus:
# formats OpenCV reads and Pillow does not (Radiance HDR, OpenEXR where OpenCV has it, ...),
# decoded by OpenCV as the original cv2.imread loader did;
OPENCV_EXTENSIONS = (".hdr", ".pic", ".exr", ".sr", ".ras", ".pxm", ".pfm")
# and image formats neither reads here, so such files get an error row saying so instead of
# silently vanishing.
UNSUPPORTED_IMAGE_EXTENSIONS = (".heic", ".heif", ".avif", ".avifs", ".svg", ".raw", ".cr2",
                                ".cr3", ".nef", ".arw", ".dng", ".orf", ".rw2", ".jxl", ".exr")
# Pillow formats that identify a file but hold no picture to decode (video; the HDF5, BUFR,
# GRIB and WMF stubs are recognised by their class).
NOT_PICTURE_FORMATS = ("MPEG",)
# Formats Pillow opens through another format's plugin (camera .mpo files are JPEGs).
PILLOW_OPENED_AS = {"MPO": "JPEG"}
LABEL_COLUMNS = ("impurity", "label")


class ImageError(CRBLError):
    """One image cannot be used; `reason` is the message without the path (for CSV rows)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


# --------------------------------------------------------------------------------------------
# Decoding and resizing
# --------------------------------------------------------------------------------------------

def _check_file(path: Path) -> None:
    """ImageError unless path is a non-empty file."""
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


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the last chunk of every complete PNG


def _decode_png_opencv(path: Path) -> np.ndarray | None:
    """(H,W,3) uint8 RGB of a PNG by cv2.imdecode, the original loader's own decoder and
    faster than Pillow plus its array copy; None where Pillow should decode the file instead:
    not a PNG, no OpenCV, over Pillow's pixel limit, no IEND chunk at the end (truncated), or
    an OpenCV decode error (libpng prints one line; Pillow then says what is wrong)."""
    cv2 = _opencv()
    if cv2 is None:
        return None
    from PIL import Image
    try:
        with open(path, "rb") as f:
            head = f.read(24)
            if head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
                return None
            width, height = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                return None  # Pillow refuses it with the decompression-bomb message
            f.seek(0)
            data = np.fromfile(f, dtype=np.uint8)
    except OSError:
        return None
    if data[-12:].tobytes() != _PNG_IEND:
        return None
    # IMREAD_COLOR as cv2.imread: EXIF orientation applied, grey/palette/alpha/16-bit -> 8-bit BGR.
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


# --------------------------------------------------------------------------------------------
# What decoders say about a file: Python warnings and C libraries' stderr, kept for its row
# --------------------------------------------------------------------------------------------

class _CStderrCapture:
    """fd 2 goes to a temporary file while a decode runs in this process, so what libtiff,
    libpng (inside OpenCV) or libjpeg print about one file can go into that file's row instead
    of the terminal.

    fd 2 is one per process, not per thread: decoding threads share one redirection (counted),
    and the bytes written during a decode belong to it only if no other decode ran meanwhile.
    When they came during an overlap, the caller decodes that file again alone (exclusive):
    decoders say the same about the same bytes. POSIX only (os.pread); on Windows the C
    runtime of each DLL keeps its own stderr, so fd 2 would not catch them anyway."""

    def __init__(self):
        self._reset()
        if hasattr(os, "register_at_fork"):
            # A forked DataLoader worker starts with no decode running and a file of its own.
            os.register_at_fork(after_in_child=self._reset)

    def _reset(self):
        self.cond = threading.Condition()
        self.fd, self.saved = None, None
        self.active = self.started = 0
        self.exclusive = self.exclusive_waiting = False

    @contextlib.contextmanager
    def __call__(self, exclusive: bool = False):
        result = {"text": "", "alone": True}
        if not hasattr(os, "pread"):
            yield result
            return
        with self.cond:
            if self.fd is None:
                handle, name = tempfile.mkstemp(prefix="crbl-decoder-")
                # O_APPEND: C libraries write at the end even after the file was emptied.
                self.fd = os.open(name, os.O_RDWR | os.O_APPEND)
                os.close(handle)
                os.unlink(name)
            self.exclusive_waiting |= exclusive
            while (self.exclusive or (self.exclusive_waiting and not exclusive)
                   or (exclusive and self.active)):
                self.cond.wait()
            if exclusive:
                self.exclusive, self.exclusive_waiting = True, False
            if self.active == 0:
                sys.stderr.flush()
                try:
                    self.saved = os.dup(2)
                    os.dup2(self.fd, 2)
                except OSError:  # no fd 2 (a daemon closed it): nothing to keep off a terminal
                    self.saved = None
            self.active += 1
            self.started += 1
            ticket, alone, start = self.started, self.active == 1, os.fstat(self.fd).st_size
        try:
            yield result
        finally:
            with self.cond:
                end = os.fstat(self.fd).st_size
                result["alone"] = alone and self.started == ticket
                result["text"] = os.pread(self.fd, end - start, start).decode("utf-8", "replace")
                self.active -= 1
                self.exclusive = self.exclusive and not exclusive
                if self.active == 0:
                    if self.saved is not None:
                        os.dup2(self.saved, 2)
                        os.close(self.saved)
                    os.ftruncate(self.fd, 0)  # O_APPEND: the next writes start at 0 again
                self.cond.notify_all()


_c_stderr = _CStderrCapture()


def _decode_with_messages(decode):
    """decode() -> result, run with the C libraries' stderr captured; returns (result, text).
    Decoded once more alone when another thread decoded at the same time and something was
    printed, so that the text is this file's own."""
    with _c_stderr() as captured:
        result = decode()
    if captured["text"] and not captured["alone"]:
        with _c_stderr(exclusive=True) as captured:
            result = decode()
    return result, captured["text"]


def _messages(warned: list[str], c_text: str, limit: int = 5) -> list[str]:
    """One short line per distinct message, at most `limit` (then how many more)."""
    lines = []
    for line in [*warned, *c_text.splitlines()]:
        # Pillow hands files to libtiff under the name "tempfile.tif"; the row names the file.
        line = line.strip().removeprefix("tempfile.tif: ")[:160]
        if line and line not in lines:
            lines.append(line)
    return lines[:limit] + ([f"... {len(lines) - limit} more"] if len(lines) > limit else [])


# --------------------------------------------------------------------------------------------
# Which decoder: Pillow's formats in a fixed order, OpenCV for what Pillow does not know
# --------------------------------------------------------------------------------------------

_PILLOW_ORDER: tuple[str, ...] = ()


def _pillow_formats(path: Path) -> tuple[str, ...]:
    """The Pillow formats to try for path, in an order that depends on the file alone.

    Pillow tries its formats in the order their plugins were imported, and imports a plugin the
    first time a file with its extension is opened: after one .tga, TGA (which has no signature
    check) came before ICO and claimed valid .ico files as 32 x 19140 images. So every plugin is
    imported up front (Image.init) and the order is fixed here: formats that check a signature
    first, the file's own extension's format leading, then the few that accept any bytes."""
    global _PILLOW_ORDER
    from PIL import Image
    if not _PILLOW_ORDER:
        Image.init()
        checked = sorted(f for f in Image.ID if Image.OPEN[f][1] is not None)
        _PILLOW_ORDER = tuple(checked + sorted(f for f in Image.ID if Image.OPEN[f][1] is None))
    own = Image.registered_extensions().get(path.suffix.lower())
    if own not in _PILLOW_ORDER:
        return _PILLOW_ORDER
    rest = [f for f in _PILLOW_ORDER if f != own]
    if Image.OPEN[own][1] is None:  # e.g. TGA: only after every format with a signature
        at = len([f for f in rest if Image.OPEN[f][1] is not None])
        return tuple(rest[:at] + [own] + rest[at:])
    return (own, *rest)


_PILLOW_WARNINGS_LOCK = threading.Lock()


def _pillow_decode(path: Path, warned: list[str]):
    """Pillow image fully decoded, EXIF orientation applied; Pillow's exceptions propagate.
    Its warnings about the file (e.g. "Corrupt EXIF data") are appended to `warned`."""
    from PIL import Image, ImageOps
    # catch_warnings swaps the process-wide filter list: one decoding thread at a time.
    with _PILLOW_WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", DeprecationWarning)  # about Pillow's API, not the file
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; a decompression bomb
        # that size still takes GBs of memory per DataLoader worker, so refuse it too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path, "r", _pillow_formats(path)) as im:
                im.load()  # decoded pixels stay valid after the file is closed
            try:
                # cv2.imread (the original loader) applies the EXIF orientation tag.
                im = ImageOps.exif_transpose(im)
            except Exception as exc:  # a broken EXIF block: OpenCV ignores it as well
                warnings.warn(f"EXIF orientation not applied ({type(exc).__name__}: {exc})")
        finally:
            warned += [str(w.message).splitlines()[0] for w in caught if str(w.message)]
    return im


def _pillow_to_rgb(im, path: Path) -> np.ndarray:
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


# Signatures of formats OpenCV reads and Pillow does not: Radiance HDR (.hdr, .pic), OpenEXR.
OPENCV_ONLY_SIGNATURES = (b"#?RADIANCE", b"#?RGBE", b"v/1\x01")


def _decode_opencv_any(path: Path) -> np.ndarray | None:
    """(H,W,3) RGB by cv2.imdecode for a format only OpenCV reads (what the original cv2.imread
    loader read); None if it cannot. Not for anything else Pillow rejects: OpenCV returns an
    image even when its libtiff says it cannot decode the strips."""
    cv2 = _opencv()
    if cv2 is None or not _head(path, 16).startswith(OPENCV_ONLY_SIGNATURES):
        return None
    try:
        bgr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_COLOR)
    except cv2.error:
        return None
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def _decode(path: Path) -> tuple[np.ndarray | None, BaseException | None, list[str]]:
    """(RGB or None, the exception that stopped it or None, Python warnings) of one attempt."""
    from PIL import Image
    warned: list[str] = []
    try:
        rgb = _decode_png_opencv(path)
        if rgb is None:
            try:
                rgb = _pillow_to_rgb(_pillow_decode(path, warned), path)
            except Image.UnidentifiedImageError:
                rgb = _decode_opencv_any(path)
                if rgb is None:
                    raise
        return rgb, None, warned
    except Exception as exc:  # untrusted bytes: Pillow raises OSError, SyntaxError, struct.error...
        return None, exc, warned


def load_rgb_uint8(path: str | os.PathLike, notes: list[str] | None = None) -> np.ndarray:
    """Decode any image file to (H,W,3) uint8 RGB like cv2.imread(IMREAD_COLOR) (then BGR->RGB):
    complete PNGs by OpenCV itself where it is installed, everything else by Pillow, and what
    Pillow does not recognise by OpenCV again.

    Grayscale, palette, 1-bit, LA/RGBA (alpha dropped, colours kept as stored) and CMYK become
    RGB; 16-bit samples keep their high byte, as OpenCV's `>> 8` conversion does.
    What the decoders warned or printed about the file is appended to `notes`; for a file that
    cannot be used it is part of the ImageError's reason.
    """
    path = Path(path)
    _check_file(path)
    (rgb, exc, warned), c_text = _decode_with_messages(lambda: _decode(path))
    messages = _messages(warned, c_text)
    if exc is not None:
        if isinstance(exc, ImageError):
            raise exc
        reason = explain_failure(path, exc, c_text)
        if messages:
            reason += f" [decoder said: {'; '.join(messages)}]"
        raise ImageError(path, reason) from None
    if notes is not None:
        notes += messages
    return rgb


# --------------------------------------------------------------------------------------------
# Why a file cannot be used, in words a user can act on
# --------------------------------------------------------------------------------------------

# TIFF compression codes (libtiff's tiff.h) that libtiff may be built without, or never reads.
TIFF_COMPRESSIONS = {5: "LZW", 6: "old-style JPEG", 7: "JPEG", 8: "Deflate", 9: "JBIG (T.85)",
                     10: "JBIG2 (T.43)", 32946: "Deflate", 34661: "JBIG", 34676: "SGILog",
                     34677: "SGILog24", 34712: "JPEG 2000", 34887: "LERC", 34925: "LZMA",
                     50000: "Zstandard", 50001: "WebP", 50002: "JPEG XL"}
CONVERT_HINT = "convert it to PNG or JPEG"


def explain_failure(path: Path, exc: BaseException, c_text: str = "") -> str:
    """The reason a decoder gave up on path, naming a missing codec or library as that and
    saying what the file is when it is not an image at all."""
    from PIL import Image
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return (f"image too large (over {Image.MAX_IMAGE_PIXELS} pixels, possible decompression "
                "bomb); downscale it first")
    detail = str(exc).splitlines()[0][:120] if str(exc) else ""
    head = _head(path)
    said = f"{detail} {c_text}".lower()
    if "ghostscript" in said:
        return ("EPS/PostScript image: Pillow reads it through Ghostscript, which is not "
                "installed; install Ghostscript (gs on the PATH; Windows: gswin64c) or " + CONVERT_HINT)
    if head[:4] in (b"II*\0", b"MM\0*"):
        missing = _tiff_missing_codec(path, said)
        if missing:
            return missing
    if isinstance(exc, Image.UnidentifiedImageError):
        return not_an_image(head)
    if kind := _document_kind(head):  # e.g. HDF5: Pillow identifies it, with a stub and no decoder
        return f"not an image: the file is {kind}"
    stub = re.match(r"cannot find loader for this (\S+) file", detail)
    if stub:
        return (f"a {stub.group(1)} file: Pillow identifies the format but has no decoder for it "
                f"here; {CONVERT_HINT}")
    return f"corrupt or truncated image data ({type(exc).__name__}: {detail})"


def _head(path: Path, size: int = 512) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(size)
    except OSError:
        return b""


def _tiff_missing_codec(path: Path, said: str) -> str | None:
    """A TIFF's compression as the cause, when libtiff said it lacks the codec or Pillow does
    not know the compression at all; None when the file is simply damaged."""
    from PIL import TiffImagePlugin
    try:
        with open(path, "rb") as f:
            ifd = TiffImagePlugin.ImageFileDirectory_v2(f.read(8))
            f.seek(ifd.next)
            ifd.load(f)
        code = int(ifd.get(259, 1))
    except Exception:
        return None
    name = TIFF_COMPRESSIONS.get(code, f"code {code}")
    if "not configured" in said or "not implemented" in said or "unknown compression" in said:
        # libtiff: "WEBP compression support is not configured."
        return (f"TIFF with {name} compression: the libtiff inside the installed Pillow was built "
                f"without the {name} codec (the file itself may be fine); {CONVERT_HINT} with a "
                "program that reads it, or install a Pillow build whose libtiff has it")
    if code not in TiffImagePlugin.COMPRESSION_INFO:
        return (f"TIFF with {name} compression, which Pillow does not support (the file itself "
                f"may be fine); {CONVERT_HINT} with a program that reads it")
    return None


def _document_kind(head: bytes) -> str | None:
    """What a file that is no image is, from its signature; None if it has none of these."""
    documents = ((head[:5] == b"%PDF-", "a PDF document"),
                 (head[:4] == b"PK\x03\x04", "a ZIP archive (or an Office document)"),
                 (head[:2] == b"\x1f\x8b", "a gzip archive"),
                 (head[:4] == b"Rar!" or head[:6] == b"7z\xbc\xaf\x27\x1c", "a RAR/7-Zip archive"),
                 (head[4:8] == b"ftyp" and head[8:12] not in _ISO_IMAGE_BRANDS,
                  "an MP4/QuickTime video or other ISO media file"),
                 (head[:4] == b"\x89HDF", "an HDF5 file (Keras weights?)"))
    return next((what for found, what in documents if found), None)


_ISO_IMAGE_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1", b"avif", b"avis")


def not_an_image(head: bytes) -> str:
    """What a file Pillow and OpenCV do not recognise is, from its first bytes, if easy to tell."""
    brand = head[8:12] if head[4:8] == b"ftyp" else b""
    images = (
        (brand in _ISO_IMAGE_BRANDS[:7], "HEIC/HEIF image (iPhone photos)", "install pillow-heif, or "),
        (brand in (b"avif", b"avis"), "AVIF image", "install a Pillow with AVIF support, or "),
        (head[:2] == b"\xff\x0a" or head[4:12] == b"JXL \r\n\x87\n", "JPEG XL image", ""),
        (head[:4] == b"v/1\x01", "OpenEXR image", "install an OpenCV built with OpenEXR, or "),
        (head.startswith((b"#?RADIANCE", b"#?RGBE")), "Radiance HDR image", ""),
    )
    for found, what, fix in images:
        if found:
            return f"{what}, which the installed Pillow and OpenCV cannot read; {fix}{CONVERT_HINT}"
    what = _document_kind(head)
    if what is None and head and b"\0" not in head:
        text = head.decode("utf-8", "replace").lstrip("\ufeff").lstrip().lower()
        if text.startswith(("<!doctype html", "<html")):
            what = "an HTML page (a web page saved under an image name?)"
        elif "<svg" in text:
            what = "an SVG drawing (vector graphics); rasterise it to PNG first"
        elif text.startswith("<?xml"):
            what = "an XML file"
        elif sum(c.isprintable() or c in "\r\n\t" for c in text) >= 0.95 * len(text):
            what = "a text file"
    if what is not None:
        return f"not an image: the file is {what}"
    return f"not an image, or an image format Pillow and OpenCV cannot read ({CONVERT_HINT})"


def resize_cubic_uint8(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """cv2.resize(img, (w, h), interpolation=cv2.INTER_CUBIC) on uint8: OpenCV itself where it is
    installed (requirements_directml.txt installs it), else torch's bicubic within 1 grey level
    (resize_cubic_uint8_torch), which is several times slower.

    An image already at the target size is returned unchanged, so pixels of such images reach
    the model exactly as Keras saw them.
    """
    height, width = (size, size) if isinstance(size, int) else size
    if img.shape[:2] == (height, width):
        return img
    cv2 = _opencv()
    if cv2 is None:
        return resize_cubic_uint8_torch(img, (height, width))
    return cv2.resize(np.ascontiguousarray(img), (width, height), interpolation=cv2.INTER_CUBIC)


def resize_cubic_uint8_torch(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV's INTER_CUBIC in torch ops, within 1 grey level: both use Keys' cubic with
    a = -0.75, half-pixel centres, replicated borders and no antialiasing when shrinking;
    OpenCV's fixed-point weights cause the rare 1-level differences."""
    x = torch.from_numpy(np.ascontiguousarray(img))
    x = x[None, None] if x.ndim == 2 else x.permute(2, 0, 1)[None]
    y = F.interpolate(x.float(), size=size, mode="bicubic", align_corners=False, antialias=False)
    y = y.round_().clamp_(0, 255).to(torch.uint8)[0]
    return (y[0] if img.ndim == 2 else y.permute(1, 2, 0)).contiguous().numpy()


_cv2: Any = None  # the cv2 module once imported; False: not available


def _opencv():
    """cv2, or None where OpenCV is not installed or does not import (one warning says why)."""
    global _cv2
    if _cv2 is None:
        try:
            import cv2
            _cv2 = cv2
        except Exception as exc:  # a broken install: missing libGL (non-headless wheel), numpy ABI
            _cv2 = False
            if not (isinstance(exc, ModuleNotFoundError) and exc.name == "cv2"):
                warnings.warn(f"OpenCV does not import ({type(exc).__name__}: {exc}); images are "
                              "resized by torch instead, within 1 grey level of OpenCV. Reinstall "
                              "opencv-python-headless to fix it", RuntimeWarning, stacklevel=3)
    return _cv2 or None


def preprocess_image(path: str | os.PathLike, image_size: int, notes: list[str] | None = None
                     ) -> torch.Tensor:
    """THE preprocessing of CRBL-PyTorch: float32 (3,S,S) RGB in [0,1] = uint8 / 255 (a view of
    the (S,S,3) array, as torch's `.permute(2, 0, 1).float()` gives it). What the decoders said
    about the file is appended to `notes` (load_rgb_uint8)."""
    img = resize_cubic_uint8(load_rgb_uint8(path, notes), image_size)
    # numpy's float32 division equals torch's bit for bit (all 256 values) and, in a decoding
    # thread, runs without the GIL and without an OpenMP team of its own.
    return torch.from_numpy(np.divide(img, np.float32(255.0), dtype=np.float32)).permute(2, 0, 1)


# --------------------------------------------------------------------------------------------
# Inputs: manifests and folders
# --------------------------------------------------------------------------------------------

@dataclass
class Sample:
    path: Path          # where the file is read from
    image_path: str     # as the user wrote it (CSV) or relative to the scanned folder
    label: int | None   # 0 normal, 1 anomaly, None unknown
    mask_path: Path | None = None  # defect mask (non-zero = defect), where ground truth exists


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
                  require_label: bool = False, masks: bool = False) -> list[Sample]:
    """Samples of a CSV with `image_path`, optional `impurity`/`label` (0/1) and optional
    `mask_path` (a defect mask, empty for normal images; read only with masks=True, training
    ignores the column).

    Paths are relative to image_dir (default: the CSV's folder) unless absolute. Image files are
    not checked here: inference reports a missing file in its row, training decides for itself.
    A mask named but missing is an error: the pixel metrics would otherwise drop it silently.
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
        mask = (row.get("mask_path") or "").strip() if masks else ""
        if mask and not (root / mask).is_file():
            raise CRBLError(f"{where}: column 'mask_path' names {root / mask}, which does not "
                            "exist; fix the path or leave the cell empty")
        samples.append(Sample(root / image_path, image_path, label, root / mask if mask else None))
    return samples


def _pillow_decodes(fmt: str) -> bool:
    from PIL import Image, ImageFile
    factory = Image.OPEN.get(PILLOW_OPENED_AS.get(fmt, fmt), (None,))[0]
    stub = isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile)
    return factory is not None and not stub and fmt not in NOT_PICTURE_FORMATS


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case extensions a folder scan picks up: every one the installed Pillow decodes
    (.mpo, .dds, .qoi, .pcx, .sgi/.rgb/.bw, .blp, .icns, .cur, .xpm, .fli/.flc, .apng, ...),
    OPENCV_EXTENSIONS and UNSUPPORTED_IMAGE_EXTENSIONS."""
    from PIL import Image
    Image.init()
    pillow = {ext for ext, fmt in Image.registered_extensions().items() if _pillow_decodes(fmt)}
    return frozenset(pillow | set(OPENCV_EXTENSIONS) | set(UNSUPPORTED_IMAGE_EXTENSIONS))


def _skip_reason(name: str) -> str | None:
    """Why a folder scan leaves this file name out, or None to pick it up."""
    from PIL import Image
    if name.startswith("."):
        return "hidden file"
    suffix = os.path.splitext(name)[1].lower()
    if suffix in image_extensions():
        return None
    fmt = Image.registered_extensions().get(suffix)
    if fmt is not None:
        return f"{suffix}: a {fmt} file, which Pillow identifies but cannot decode here"
    return f"{suffix or 'no extension'}: not an image extension"


def scan_folder(folder: str | os.PathLike) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Image files under folder (recursive, sorted), and every file left out as
    (path relative to folder, reason): other extensions, hidden files ("._x.jpg" macOS
    resource forks) and hidden folders, which are not searched (".git/" is one entry)."""
    folder = Path(folder)
    samples, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        skipped += [((here / d).relative_to(folder).as_posix() + "/", "hidden folder, not searched")
                    for d in sorted(dirnames) if d.startswith(".")]
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            relative = (here / name).relative_to(folder)
            reason = _skip_reason(name)
            if reason is None:
                samples.append(Sample(here / name, relative.as_posix(), None))
            else:
                skipped.append((relative.as_posix(), reason))
    samples.sort(key=lambda s: s.path.relative_to(folder).parts)  # folder by folder, like `ls -R`
    return samples, skipped


def describe_skipped(skipped: Sequence[tuple[str, str]], examples: int = 3) -> str:
    """One line per reason: how many files, and a few of their names."""
    by_reason: dict[str, list[str]] = {}
    for path, reason in skipped:
        by_reason.setdefault(reason, []).append(path)
    lines = []
    for reason, paths in sorted(by_reason.items(), key=lambda item: -len(item[1])):
        more = f" and {len(paths) - examples} more" if len(paths) > examples else ""
        lines.append(f"  {len(paths)} × {reason} (e.g. {', '.join(paths[:examples])}{more})")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

class TestDataset(Dataset):
    """Inference/validation items `(image (3,S,S), index, error)`: a bad image yields zeros and
    the reason instead of raising, so one broken file never kills a batch. With `notes`, items
    are `(image, index, error, note)`: note is what the decoders said about a usable file."""
    __test__ = False  # not a pytest test class

    def __init__(self, samples: Sequence[Sample], image_size: int, notes: bool = False):
        self.samples, self.image_size, self.notes = list(samples), int(image_size), notes

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple:
        notes: list[str] = []
        try:
            image = preprocess_image(self.samples[index].path, self.image_size, notes)
            error = ""
        except ImageError as exc:
            image, error = torch.zeros(3, self.image_size, self.image_size), exc.reason
        return (image, index, error, "; ".join(notes)) if self.notes else (image, index, error)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int, str]]:
        """A batch's items (DataLoader asks for them at once). Without worker processes, as on the
        CPU, one thread per intra-op core decodes them: OpenCV and numpy release the GIL, so the
        decoding between two forwards uses every core the model uses instead of one."""
        threads = min(len(indices), torch.get_num_threads())
        if threads <= 1 or get_worker_info() is not None:  # a DataLoader worker: one image at a time
            return [self[i] for i in indices]
        return list(_decode_pool(threads).map(self.__getitem__, indices))


def _decode_pool(threads: int) -> ThreadPoolExecutor:
    return thread_pool("crbl-decode", threads)


def before_workers_start() -> None:
    """Call before DataLoader worker processes start: OpenCV on one thread in this process,
    so that forked workers inherit that. cv2.setNumThreads in a forked worker can wait forever
    on a lock of the parent's OpenCV thread pool (seen in the test suite); in the parent it is
    safe. The parent decodes nothing while workers do."""
    cv2 = _opencv()
    if cv2 is not None:
        cv2.setNumThreads(1)


def worker_init(_worker_id: int, below_model: bool = False) -> None:
    """DataLoader worker_init_fn; below_model (the CPU runs the model): lowest priority.

    Each worker decodes and resizes one image at a time on one thread: torch's and OpenCV's
    default thread pools per worker oversubscribed the cores the model needs (several times
    slower than no workers at all on a 2-core machine). On the CPU the
    model's OpenMP threads need every core at once: a worker that takes one of them stalls the
    other at the next barrier, so there workers only get what the model leaves idle (nice 19).
    """
    torch.set_num_threads(1)
    cv2 = _opencv()
    if cv2 is not None and cv2.getNumThreads() != 1:  # a spawned worker (Windows, macOS)
        cv2.setNumThreads(1)
    if below_model and hasattr(os, "nice"):  # POSIX; Windows has no per-process nice
        os.nice(19)


def worker_init_for(device) -> Any:
    """worker_init for loaders feeding a model on get_device()'s device."""
    return functools.partial(worker_init, below_model=device.kind == "cpu")


def loader_workers(requested: int, device) -> dict:
    """DataLoader arguments for `--workers requested` (-1: auto_workers) feeding a model on
    get_device()'s device: num_workers, worker_init_fn, pin_memory. With workers, this process
    is readied for forking them first (before_workers_start)."""
    workers = requested if requested >= 0 else auto_workers(device)
    if workers:
        before_workers_start()
    return dict(num_workers=workers, worker_init_fn=worker_init_for(device) if workers else None,
                pin_memory=device.cuda_like)


def auto_workers(device) -> int:
    """DataLoader processes for `--workers -1`, given get_device()'s DeviceInfo."""
    cores = os.cpu_count() or 1
    if device.kind == "cpu":
        # The model already keeps every core busy: a decoding process only steals from it
        # (2 cores, 128 px PNGs: 37 img/s without a worker, 32 with one). Few, on many cores.
        return min(4, cores // 8)
    # GPU: decode the next batches while the device computes. An H200 runs CRBL at 2,000+ img/s
    # at batch 32; on its 16-core host 4 processes decoded 256 px PNGs at ~420 img/s, 8 at ~585.
    return min(8, cores - 1)


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
        from sklearn.metrics import average_precision_score, roc_auc_score
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr)
        ax.plot([0, 1], [0, 1], ":", color="grey")
        ax.set(xlabel="false positive rate", ylabel="true positive rate",
               title=f"ROC (AUROC {roc_auc_score(y, s):.4f}, {len(y)} images)")
        save(fig, "roc")
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(recall, precision)
        ax.set(xlabel="recall", ylabel="precision",
               title=f"Precision-recall (AP {average_precision_score(y, s):.4f}, "
                     f"{int(y.sum())} anomalies)")
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


# --------------------------------------------------------------------------------------------
# Training data: class folders, MVTec layout, checks, split, balanced batches, augmentation
# --------------------------------------------------------------------------------------------

# Class-folder names (lower case) that mean "normal" (label 0); every other folder is an anomaly.
NORMAL_CLASS_NAMES = ("good", "normal", "ok", "0", "class_0")


def class_label(folder_name: str) -> int:
    """The label a class folder gives its images: 0 for a NORMAL_CLASS_NAMES name, else 1."""
    return 0 if folder_name.lower() in NORMAL_CLASS_NAMES else 1


def scan_class_folders(root: str | os.PathLike) -> list[Sample]:
    """Labelled samples of root/<class>/**/image: good/normal/ok/0/class_0 = 0, others = 1.

    image_path is relative to root ("<class>/<file>"). Images lying directly in root have no
    class and are refused.
    """
    root = Path(root)
    if not root.is_dir():
        raise CRBLError(f"{root}: folder not found")
    loose = [p.name for p in sorted(root.iterdir())
             if p.is_file() and _skip_reason(p.name) is None]
    if loose:
        raise CRBLError(f"{root}: {len(loose)} images (e.g. {loose[0]}) lie outside class folders; "
                        f"move them into {root}/good/ (normal) or {root}/<defect name>/ (anomaly)")
    samples = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = class_label(class_dir.name)
        found, _ = scan_folder(class_dir)
        samples += [Sample(s.path, f"{class_dir.name}/{s.image_path}", label) for s in found]
    return samples


def discover_image_folder(data_dir: str | os.PathLike) -> tuple[list[Sample], list[Sample] | None, str]:
    """(train, val or None, how it was read) from a folder of class folders or a split layout.

    - data_dir/train/<class>/ and data_dir/test/<class>/: train and validation as given;
    - MVTec AD (train/good only, test/good + test/<defect>): CRBL is supervised and needs
      anomalies to learn from, so train and test are pooled and split by the caller;
    - data_dir/<class>/: one pool, split by the caller.
    image_path values are relative to data_dir (e.g. "test/scratch/000.png").
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise CRBLError(f"--data-dir {data_dir}: folder not found")
    if not (data_dir / "train").is_dir():
        return scan_class_folders(data_dir), None, f"{data_dir}: class folders, split for validation"
    train = _prefixed(scan_class_folders(data_dir / "train"), "train")
    test = (_prefixed(scan_class_folders(data_dir / "test"), "test")
            if (data_dir / "test").is_dir() else [])
    if not test:
        return train, None, f"{data_dir}: train/ class folders, split for validation"
    if {s.label for s in train} == {0, 1}:
        return train, test, f"{data_dir}: train/ for training, test/ for validation"
    return train + test, None, (f"{data_dir}: MVTec layout (train/ holds normal images only): "
                                "train/ and test/ pooled, then split for validation")


def _prefixed(samples: list[Sample], prefix: str) -> list[Sample]:
    return [Sample(s.path, f"{prefix}/{s.image_path}", s.label) for s in samples]


def stratified_split(samples: Sequence[Sample], val_fraction: float, seed: int
                     ) -> tuple[list[Sample], list[Sample]]:
    """Seeded, class-stratified train/validation split (scikit-learn)."""
    from sklearn.model_selection import train_test_split
    labels = [s.label for s in samples]
    try:
        train_idx, val_idx = train_test_split(range(len(samples)), test_size=val_fraction,
                                              stratify=labels, random_state=seed)
    except ValueError as exc:
        counts = {c: labels.count(c) for c in (0, 1)}
        raise CRBLError(f"cannot split {len(samples)} images (per class {counts}) with --val-split "
                        f"{val_fraction}: {exc}. Add images or give a validation set") from None
    return [samples[i] for i in sorted(train_idx)], [samples[i] for i in sorted(val_idx)]


def check_labelled(samples: Sequence[Sample], what: str) -> None:
    """Both classes present; CRBL learns normal vs anomaly and AUROC needs both."""
    if not samples:
        raise CRBLError(f"{what}: no images found")
    counts = [sum(s.label == c for s in samples) for c in (0, 1)]
    if 0 in counts:
        missing = "normal (0)" if counts[0] == 0 else "anomaly (1)"
        raise CRBLError(f"{what}: all {len(samples)} images have the same label, none is "
                        f"{missing}; training needs both normal and anomalous images")


def verify_images(samples: Sequence[Sample], what: str, where=None, max_bad_fraction: float = 0.05,
                  progress: bool = True, noted: list[str] | None = None
                  ) -> tuple[list[Sample], list[str]]:
    """Decode every image once before training, so no file fails mid-epoch.

    Missing files are an error (a wrong path or --image-dir). Unreadable files are dropped and
    returned as warnings, unless they are more than max_bad_fraction of the set.
    where(i) names sample i for messages (e.g. "train.csv row 7"); default its path.
    noted: gets "where: what the decoder warned" for usable images it warned about.
    """
    from tqdm import tqdm
    where = where or (lambda i: str(samples[i].path))
    missing = [i for i, s in enumerate(samples) if not s.path.is_file()]
    if missing:
        first = missing[0]
        raise CRBLError(f"{what}: {len(missing)} image files not found, first {where(first)}: "
                        f"{samples[first].path}; fix the paths (or --image-dir)")
    good, bad = [], []
    for i, sample in enumerate(tqdm(samples, desc=f"checking {what}", unit="img", leave=False,
                                    disable=not progress)):
        notes: list[str] = []
        try:
            load_rgb_uint8(sample.path, notes)
        except ImageError as exc:
            bad.append(f"{where(i)}: {exc.reason}")
            continue
        good.append(sample)
        if notes and noted is not None:
            noted.append(f"{where(i)}: {'; '.join(notes)}")
    if len(bad) > max_bad_fraction * len(samples):
        raise CRBLError(f"{what}: {len(bad)} of {len(samples)} images are unreadable, first "
                        f"{bad[0]}; fix or remove them")
    return good, bad


class TrainDataset(Dataset):
    """Training items `(image (3,S,S) in [0,1], label float)`, augmented.

    An item key may be `(index, seed)`: the augmentation of that draw then depends on the seed
    alone, not on which DataLoader worker runs it nor on the dropout RNG of the main process.
    """

    def __init__(self, samples: Sequence[Sample], image_size: int, transform=None):
        self.samples, self.image_size, self.transform = list(samples), int(image_size), transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        sample = self.samples[index]
        image = preprocess_image(sample.path, self.image_size)
        if self.transform is not None:
            with torch.random.fork_rng(devices=[]):  # leave the caller's RNG untouched
                if seed is not None:
                    torch.manual_seed(seed)
                image = self.transform(image)
        return image, torch.tensor(float(sample.label))


def train_augmentation(image_size: int):
    """Flips, a small rotation/shift/zoom and colour jitter (torchvision transforms v2).

    The affine runs on a reflect-padded copy, then the centre is cropped back: no black
    corners, which a defect detector could otherwise learn as a feature.
    """
    from torchvision.transforms import InterpolationMode, v2
    pad = math.ceil(0.15 * image_size)
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(),
        v2.Pad(pad, padding_mode="reflect"),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.95, 1.05),
                        interpolation=InterpolationMode.BILINEAR),
        v2.CenterCrop(image_size),
        v2.ColorJitter(brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02),
    ])


class ClassBalancedBatchSampler(torch.utils.data.Sampler):
    """Batches with exactly round(batch_size·class0_ratio) normal images, the rest anomalies.

    Each class is drawn from its own shuffled list, reshuffled when used up, so the rarer class
    repeats within an epoch. An epoch is `num_batches` batches. Everything is drawn from a
    generator seeded by (seed, epoch): `set_epoch(e)` makes epoch e the same in every run,
    resumed or not, whatever the number of DataLoader workers. Items are `(index, seed)` pairs
    for TrainDataset's per-draw augmentation seed.
    """

    def __init__(self, labels: Sequence[int], batch_size: int, class0_ratio: float = 0.5,
                 num_batches: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1):
        if not 0.0 <= class0_ratio <= 1.0:
            raise CRBLError(f"--class0-ratio must be within [0, 1], got {class0_ratio}")
        labels = np.asarray(labels)
        self.class_indices = [np.flatnonzero(labels == c) for c in (0, 1)]
        self.n0 = int(round(batch_size * class0_ratio))
        self.per_class = (self.n0, batch_size - self.n0)
        for c, need in enumerate(self.per_class):
            if need and len(self.class_indices[c]) < world_size:  # each process needs its own
                raise CRBLError(f"--class0-ratio {class0_ratio} needs class {c} images: "
                                f"{world_size} process(es) need at least {world_size}, there are "
                                f"{len(self.class_indices[c]) or 'none'}")
        self.batch_size, self.seed, self.epoch = batch_size, seed, 0
        self.rank, self.world_size = rank, world_size
        # With several processes (DDP) an epoch still covers the data about once in total.
        self.num_batches = num_batches or math.ceil(len(labels) / (batch_size * world_size))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        indices = self.class_indices
        if self.world_size > 1:
            # Every rank draws the same permutation of each class and keeps its own slice: the
            # shares are disjoint and each is class-balanced; then each rank draws on its own.
            indices = [idx[torch.randperm(len(idx), generator=g).numpy()][self.rank::self.world_size]
                       for idx in indices]
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_009 + self.rank)
        streams = [self._stream(idx, g) for idx in indices]
        for _ in range(self.num_batches):
            batch = [next(streams[c]) for c in (0, 1) for _ in range(self.per_class[c])]
            seeds = torch.randint(0, 2**62, (len(batch),), generator=g).tolist()
            yield list(zip(batch, seeds))

    @staticmethod
    def _stream(indices: np.ndarray, g: torch.Generator):
        while len(indices):
            for i in torch.randperm(len(indices), generator=g).tolist():
                yield int(indices[i])


# --------------------------------------------------------------------------------------------
# Demo data: synthetic textures with defects, harmless marks and defect masks
# --------------------------------------------------------------------------------------------

DEMO_DEFECTS = ("scratch", "blob", "stain")
# With marks > 0, every demo image, normal or not, also carries that many harmless marks (blue
# dots, yellow bars) with the same contrast as the defects: only their colour tells them apart.
# The model must then learn what a defect is, and a heatmap that merely finds contrast points at
# a mark (the task heatmaps are measured on; the --demo itself has none, so that it learns in
# minutes from random backbones).
DEMO_MARKS = ("dot", "bar")
# RGB directions of each shape's colour change; every shape changes its pixels by the same
# amount (DEMO_CONTRAST, the length of the change), so no shape is easier to see than another.
DEMO_COLOURS = {"scratch": (-1.0, -1.0, -1.0), "blob": (-1.0, -1.0, -1.0),
                "stain": (0.3, -0.4, -1.0), "dot": (0.2, 0.6, 1.0), "bar": (0.8, 0.7, -0.8)}
DEMO_CONTRAST = (100.0, 140.0)
# Where a soft shape (the stain) counts as defect in its mask.
DEMO_MASK_LEVEL = 0.3


def _demo_texture(rng: np.random.Generator, size: int, material: dict) -> np.ndarray:
    """A woven / brushed surface of one material (like one MVTec category): the material's
    colour and weave, with per-image lighting, shading and grain."""
    from PIL import Image
    base = material["colour"] + rng.uniform(-8, 8)
    shade = rng.normal(0, 8, (6, 6)).astype(np.float32)
    shade = np.asarray(Image.fromarray(shade).resize((size, size), Image.BICUBIC))
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = material["angle"] + rng.uniform(-0.1, 0.1)
    period = material["period"] * size / 128
    weave = 6 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    grain = rng.normal(0, 5, (size, size))
    return base[None, None, :] + (shade + weave + grain)[:, :, None]


def _demo_shape(rng: np.random.Generator, size: int, kind: str, cx: float, cy: float
                ) -> np.ndarray:
    """Coverage in [0, 1] of one shape centred at (cx, cy); every shape fits in a box of a
    quarter of the image side."""
    from PIL import Image, ImageDraw
    if kind == "stain":  # a soft discolouration
        sigma = rng.uniform(0.03, 0.05) * size
        yy, xx = np.mgrid[0:size, 0:size]
        return np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sigma ** 2))
    mask = Image.new("F", (size, size), 0.0)
    draw = ImageDraw.Draw(mask)
    if kind in ("scratch", "bar"):
        length, angle = rng.uniform(0.12, 0.22) * size, rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        width = max(2, round((0.03 if kind == "scratch" else 0.045) * size))
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=1.0, width=width)
    else:  # blob, dot: filled ellipses
        rx, ry = rng.uniform(0.04, 0.09, 2) * size
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=1.0)
    return np.asarray(mask)


def _demo_centres(rng: np.random.Generator, size: int, count: int) -> list[np.ndarray]:
    """count shape centres anywhere in the image, at least a quarter side apart (shapes never
    touch, so a mask holds its defect only)."""
    centres: list[np.ndarray] = []
    while len(centres) < count:
        c = rng.uniform(0.14, 0.86, 2) * size
        if all(np.abs(c - other).max() >= size / 4 for other in centres):
            centres.append(c)
    return centres


def demo_image(rng: np.random.Generator, size: int, material: dict, defect: str | None,
               marks: int = 0) -> tuple[np.ndarray, np.ndarray | None]:
    """One demo image (uint8 RGB) with `marks` harmless marks and, for a defect, its mask
    (uint8, 255 = defect)."""
    img = _demo_texture(rng, size, material)
    kinds = [rng.choice(DEMO_MARKS) for _ in range(marks)]
    kinds += [defect] if defect else []
    mask = None
    for kind, (cx, cy) in zip(kinds, _demo_centres(rng, size, len(kinds))):
        coverage = _demo_shape(rng, size, kind, cx, cy)
        direction = np.asarray(DEMO_COLOURS[kind])
        img = img + coverage[:, :, None] * (rng.uniform(*DEMO_CONTRAST) * direction
                                            / np.linalg.norm(direction))
        if kind == defect:
            mask = np.where(coverage >= DEMO_MASK_LEVEL, 255, 0).astype(np.uint8)
    return img.clip(0, 255).round().astype(np.uint8), mask


def make_demo_dataset(root: str | os.PathLike, train_per_class: int = 48, test_per_class: int = 24,
                      size: int = 128, seed: int = 0, marks: int = 0) -> dict[str, int]:
    """Write a seeded synthetic defect data set, no download needed, with `marks` harmless
    marks on every image (DEMO_MARKS):

    root/{train,test}/{good,defect}/*.png (the class-folder layout); a mask per defect image
    (255 = defect), for test/ where MVTec AD keeps it (root/ground_truth/defect/<name>_mask.png),
    for train/ in root/ground_truth_train/defect/; root/train.csv and root/test.csv manifests
    (image_path, impurity 0/1, mask_path; paths relative to root). Returns image counts per split.
    """
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    material = {"colour": rng.uniform(100, 160) + rng.uniform(-15, 15, 3),
                "angle": rng.uniform(0, np.pi), "period": rng.uniform(4, 8)}
    counts = {}
    for split, per_class in (("train", train_per_class), ("test", test_per_class)):
        masks = "ground_truth" if split == "test" else "ground_truth_train"
        rows = []
        (root / masks / "defect").mkdir(parents=True, exist_ok=True)
        for label, cls in ((0, "good"), (1, "defect")):
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                kind = DEMO_DEFECTS[i % len(DEMO_DEFECTS)] if label else None
                img, mask = demo_image(rng, size, material, kind, marks)
                name = f"{i:03d}_{kind}" if label else f"{i:03d}"
                Image.fromarray(img).save(root / split / cls / f"{name}.png")
                mask_path = ""
                if mask is not None:
                    mask_path = f"{masks}/{cls}/{name}_mask.png"
                    Image.fromarray(mask).save(root / mask_path)
                rows.append((f"{split}/{cls}/{name}.png", label, mask_path))
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(("image_path", "impurity", "mask_path"))
            writer.writerows(rows)
        counts[split] = len(rows)
    return counts
