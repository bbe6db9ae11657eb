"""The ingest stage: any supported dataset -> one packed HDF5 of size x size grayscale images
(uint8 [N, S, S]), or with color "rgb" (ingest.color) of RGB images (uint8 [N, S, S, 3], RGB order;
attrs color records which: a file without it is gray, as every file written before it existed).

read_dataset gives the manifest; a process pool decodes it in chunks (workers get paths or pixel
strings and send back one uint8 block per chunk, so per-image overhead stays at the decode itself);
rows that do not decode join the reader's rejects with the reason. The decoded blocks go straight
into the packed file (``ferpipe.store.h5_writer``, a growable dataset: the count of rows that decode
is known only at the end), so a dataset larger than memory (AffectNet at 224 px) never has to fit.
Sequences are checked again after decoding: frame_index counts the frames that decoded (0, 1, ...
without gaps) and a sequence left with fewer than the reader's min_length frames is rejected whole
(its decoded frames are cut out of the file again: ``H5Writer.keep``). The outputs (images, manifest,
rejects, metrics, sheet) are one output set (ferpipe.store): a failing or killed ingest leaves the
previous set exactly as it was.
"""
from __future__ import annotations

import inspect
import math
import time
from collections import Counter

import cv2
import numpy as np
import pandas as pd
from tqdm import tqdm

from ferpipe.data.decode import COLORS, ImageError, crop_box, decode_full, decode_image, decode_pixels
from ferpipe.data.labels import class_list
from ferpipe.data.readers import READERS, REJECT_COLUMNS, DatasetError, read_dataset
from ferpipe.imaging import gray_images
from ferpipe.params import workers as worker_count
from ferpipe.plots import grid, sample_indices, sheet_images, write_png
from ferpipe.pool import spawn_pool
from ferpipe.store import h5_writer, write_csv, write_json, writes

CHUNK = 512
SHEET_PER_CLASS = 12


FACE_COLUMNS = ("face_x0", "face_y0", "face_x1", "face_y1", "face_detector", "face_confidence")
_DETECTOR = None  # per worker process: the photo face detector of face_crop, built on first use


def _init_worker():
    cv2.setNumThreads(1)  # one process per core already; cv2's own threads would only contend


def _face_crop(image: np.ndarray, size: int, margin: float) -> tuple[np.ndarray, tuple]:
    """The largest face of a photo (gray [H, W] or RGB [H, W, 3]), aligned and framed like FER-2013
    (ferpipe.faces.detect; found on the gray, cut from the image in its colours), and its box
    (x0, y0, x1, y1), detector pass and score. ImageError when no face is found."""
    global _DETECTOR
    from ferpipe.faces.detect import FaceDetector, align_face

    if _DETECTOR is None:
        _DETECTOR = FaceDetector()
    faces = _DETECTOR.detect(gray_images(image[None])[0])
    if not faces:
        raise ImageError("no face found (ingest.face_crop)")
    f = faces[0]
    return align_face(image, f.landmarks, size, margin), (*(float(v) for v in f.box), f.method, float(f.confidence))


def image_shape(size: int, color: str = "gray") -> tuple[int, ...]:
    """The shape of one packed image: (size, size), or (size, size, 3) for color rgb."""
    return (size, size, 3) if color == "rgb" else (size, size)


def _decode_chunk(task):
    """(size, max_bytes, face_margin | None, color, [(pixels | None, source, box | None), ...]) ->
    (uint8 [k, size, size] (rgb: [k, size, size, 3]), [(i, reason)], [(i, face info)]): with a face
    margin, the largest face of each image is found, aligned and cropped (face info: FACE_COLUMNS)."""
    size, max_bytes, face_margin, color, items = task
    out = np.zeros((len(items), *image_shape(size, color)), np.uint8)
    errors, faces = [], []
    for i, (pixels, source, box) in enumerate(items):
        try:
            if face_margin is None:
                out[i] = decode_pixels(pixels, size, color=color) if pixels is not None \
                    else decode_image(source, size, box, max_bytes, color)
                continue
            image = decode_pixels(pixels, 48, color=color) if pixels is not None \
                else decode_full(source, max_bytes, color)
            if box is not None:
                image = crop_box(image, box)
            out[i], info = _face_crop(image, size, face_margin)
            faces.append((i, info))
        except ValueError as e:  # ImageError, and anything else a decoder raises as bad data
            errors.append((i, str(e)))
        except Exception as e:  # a decoder bug on one odd file must not stop a 300k-image ingest
            errors.append((i, f"decode failed: {type(e).__name__}: {e}"))
    return out, errors, faces


def _items(manifest: pd.DataFrame) -> list[tuple]:
    n = len(manifest)
    pixels = manifest["pixels"].tolist() if "pixels" in manifest else [None] * n
    if "box_x" in manifest:
        boxes = list(zip(*(manifest[c].tolist() for c in ("box_x", "box_y", "box_w", "box_h"))))
    else:
        boxes = [None] * n
    return list(zip(pixels, manifest["source"].tolist(), boxes))


