"""Guide maps of Guided Spatial Transformers (DESIGN.md 4.1), batched over packed arrays.

Every kind maps uint8 images [N, S, S] and landmarks float [N, 68, 2] ((x, y) normalized to [0, 1])
to uint8 [N, S, S]:

  landmarks  the 8 face regions drawn white on black (filled hulls, jaw as a line, anti-aliased)
  soft       mode threshold: the landmark drawing with pixels >= threshold -> 255, else `low`
             (Guided-ST's rule); mode gaussian: a Gaussian (sigma px) at each of the 68 points,
             max-combined, background `low`, peaks 255
  dilation   the drawing without the `remove` regions (the jaw), dilated with a kernel x kernel ones
             kernel `iterations` times
  patches    collage: the image where the (binarized) mask is white, 0 elsewhere; mask "dilation" (the
             dilation map with this kind's params) or "landmarks" (the landmark drawing, Guided-ST's seed)
  weighted   collage: image * soft map / 255 (soft map with this kind's own params)
  saliency   OpenCV contrib static saliency (spectral_residual | fine_grained), 0..255 per image;
             uses no landmarks

Faces whose landmarks are a flagged fallback shape (found=False) get a map from that shape
(`missing: fallback`), or, as Guided-ST's seed did, a white map (`missing: white`: collages then keep
the whole image); the `found` flag is copied into the guide artifact so consumers can filter.
"""
from __future__ import annotations

from typing import Callable

import cv2
import numpy as np

from ferpipe.faces.draw import draw_regions_batch
from ferpipe.imaging import gray_images
from ferpipe.plots import draw_points, grid, sample_indices, write_png
from ferpipe.store import read_attrs, read_h5, write_h5, writes

GUIDE_KINDS = ("landmarks", "soft", "dilation", "patches", "weighted", "saliency")

# Defaults (same values as params.yaml `guides`); also the set of params each kind accepts.
_SOFT = {"mode": "threshold", "threshold": 38, "low": 127, "sigma": 1.5}
_MISSING = {"missing": "fallback"}   # faces without landmarks: fallback (the fitted shape's map) | white (the seed's)
DEFAULT_PARAMS: dict[str, dict] = {
    "landmarks": {"thickness": 1, **_MISSING},
    "soft": {**_SOFT, **_MISSING},
    "dilation": {"kernel": 2, "iterations": 2, "remove": ["jaw"], **_MISSING},
    "patches": {"kernel": 2, "iterations": 2, "remove": ["jaw"], "mask": "dilation", **_MISSING},
    "weighted": {**_SOFT, **_MISSING},
    "saliency": {"method": "spectral_residual"},
}
MISSING_MODES = ("fallback", "white")
PATCH_MASKS = ("dilation", "landmarks")

KIND_HELP = {
    "landmarks": "the 8 face regions of the 68 points, white on black (filled hulls, jaw as a line)",
    "soft": "threshold: landmark drawing, pixels >= threshold -> 255 else low; "
            "gaussian: max of Gaussians (sigma px) at the 68 points, background low, peaks 255",
    "dilation": "landmark drawing without the jaw, dilated (kernel x kernel ones, iterations)",
    "patches": "collage: the image inside the binarized dilation mask, black outside",
    "weighted": "collage: image * soft map / 255 (soft map built with this kind's params)",
    "saliency": "OpenCV static saliency (spectral_residual | fine_grained), scaled 0..255 per image",
}

SOFT_MODES = ("threshold", "gaussian")
SALIENCY_METHODS = ("spectral_residual", "fine_grained")
_GAUSS_CHUNK = 16               # images per vectorised Gaussian block (~10 MB of float32 at 48 px)


# ----------------------------------------------------------------------------------------- checks
def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images must be uint8 [N, S, S], got {images.dtype} {images.shape}")
    return images


def _check_landmarks(landmarks, n: int) -> np.ndarray:
    if landmarks is None:
        raise ValueError("this guide kind needs landmarks [N, 68, 2]")
    lm = np.asarray(landmarks, np.float32)
    if lm.shape != (n, 68, 2):
        raise ValueError(f"landmarks must be [N={n}, 68, 2] (normalized x, y), got {lm.shape}")
    return lm


