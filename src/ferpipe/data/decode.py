"""Decode one image file (or its bytes) to a size x size uint8 grayscale (or RGB) array.

PIL does the decoding (jpg, png, bmp, tif, gif, webp, ...), cv2 the resizing. Every way an input can
be unusable becomes an `ImageError` whose message is a short reason for the rejects table, so one bad
file never stops a 30,000-image ingest. The user's files are only ever opened for reading.

Choices worth knowing:
  * multi-page TIFF / animated GIF / WebP: the first page or frame;
  * EXIF orientation is applied (what an image viewer shows), before the face box crop;
  * alpha (RGBA, LA, palette transparency) is composited on black;
  * 16-bit images are scaled 0..65535 -> 0..255 (not clipped); float images are taken as 0..1 when
    their maximum is <= 1, else as 0..255; a float image with an inf or nan pixel is rejected;
  * a file is checked before it is read: a regular file, not empty, at most `max_bytes` (the
    ingest.max_file_mb param); PIL reads the header to identify the format before decoding the rest;
  * colour -> gray with PIL's ITU-R 601-2 luma (L = 0.299 R + 0.587 G + 0.114 B);
  * color "rgb" (ingest.color): uint8 [H, W, 3] in RGB order; a gray image becomes three equal
    channels (16-bit and float images are scaled to gray first), alpha is composited on black alike;
  * a non-square image (or box) is resized whole to size x size, not padded or centre-cropped: the
    faces in these datasets are already crops, and AffectNet's boxes are the face;
  * resize: area interpolation when both sides shrink, cubic otherwise, no-op at the right size.
"""
from __future__ import annotations

import io
import os
import re
import stat
import struct
import warnings
import zlib

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ferpipe.imaging import resize

COLORS = ("gray", "rgb")  # ingest.color: what an image decodes to

# what PIL raises on corrupt or truncated data, depending on the format plugin
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error,
                  Image.DecompressionBombError)


class ImageError(ValueError):
    """An image that cannot be used; str(error) is a short human reason."""


