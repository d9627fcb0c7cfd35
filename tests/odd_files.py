"""Small image files of odd formats and odd kinds, written by the tests themselves (Pillow's own
writers where it has one, bytes by hand where it has none)."""
import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def rgb(seed: int = 0, size=(24, 32)) -> Image.Image:
    """A smooth colour image (lossy formats keep it close)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (3, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size[::-1], Image.BILINEAR)


def tga_and_ico(folder: Path) -> tuple[Path, Path]:
    """a.tga and b.ico (one 128 px 32-bit BMP frame). Read by Pillow in that order in a new
    process, before the fix: TGA (no signature check) claimed the ICO as a 32 x 19140 image."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb(1, (8, 8)).save(folder / "a.tga")
    rgb(2, (128, 128)).convert("RGBA").save(folder / "b.ico", sizes=[(128, 128)], bitmap_format="bmp")
    return folder / "a.tga", folder / "b.ico"


def tiff_bytes(compression: int, width: int = 4, height: int = 4) -> bytes:
    """A little-endian RGB TIFF, one strip of zero bytes, with any compression code."""
    data = bytes(width * height * 3)
    tags = [(256, 3, width), (257, 3, height), (258, 3, 8), (259, 3, compression), (262, 3, 2),
            (273, 4, 0), (277, 3, 3), (278, 3, height), (279, 4, len(data))]
    data_at = 8 + 2 + 12 * len(tags) + 4
    ifd = struct.pack("<H", len(tags))
    for tag, kind, value in tags:
        value = data_at if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3
                                                     else struct.pack("<I", value))
    return b"II*\0" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + data


def jpeg_with_bad_exif(path: Path) -> None:
    """A good JPEG whose EXIF block has a tag pointing past its end: Pillow warns about it."""
    ifd = (struct.pack("<2sHI", b"II", 42, 8) + struct.pack("<H", 1)
           + struct.pack("<HHII", 0x010E, 2, 400, 26) + struct.pack("<I", 0))
    rgb(3).save(path, quality=95, exif=b"Exif\0\0" + ifd)


def png_with_bad_text_crc(path: Path, seed: int = 4) -> None:
    """A good PNG with a tEXt chunk whose CRC is wrong: libpng (inside OpenCV) prints a warning
    on stderr and decodes the pixels."""
    buf = io.BytesIO()
    rgb(seed).save(buf, "PNG")
    data, body = buf.getvalue(), b"tEXtComment\0hello"
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body) ^ 1)
    path.write_bytes(data[:33] + chunk + data[33:])  # after the signature and IHDR


def fli_bytes(width: int = 8, height: int = 6, flc: bool = False) -> bytes:
    """An FLI/FLC animation of one frame: one COPY chunk of grey palette indices."""
    pixels = bytes((x * 16 + y * 8) % 256 for y in range(height) for x in range(width))
    chunk = struct.pack("<IH", 6 + len(pixels), 16) + pixels
    frame = struct.pack("<IHH8x", 16 + len(chunk), 0xF1FA, 1) + chunk
    header = struct.pack("<IHHHHHHI", 128 + len(frame), 0xAF12 if flc else 0xAF11, 1, width,
                         height, 8, 0, 5).ljust(128, b"\0")
    return header + frame


XPM = b"""/* XPM */
static char *x[] = {
"4 2 2 1",
"a c #FF0000",
"b c #0000FF",
"abab",
"baba"
};
"""


def newly_scanned(folder: Path, dry: bool = False) -> dict[str, tuple[int, int]]:
    """One file for each extension the folder scan did not pick up before although Pillow reads
    it; returns name -> (height, width) it must decode to (dry: write nothing)."""
    shape = (24, 32)
    shapes = {"camera.mpo": shape, "texture.dds": shape, "x.qoi": shape, "x.pcx": shape,
              "x.sgi": shape, "x.rgb": shape, "x.bw": shape, "x.blp": shape,
              "x.icns": (1024, 1024),  # Pillow writes every size up to 1024, reads the largest
              "x.apng": shape, "x.cur": (32, 32), "x.xpm": (2, 4), "x.fli": (6, 8), "x.flc": (6, 8)}
    if dry:
        return shapes
    folder.mkdir(parents=True, exist_ok=True)
    im = rgb(5)
    im.save(folder / "camera.mpo", "MPO", save_all=True, append_images=[rgb(6)])
    im.save(folder / "texture.dds")
    im.save(folder / "x.qoi")
    im.save(folder / "x.pcx")
    im.save(folder / "x.sgi")
    im.save(folder / "x.rgb", "SGI")
    im.convert("L").save(folder / "x.bw", "SGI")
    im.convert("P").save(folder / "x.blp")
    rgb(7, (32, 32)).save(folder / "x.icns")
    im.save(folder / "x.apng", "PNG", save_all=True, append_images=[rgb(8)])
    rgb(9, (32, 32)).convert("RGBA").save(folder / "cur.ico", sizes=[(32, 32)], bitmap_format="bmp")
    cur = bytearray((folder / "cur.ico").read_bytes())
    cur[2] = 2  # the ICONDIR type: 1 icon, 2 cursor
    (folder / "cur.ico").unlink()
    (folder / "x.cur").write_bytes(bytes(cur))
    (folder / "x.xpm").write_bytes(XPM)
    (folder / "x.fli").write_bytes(fli_bytes())
    (folder / "x.flc").write_bytes(fli_bytes(flc=True))
    return shapes