def _check_soft(mode: str, threshold, low, sigma) -> None:
    if mode not in SOFT_MODES:
        raise ValueError(f"soft mode '{mode}' unknown (one of {SOFT_MODES})")
    if not 0 <= low <= 255:
        raise ValueError(f"soft low={low} must be in 0..255")
    if mode == "threshold" and not 0 <= threshold <= 255:
        raise ValueError(f"soft threshold={threshold} must be in 0..255")
    if mode == "gaussian" and not sigma > 0:
        raise ValueError(f"soft sigma={sigma} must be > 0")


# ------------------------------------------------------------------------------------- the kinds
def landmarks_map(images: np.ndarray, landmarks: np.ndarray, thickness: int = 1) -> np.ndarray:
    """The 8 face regions drawn white on black at the images' size."""
    images = _check_images(images)
    lm = _check_landmarks(landmarks, len(images))
    return draw_regions_batch(lm, images.shape[1], thickness=thickness, jaw=True)


def gaussian_heat(landmarks: np.ndarray, size: int, sigma: float) -> np.ndarray:
    """float32 [N, size, size]: max over the 68 points of exp(-d^2 / 2 sigma^2), each image's max scaled to 1.

    Separable: per point a row and a column Gaussian; their outer products are max-reduced over the
    points in blocks of images (no Python loop per point). Non-finite points contribute nothing.
    """
    px = np.asarray(landmarks, np.float32) * size
    c = np.arange(size, dtype=np.float32)
    k = np.float32(-0.5 / sigma ** 2)
    out = np.empty((len(px), size, size), np.float32)
    for i in range(0, len(px), _GAUSS_CHUNK):
        p = px[i:i + _GAUSS_CHUNK]
        with np.errstate(invalid="ignore"):
            gx = np.exp(k * (c - p[..., 0:1]) ** 2)          # [n, 68, S] along x
            gy = np.exp(k * (c - p[..., 1:2]) ** 2)          # [n, 68, S] along y
        gx = np.nan_to_num(gx, nan=0.0)
        gy = np.nan_to_num(gy, nan=0.0)
        out[i:i + _GAUSS_CHUNK] = (gy[:, :, :, None] * gx[:, :, None, :]).max(axis=1)
    peak = out.max(axis=(1, 2), keepdims=True)
    np.divide(out, peak, out=out, where=peak > 0)
    return out


def soft_map(images: np.ndarray, landmarks: np.ndarray, mode: str = "threshold", threshold: float = 38,
             low: int = 127, sigma: float = 1.5) -> np.ndarray:
    """Soft landmark map in {low..255}: threshold rule on the drawing, or a Gaussian heatmap."""
    images = _check_images(images)
    lm = _check_landmarks(landmarks, len(images))
    _check_soft(mode, threshold, low, sigma)
    size = images.shape[1]
    if mode == "threshold":
        drawing = draw_regions_batch(lm, size, thickness=1, jaw=True)
        return np.where(drawing >= threshold, np.uint8(255), np.uint8(low))
    heat = gaussian_heat(lm, size, float(sigma))
    return np.rint(low + (255.0 - low) * heat).astype(np.uint8)


def dilation_map(images: np.ndarray, landmarks: np.ndarray, kernel: int = 2, iterations: int = 2,
                 remove=("jaw",)) -> np.ndarray:
    """The drawing without the `remove` regions (faces.draw.REGIONS names; Guided-ST removed the jaw),
    dilated with a kernel x kernel ones kernel `iterations` times."""
    images = _check_images(images)
    lm = _check_landmarks(landmarks, len(images))
    if int(kernel) < 1 or int(iterations) < 0:
        raise ValueError(f"dilation needs kernel >= 1 and iterations >= 0, got {kernel}, {iterations}")
    drawing = draw_regions_batch(lm, images.shape[1], thickness=1, skip=tuple(remove or ()))
    if int(iterations) == 0 or int(kernel) == 1:
        return drawing
    k = np.ones((int(kernel), int(kernel)), np.uint8)
    for i in range(len(drawing)):
        cv2.dilate(drawing[i], k, dst=drawing[i], iterations=int(iterations))
    return drawing