def decode_all(manifest: pd.DataFrame, size: int, workers: int = 0, progress: bool = True,
               max_bytes: int | None = None, face_margin: float | None = None, sink=None, color: str = "gray"):
    """Decode every manifest row -> (images uint8 [N, size, size] (color rgb: [N, size, size, 3]),
    ok bool [N], reasons {row: str}).
    Files larger than max_bytes are rejected unread. With face_margin, each image becomes its largest
    face (see _face_crop) and the manifest gains the FACE_COLUMNS (in place). With `sink`, the rows
    that decoded are handed to ``sink(block)`` chunk by chunk, in row order, instead of being kept
    (images is then None): the whole array is never in memory."""
    items = _items(manifest)
    n = len(items)
    nproc = worker_count(workers)
    # small datasets: smaller chunks so every worker gets some
    chunk = max(1, min(CHUNK, math.ceil(n / (4 * nproc)))) if n else 1
    tasks = [(size, max_bytes, face_margin, color, items[i:i + chunk]) for i in range(0, n, chunk)]
    face_info: dict[int, tuple] = {}
    nproc = min(nproc, len(tasks)) or 1
    images = np.zeros((n, *image_shape(size, color)), np.uint8) if sink is None else None
    ok = np.ones(n, bool)
    reasons = {}
    bar = tqdm(total=n, unit="img", desc="ingest", disable=None if progress else True)
    # spawn, not fork: a fork of a process whose OpenCV/torch threads already ran can deadlock
    # (seen: the test suite hung here after earlier tests used cv2 and torch in the same process)
    pool = spawn_pool(nproc, initializer=_init_worker) if nproc > 1 else None
    try:
        results = pool.imap(_decode_chunk, tasks) if pool else map(_decode_chunk, tasks)
        start = 0
        for out, errors, faces in results:
            for i, reason in errors:
                ok[start + i] = False
                reasons[start + i] = reason
            if sink is None:
                images[start:start + len(out)] = out
            else:
                sink(out[ok[start:start + len(out)]])
            face_info.update((start + i, info) for i, info in faces)
            start += len(out)
            bar.update(len(out))
    finally:
        bar.close()
        if pool:
            pool.terminate()
            pool.join()
    if face_margin is not None:
        empty = (np.nan, np.nan, np.nan, np.nan, "", np.nan)
        for k, column in enumerate(FACE_COLUMNS):
            manifest[column] = [face_info.get(i, empty)[k] for i in range(n)]
    return images, ok, reasons


def _summary(reasons) -> str:
    common = Counter(str(r).split(" (")[0] for r in reasons).most_common(3)
    return "; ".join(f"{r} x{n}" for r, n in common)