def _open_source(source, max_bytes: int | None = None):
    """A binary file object for a path or bytes, after the checks that need no reading: a regular,
    non-empty file of at most max_bytes (a FIFO would block, /dev/zero never ends, and a 2 GB file
    named .png must not be read into memory). PIL then identifies the format from the header alone."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("empty data (0 bytes)")
        return io.BytesIO(data)
    try:
        st = os.stat(source)
        if stat.S_ISDIR(st.st_mode):
            raise ImageError("a folder, not a file")
        if not stat.S_ISREG(st.st_mode):
            raise ImageError("not a regular file (device, FIFO or socket)")
        if st.st_size == 0:
            raise ImageError("empty file (0 bytes)")
        if max_bytes and st.st_size > max_bytes:
            raise ImageError(f"file too large ({st.st_size / 2**20:.1f} MB > {max_bytes / 2**20:g} MB, "
                             "ingest.max_file_mb)")
        return open(source, "rb")
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except PermissionError:
        raise ImageError("permission denied") from None
    except OSError as e:
        raise ImageError(f"cannot read file: {e.strerror or e}") from None


def _to_gray(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W]."""
    mode = im.mode
    if mode == "L":
        return np.asarray(im)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "L")
        mode = im.mode
        if mode == "L":
            return np.asarray(im)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        la = np.asarray(im.convert("LA"), dtype=np.uint16)
        # composite on black: gray * alpha / 255, rounded
        return ((la[..., 0] * la[..., 1] + 127) // 255).astype(np.uint8)
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im).astype(np.float64)
        if mode == "I" and (a.min() < 0 or a.max() > 65535):  # true 32-bit data: stretch its range
            lo, hi = a.min(), a.max()
            a = (a - lo) * (65535.0 / (hi - lo) if hi > lo else 0.0)
        return np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
    if mode == "F":
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():  # nan_to_num made an inf pixel the maximum: an all-black image
            raise ImageError("float image has non-finite pixels (inf or nan)")
        if a.size and a.max() <= 1.0:
            a = a * 255.0
        return np.clip(np.rint(a), 0, 255).astype(np.uint8)
    if mode != "RGB":
        im = im.convert("RGB")  # CMYK, YCbCr, 1, LAB, HSV, ...
    return np.asarray(im.convert("L"))


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Any PIL mode -> uint8 [H, W, 3], RGB order: colour modes converted by PIL (alpha composited on
    black), every other mode through ``_to_gray`` and stacked to three equal channels."""
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        mode = im.mode
    if mode in ("RGBA", "RGBa"):
        rgba = np.asarray(im.convert("RGBA"), dtype=np.uint16)
        return ((rgba[..., :3] * rgba[..., 3:] + 127) // 255).astype(np.uint8)
    if mode in ("RGB", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(im.convert("RGB"))
    return np.repeat(_to_gray(im)[..., None], 3, axis=-1)


def crop_box(gray: np.ndarray, box) -> np.ndarray:
    """Crop (x, y, w, h) of a gray [H, W] or RGB [H, W, 3] image, clipped to it; ImageError if nothing is left."""
    try:
        x, y, w, h = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ImageError(f"invalid face box {box!r}") from None
    if not all(np.isfinite([x, y, w, h])):
        raise ImageError(f"invalid face box {tuple(box)!r}")
    H, W = gray.shape[:2]
    x0, y0 = max(0, int(round(x))), max(0, int(round(y)))
    x1, y1 = min(W, int(round(x + w))), min(H, int(round(y + h)))
    if x1 <= x0 or y1 <= y0:
        raise ImageError(f"face box {tuple(int(round(v)) for v in (x, y, w, h))} is empty inside the {W}x{H} image")
    return gray[y0:y1, x0:x1]


_VIDEO_FRAME = re.compile(r"^(.*)#frame=(\d+)$")
_VIDEO = {"path": None, "cap": None, "pos": 0}  # per process: the open video and its next frame


def _video_frame(path: str, index: int, color: str = "gray") -> np.ndarray:
    """Frame `index` of a video as uint8 gray (or RGB [H, W, 3]), read forward with OpenCV (exact, no
    keyframe seeking).

    The capture stays open between calls, so reading a video's frames in order decodes it once.
    """
    v = _VIDEO
    if v["path"] != path or index < v["pos"]:
        if v["cap"] is not None:
            v["cap"].release()
        v.update(path=None, cap=None, pos=0)
        if not os.path.isfile(path):
            raise ImageError("video file not found")
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise ImageError("video does not open (not a video or unsupported codec)")
        v.update(path=path, cap=cap, pos=0)
    cap = v["cap"]
    while v["pos"] < index:
        if not cap.grab():
            raise ImageError(f"video has no frame {index} (it ends after {v['pos']})")
        v["pos"] += 1
    ok, frame = cap.read()
    if not ok or frame is None or frame.size == 0:
        v["pos"] = float("inf")  # reopen on the next call
        raise ImageError(f"video frame {index} does not decode")
    v["pos"] += 1
    if color == "rgb":
        return np.repeat(frame[..., None], 3, axis=-1) if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_BGR2GRAY)


def decode_gray(source, max_bytes: int | None = None) -> np.ndarray:
    """``decode_full`` to gray: uint8 [H, W]."""
    return decode_full(source, max_bytes, "gray")


def decode_full(source, max_bytes: int | None = None, color: str = "gray") -> np.ndarray:
    """Decode a path or the bytes of an image to full-resolution uint8 gray [H, W] (EXIF orientation
    applied, alpha on black, 16-bit/float scaled as the module docstring says), or with color "rgb"
    to uint8 [H, W, 3] in RGB order. Raises ImageError(reason).
    A source "<video>#frame=<n>" (the video reader's rows) is frame n of that video, decoded with OpenCV.
    A file larger than `max_bytes` is rejected before it is read (videos are not limited: they are
    read frame by frame).
    """
    if color not in COLORS:
        raise ValueError(f"ingest.color must be one of {', '.join(COLORS)}, got {color!r}")
    if isinstance(source, (str, os.PathLike)) and (m := _VIDEO_FRAME.match(str(source))) \
            and not os.path.exists(source):
        return _video_frame(m.group(1), int(m.group(2)), color)
    try:
        with warnings.catch_warnings(), _open_source(source, max_bytes) as f:
            warnings.simplefilter("ignore")  # PIL warns on odd metadata (EXIF, palette) it copes with
            with Image.open(f) as im:
                im.load()  # decode now: truncation and corruption surface here, not later
                im = ImageOps.exif_transpose(im)
                image = _to_rgb(im) if color == "rgb" else _to_gray(im)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError("not a recognised image format") from None
    except Image.DecompressionBombError:
        raise ImageError("image too large (decompression bomb guard)") from None
    except _DECODE_ERRORS as e:
        msg = str(e).split("\n")[0][:80]
        reason = "truncated image data" if "truncated" in msg.lower() else "corrupt image data"
        raise ImageError(f"{reason} ({msg})" if msg else reason) from None
    if image.size == 0:
        raise ImageError("image has no pixels")
    return image


def decode_image(source, size: int, box=None, max_bytes: int | None = None, color: str = "gray") -> np.ndarray:
    """Decode a path or the bytes of an image (``decode_full``) to uint8 [size, size] grayscale, or
    with color "rgb" to [size, size, 3] in RGB order.

    `box` = (x, y, w, h) in pixels of the (orientation-corrected) image crops before resizing; it is
    clipped to the image, and a box with nothing inside is an error. Raises ImageError(reason) for a
    missing, empty, truncated, corrupt or unrecognised file, or one larger than `max_bytes`.
    """
    image = decode_full(source, max_bytes, color)
    return resize(crop_box(image, box) if box is not None else image, size)


def decode_pixels(pixels: str, size: int, side: int = 48, color: str = "gray") -> np.ndarray:
    """A fer2013.csv pixel string (side*side integers 0..255, space separated) -> uint8 [size, size]
    (color "rgb": [size, size, 3], three equal channels)."""
    a = resize(parse_pixels(pixels, side * side).reshape(side, side), size)
    return np.repeat(a[..., None], 3, axis=-1) if color == "rgb" else a


def parse_pixels(pixels: str, count: int = 2304) -> np.ndarray:
    """Parse a space-separated pixel string to uint8 [count]; ImageError unless exactly `count`
    integers in 0..255. (np.fromstring is C-speed: ~25 us per 2304 values.)"""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns, not raises, on trailing junk
            a = np.fromstring(str(pixels), dtype=np.int64, sep=" ")
    except (ValueError, DeprecationWarning):
        raise ImageError("pixel string has a value that is not an integer") from None
    if a.size != count:
        raise ImageError(f"pixel string has {a.size} values, expected {count}")
    if a.min() < 0 or a.max() > 255:
        raise ImageError(f"pixel value out of range 0..255 ({a.min()}..{a.max()})")
    return a.astype(np.uint8)