def patches_map(images: np.ndarray, landmarks: np.ndarray, kernel: int = 2, iterations: int = 2,
                remove=("jaw",), mask: str = "dilation") -> np.ndarray:
    """Collage: mask/255 * image with a binarized (>0 -> 255) mask: the dilation map (kernel, iterations,
    remove), or with mask="landmarks" the landmark drawing (Guided-ST's seed code)."""
    images = _check_images(images)
    if mask == "dilation":
        m = dilation_map(images, landmarks, kernel=kernel, iterations=iterations, remove=remove)
    elif mask == "landmarks":
        m = landmarks_map(images, landmarks)
    else:
        raise ValueError(f"patches mask '{mask}' unknown (one of {PATCH_MASKS})")
    return np.where(m > 0, images, np.uint8(0))


def weighted_map(images: np.ndarray, landmarks: np.ndarray, mode: str = "threshold", threshold: float = 38,
                 low: int = 127, sigma: float = 1.5) -> np.ndarray:
    """Collage: round(image * soft / 255) with the soft map built from this kind's params."""
    images = _check_images(images)
    soft = soft_map(images, landmarks, mode=mode, threshold=threshold, low=low, sigma=sigma)
    prod = images.astype(np.uint16) * soft
    return ((prod + 127) // 255).astype(np.uint8)


def saliency_map(images: np.ndarray, landmarks: np.ndarray | None = None,
                 method: str = "spectral_residual") -> np.ndarray:
    """OpenCV contrib static saliency per image, min-max scaled to 0..255 (a flat image or map -> zeros).

    Spectral residual works on a 64x64 resize internally and returns the input size; fine-grained
    works at the input size. Landmarks are ignored.
    """
    images = _check_images(images)
    if method == "spectral_residual":
        algo = cv2.saliency.StaticSaliencySpectralResidual_create()
    elif method == "fine_grained":
        algo = cv2.saliency.StaticSaliencyFineGrained_create()
    else:
        raise ValueError(f"saliency method '{method}' unknown (one of {SALIENCY_METHODS})")
    n, s, _ = images.shape
    out = np.zeros((n, s, s), np.uint8)
    for i in range(n):
        if images[i].min() == images[i].max():
            continue                  # a flat image has nothing salient (spectral residual returns FFT noise)
        ok, sal = algo.computeSaliency(images[i])
        if not ok:
            raise RuntimeError(f"cv2 saliency ({method}) failed on image {i}")
        sal = np.asarray(sal, np.float32)
        if sal.shape != (s, s):
            sal = cv2.resize(sal, (s, s), interpolation=cv2.INTER_LINEAR)
        lo, hi = float(sal.min()), float(sal.max())
        if hi > lo:
            out[i] = np.rint((sal - lo) * (255.0 / (hi - lo)))
    return out


_FUNCS: dict[str, Callable[..., np.ndarray]] = {
    "landmarks": landmarks_map,
    "soft": soft_map,
    "dilation": dilation_map,
    "patches": patches_map,
    "weighted": weighted_map,
    "saliency": saliency_map,
}


def resolve_params(kind: str, params: dict | None = None) -> dict:
    """The kind's defaults updated with `params`; ValueError naming an unknown kind or param."""
    if kind not in DEFAULT_PARAMS:
        raise ValueError(f"unknown guide kind '{kind}' (one of {GUIDE_KINDS})")
    params = dict(params or {})
    unknown = sorted(set(params) - set(DEFAULT_PARAMS[kind]))
    if unknown:
        raise ValueError(f"guide '{kind}': unknown param(s) {unknown} (accepts {sorted(DEFAULT_PARAMS[kind])})")
    return {**DEFAULT_PARAMS[kind], **params}


def make_guide(kind: str, images: np.ndarray, landmarks: np.ndarray | None, **params) -> np.ndarray:
    """Guide map (or collage) of `kind` for uint8 images [N, S, S] and normalized landmarks [N, 68, 2].

    `found` (bool [N], params key reserved): faces whose landmarks were not found; with `missing: white`
    their map is white (255) and a collage keeps the image. None = every face found."""
    found = params.pop("found", None)
    prm = resolve_params(kind, params)
    missing = prm.pop("missing", None)
    if missing is not None and missing not in MISSING_MODES:
        raise ValueError(f"guide '{kind}': missing '{missing}' unknown (one of {MISSING_MODES})")
    out = _FUNCS[kind](images, landmarks, **prm)
    if missing == "white" and found is not None and not np.all(found):
        lost = ~np.asarray(found, bool)
        out[lost] = images[lost] if kind in ("patches", "weighted") else 255
    return out


# -------------------------------------------------------------------------------------- the stage
@writes("out_path", "sheet_path")
def run_guide(kind: str, images_path: str, landmarks_path: str | None, out_path: str,
              sheet_path: str | None = None, **params) -> dict:
    """Stage guide_<kind>: gray48 images + landmarks -> one packed guide artifact and a contact sheet.
    RGB gray48 images (ingest.color rgb) are made gray first (``ferpipe.imaging.gray_images``): maps
    and collages are gray.

    Writes out_path atomically (images uint8 [N,S,S] = the map or collage, ids, found copied from the
    landmarks file; attrs stage="guide", kind, size and the params) and, if sheet_path, a contact
    sheet. landmarks_path may be None only for saliency (then no `found` is written). Returns a summary.
    """
    prm = resolve_params(kind, params)
    data = read_h5(images_path, ["images", "ids"])
    images, ids = _check_images(gray_images(data["images"])), data["ids"]
    lm = found = None
    made_with = {}  # how the landmarks were made: inference repeats it (ferpipe.recognize)
    if landmarks_path is not None:
        ldata = read_h5(landmarks_path, ["landmarks", "found", "ids"])
        lids = ldata["ids"]
        if len(lids) != len(ids) or not np.array_equal(lids, ids):
            if len(lids) != len(ids):
                why = f"{len(ids)} images vs {len(lids)} landmark rows"
            else:
                j = int(np.flatnonzero(lids != ids)[0])
                why = f"first difference at row {j}: image id '{ids[j]}' vs landmarks id '{lids[j]}'"
            raise ValueError(f"ids of {images_path} and {landmarks_path} differ ({why}); "
                             "rerun the landmarks stage on the same images")
        lm = _check_landmarks(ldata["landmarks"], len(images))
        found = np.asarray(ldata["found"], bool)
        lattrs = read_attrs(landmarks_path)
        made_with = {f"landmarks_{k}": lattrs[k] for k in ("size", "passes") if k in lattrs}
    elif kind != "saliency":
        raise ValueError(f"guide '{kind}' needs a landmarks file")

    out = make_guide(kind, images, lm, found=found, **prm)
    arrays = {"images": out, "ids": ids}
    if found is not None:
        arrays["found"] = found
    attrs = {"stage": "guide", "kind": kind, "size": int(images.shape[1]), **prm, **made_with}
    write_h5(out_path, arrays, attrs)

    if sheet_path:
        write_png(sheet_path, guide_sheet(images, lm, found, out, kind))
    summary = {"kind": kind, "images": int(len(out)), "size": int(images.shape[1]), **prm}
    if found is not None:
        summary["not_found"] = int((~found).sum())
    if lm is not None:
        summary["nonfinite_landmarks"] = int((~np.isfinite(lm).all(axis=(1, 2))).sum())
    return summary


def guide_sheet(images: np.ndarray, landmarks: np.ndarray | None, found: np.ndarray | None,
                guides: np.ndarray, kind: str, k: int = 12, cell: int = 96) -> np.ndarray:
    """Two rows: k sample faces with their landmarks (red where found=False), then their guide maps."""
    idx = sample_indices(len(images), k)
    faces = []
    for i in idx:
        if landmarks is None:
            faces.append(cv2.resize(images[i], (cell, cell), interpolation=cv2.INTER_CUBIC))
        else:
            ok = found is None or bool(found[i])
            pts = landmarks[i] if np.isfinite(landmarks[i]).all() else np.zeros((0, 2), np.float32)
            faces.append(draw_points(images[i], pts, cell=cell, color=(0, 255, 0) if ok else (0, 0, 255)))
    return grid([faces, list(guides[idx])], cell=cell, labels=["faces", kind])