def contact_sheet(read_rows, labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """One row of samples per class, labelled "<class> <count>"; one unlabelled row if no classes.
    `read_rows(indices)` gives the images (uint8 [k, S, S], or RGB [k, S, S, 3]) of those rows."""
    rows, names = [], []
    groups = [(c, np.flatnonzero(labels == c)) for c in classes] or [("all", np.arange(len(labels)))]
    for name, idx in groups:
        rows.append(sheet_images(read_rows(idx[sample_indices(len(idx), SHEET_PER_CLASS)])))
        names.append(f"{name} {len(idx)}")
    return grid(rows, cell=64, labels=names)


def check_sequences(manifest: pd.DataFrame, ok: np.ndarray, reasons: dict, min_length: int) -> None:
    """After decoding: sequences left with fewer than min_length decoded frames are rejected whole
    (ok and reasons updated in place), and frame_index counts the decoded frames 0, 1, ... (a frame
    that did not decode leaves no gap). Rows without a sequence_id are untouched."""
    seq = manifest["sequence_id"].astype(str).to_numpy() if "sequence_id" in manifest else None
    if seq is None or not (seq != "").any():
        return
    in_seq = seq != ""
    kept = pd.Series(seq[ok & in_seq])
    counts = kept.value_counts()
    total = pd.Series(seq[in_seq]).value_counts()
    for i in np.flatnonzero(ok & in_seq):
        n = int(counts.get(seq[i], 0))
        if n < min_length:
            ok[i] = False
            reasons[i] = (f"sequence too short after decoding: {n} of its {int(total[seq[i]])} frame(s) "
                          f"decoded < min_length {min_length}")
    index = manifest["frame_index"].to_numpy().copy()
    rows = np.flatnonzero(ok & in_seq)
    index[rows] = pd.Series(seq[rows]).groupby(seq[rows], sort=False).cumcount().to_numpy()
    manifest["frame_index"] = index


def _min_length(fmt: str, options: dict) -> int:
    """The reader's min_length (its option, else its default); 1 for readers without one."""
    param = inspect.signature(READERS[fmt]).parameters.get("min_length") if fmt in READERS else None
    return int(options.get("min_length", param.default)) if param is not None else 1


@writes("out_images", "out_manifest", "out_rejects", "metrics_path", "sheet_path")
def run_ingest(fmt: str, path, root, out_images, out_manifest, out_rejects, metrics_path, sheet_path,
               size: int = 48, workers: int = 0, options: dict | None = None, progress: bool = True,
               max_file_mb: float | None = None, face_crop: bool = False, face_margin: float = 1.0,
               color: str = "gray") -> dict:
    """Read a dataset, decode it to size x size uint8 gray (color "rgb": RGB), write the packed images
    and tables.

    Writes out_images (HDF5: images [N,size,size] (rgb: [N,size,size,3], RGB order), ids [N]; attrs
    stage, size, format, path, root, classes, face_crop, face_margin, and color "rgb" for an RGB file:
    a gray file has no color attr: its datasets and attrs are those of a file written before RGB existed),
    out_manifest (kept rows in image order, no pixels column), out_rejects (always, header even when
    empty), metrics_path (JSON counts) and sheet_path (contact sheet PNG; None/"" skips),
    as one output set. `options` are the reader's extra keywords (split, sort, ignore_missing,
    min_length, ...). Image files larger than max_file_mb (None/0: no limit) are rejected unread.
    face_crop: for photos (in-the-wild datasets, not FER-style crops): the largest face of each image
    is found, aligned by its landmarks and framed like FER-2013 (face_margin > 1 keeps more around it);
    the manifest records its box (FACE_COLUMNS) and an image without a face is a rejects row.
    Returns the metrics plus the wall time. Raises DatasetError (and writes nothing) when no row can
    be used, ValueError for a size < 1 or an unknown color.
    """
    if int(size) < 1:
        raise ValueError(f"ingest size must be >= 1 pixel, got {size}")
    if color not in COLORS:
        raise ValueError(f"ingest.color must be one of {', '.join(COLORS)}, got {color!r}")
    if face_crop and not float(face_margin) > 0:
        raise ValueError(f"ingest face_margin must be > 0, got {face_margin}")
    t0 = time.perf_counter()
    options = dict(options or {})
    manifest, rejects = read_dataset(fmt, path, root=root or "", **options)
    if manifest.empty:
        raise DatasetError(f"{path}: no usable rows ({len(rejects)} rejected: {_summary(rejects['reason'])})")
    max_bytes = int(float(max_file_mb) * 2**20) if max_file_mb else None
    with h5_writer(out_images) as out:
        _, ok, reasons = decode_all(manifest, size, workers, progress, max_bytes,
                                    float(face_margin) if face_crop else None,
                                    sink=lambda block: out.append("images", block), color=color)
        decoded = ok.copy()
        check_sequences(manifest, ok, reasons, _min_length(fmt, options))
        if not ok.any():
            raise DatasetError(f"{path}: no image could be decoded ({len(reasons)} failed: "
                               f"{_summary(reasons.values())})")
        if not ok[decoded].all():  # sequences left too short: their decoded frames leave the file
            out.keep("images", ok[decoded])
        bad = np.flatnonzero(~ok)
        decode_rejects = pd.DataFrame({"source": manifest["source"].to_numpy()[bad].astype(str),
                                       "line": np.full(len(bad), -1, np.int64),
                                       "reason": [reasons[i] for i in bad]}, columns=REJECT_COLUMNS)
        rejects = pd.concat([rejects, decode_rejects], ignore_index=True) if len(bad) else rejects
        kept = manifest[ok].reset_index(drop=True)
        labels = kept["label_name"].to_numpy().astype(str)
        classes = class_list(labels)
        metrics = {
            "images": int(len(kept)),
            "rejected": int(len(rejects)),
            "splits": {str(k): int(v) for k, v in kept["split"].value_counts().sort_index().items()},
            "classes": {c: int((labels == c).sum()) for c in classes},
        }
        sheet = contact_sheet(lambda rows: out.read("images", rows), labels, classes) if sheet_path else None
        out.attrs.update({"stage": "ingest", "size": int(size), "format": fmt, "path": str(path),
                          "root": str(root or ""), "classes": classes, "face_crop": bool(face_crop),
                          "face_margin": float(face_margin), **({"color": "rgb"} if color == "rgb" else {})})
        out.write("ids", kept["id"].to_numpy().astype(str))
    write_csv(out_manifest, kept.drop(columns=["pixels"], errors="ignore"))
    write_csv(out_rejects, rejects)
    if metrics_path:
        write_json(metrics_path, metrics)
    if sheet is not None:
        write_png(sheet_path, sheet)
    seconds = time.perf_counter() - t0
    return {**metrics, "seconds": round(seconds, 2), "images_per_s": round(len(manifest) / seconds, 1)}
