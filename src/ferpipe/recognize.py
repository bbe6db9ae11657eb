"""Recognize facial expressions in photos, folders, face crops and videos with a ferpipe model.

    from ferpipe.recognize import Recognizer, draw
    fer = Recognizer()                              # the bundled FER-2013 model (7 classes)
    result = fer.recognize("photo.jpg")             # one Face per face: box, landmarks, label, probs
    table = fer.recognize_batch(["a.jpg", "b.png"]) # a pandas DataFrame, one row per face
    video = fer.recognize_video("clip.mp4")         # per frame and face, with a tracked face_id
    cv2.imwrite("out.png", draw("photo.jpg", result))

Models: ``Recognizer(model)`` takes the bundled model (None / "bundled"), a checkpoint file, the
train stage's ``models/`` folder (final.pt, else every fold model as an ensemble: as the evaluate
stage chooses) or a list of any of these (an ensemble: probabilities averaged).

Inference repeats training's preprocessing exactly, read from each checkpoint's meta: a face crop is
resized to the ingest size, then to the gray48 size (both with ``ferpipe.imaging.resize``); guided models get
their guide map made from landmarks found by the landmarks stage's own cascade on that crop, with
the run's landmark and guide params; pixels are standardized with the run's statistics. So on
FER-style crops (``crops=True``) the probabilities equal the evaluate stage's (tests check 1e-5).

In photos, faces are found by ``ferpipe.faces.detect.FaceDetector`` and cut out framed like the
FER-2013 crops (``align_face``). A photo with no face gives a result with no faces and the reason.
A model trained on RGB images (ingest.color rgb: its meta["input"] image_channels 3) gets colour crops:
the face is found and aligned on the gray as for gray models, and cut from the colour image.
Tables use the column names users know from OpenFace / py-feat: input, frame, face_id, timestamp,
success, confidence, FaceRectX/Y/Width/Height, x_0..x_67, y_0..y_67, label, probability, then one
column per class; images and folders use frame 0, so one CSV reader serves every output.

A valence/arousal model (a checkpoint of task valence_arousal) gives each face ``values``
{"valence", "arousal"} on the original scale (the network's outputs mapped back with the run's
target mean/std, averaged over the ensemble and TTA copies) instead of class probabilities: its
tables have the columns valence, arousal in place of label, probability and the class columns.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ferpipe.data.decode import ImageError, decode_full, decode_gray
from ferpipe.imaging import gray_images, resize, resize_batch
from ferpipe.evaluate.run import TTA_MODES, predict_pixels, select_checkpoints
from ferpipe.faces.detect import FaceDetector, align_face
from ferpipe.guides.maps import DEFAULT_PARAMS, make_guide
from ferpipe.models.checkpoint import CheckpointError, load_checkpoint, regression_scale
from ferpipe.models.inference import inference_model
from ferpipe.models.inputs import InputSpec, image_planes, normalize, split_channels
from ferpipe.models.sequence import load_sequence_model
from ferpipe.sequences.features import LayerTap
from ferpipe.store import read_attrs, read_h5

BUNDLED = Path(__file__).resolve().parent / "weights" / "fer2013_vgg7.pt"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".pgm", ".ppm"}
VIDEO_SUFFIXES = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv"}
LANDMARK_DEFAULTS = {"size": 96, "passes": ["dlib", "dlib_equalized", "dlib_padded", "mtcnn", "haar", "mmod"]}


class RecognizeError(ValueError):
    """An input or option that cannot be used; str(error) names it and the problem."""


@dataclass
class Face:
    """One recognized face. ``box`` (x0, y0, x1, y1) and ``landmarks`` [68, 2] are in the input's pixels
    (``landmarks`` is None for a crop whose model needed no landmarks). A classifier fills ``probs``; a
    valence/arousal model fills ``values`` ({"valence": v, "arousal": a}) and leaves ``probs`` empty
    (``label`` is then "" and ``probability`` NaN)."""

    box: np.ndarray
    confidence: float
    detector: str
    landmarks: np.ndarray | None
    probs: dict[str, float]
    values: dict[str, float] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return max(self.probs, key=self.probs.get) if self.probs else ""

    @property
    def probability(self) -> float:
        return self.probs[self.label] if self.probs else float("nan")


@dataclass
class Result:
    """The faces of one image (or frame). No faces: ``reason`` says why (no face found, unreadable)."""

    input: str
    faces: list[Face] = field(default_factory=list)
    reason: str = ""
    failed: bool = False      # the input could not be read at all (the CLI's exit code counts these)
    frame: int = 0
    timestamp: float = 0.0
    face_ids: list[int] = field(default_factory=list)
    crops: list[np.ndarray] = field(default_factory=list, repr=False)   # video: the faces' crops, on request


# ------------------------------------------------------------------------------------------- models

def model_paths(model=None) -> list[Path]:
    """Checkpoint files for a model argument (see the module docstring)."""
    if model is None or (isinstance(model, str) and model == "bundled"):
        return [BUNDLED]
    if isinstance(model, (list, tuple)):
        return [p for m in model for p in model_paths(m)]
    path = Path(model)
    if path.is_dir():
        try:
            return select_checkpoints(path, "auto")[1]
        except FileNotFoundError as e:
            raise RecognizeError(str(e)) from None
    if not path.exists():
        raise RecognizeError(f"{path}: model not found (a checkpoint .pt, a models/ folder or 'bundled')")
    return [path]


@dataclass
class Member:
    """One checkpoint of a (possibly ensembled) recognizer."""

    path: Path
    model: nn.Module
    spec: InputSpec
    preprocess: dict
    info: dict
    scale: tuple[np.ndarray, np.ndarray] | None = None   # a valence/arousal model's target mean, std


def _preprocess(info: dict, spec: InputSpec) -> dict:
    """The checkpoint's preprocessing record, completed with the pipeline defaults for checkpoints made
    before it was recorded (a guide's default params, the default landmark cascade)."""
    rec = dict((info.get("meta") or {}).get("preprocess") or {})
    rec.setdefault("ingest_size", 48)
    rec.setdefault("gray48_size", spec.size)
    guides = dict(rec.get("guides") or {})
    for kind in {spec.image, spec.guide} - {"gray48", None}:
        guides.setdefault(kind, dict(DEFAULT_PARAMS[kind]))
    rec["guides"] = guides
    if guides and set(guides) != {"saliency"}:
        rec["landmarks"] = rec.get("landmarks") or dict(LANDMARK_DEFAULTS)
    return rec


def load_members(model=None, device: str | torch.device = "cpu") -> list[Member]:
    members = []
    for path in model_paths(model):
        try:
            net, info = load_checkpoint(path, map_location=device)
        except CheckpointError as e:
            raise RecognizeError(str(e)) from None
        spec = InputSpec.from_dict((info.get("meta") or {}).get("input"))
        try:
            scale = regression_scale(info)
        except CheckpointError as e:
            raise RecognizeError(f"{path}: {e}") from None
        members.append(Member(path, inference_model(net).to(device), spec, _preprocess(info, spec), info, scale))
    first = members[0]
    for m in members[1:]:
        if (m.scale is None) != (first.scale is None):
            raise RecognizeError(f"{m.path} and {first.path}: a classifier and a valence/arousal model do not "
                                 "make an ensemble")
        if m.info["classes"] != first.info["classes"]:
            raise RecognizeError(f"{m.path}: classes {m.info['classes']} differ from {first.path}'s "
                                 f"{first.info['classes']}: an ensemble needs one class list")
        if (m.preprocess["ingest_size"], m.preprocess["gray48_size"]) != \
                (first.preprocess["ingest_size"], first.preprocess["gray48_size"]):
            raise RecognizeError(f"{m.path}: trained at other image sizes than {first.path}")
        if m.spec.image_channels != first.spec.image_channels:
            raise RecognizeError(f"{m.path}: trained on {m.spec.image_channels}-channel images, {first.path} on "
                                 f"{first.spec.image_channels}-channel ones: an ensemble needs one colour "
                                 "(ingest.color)")
    return members


# ------------------------------------------------------------------------------------------ inputs

def expand_inputs(paths: Iterable) -> tuple[list, list[tuple[str, str]]]:
    """Files, folders (recursively: images and videos, sorted) and arrays -> (inputs, [(path, reason)])
    for paths that do not exist or folders without any image."""
    out, bad = [], []
    for p in paths:
        if isinstance(p, np.ndarray):
            out.append(p)
            continue
        path = Path(p)
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
            if not found:
                bad.append((str(path), "folder has no images or videos"))
            out.extend(found)
        elif path.exists():
            out.append(path)
        else:
            bad.append((str(path), "not found"))
    return out, bad


def is_video(source) -> bool:
    return not isinstance(source, np.ndarray) and Path(source).suffix.lower() in VIDEO_SUFFIXES


def array_image(image: np.ndarray, color: str = "gray") -> np.ndarray:
    """A numpy image -> uint8 gray [H, W] (color "rgb": RGB [H, W, 3]): 2-D is gray (three equal channels
    for rgb); 3 or 4 channels are BGR(A), OpenCV's order."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise RecognizeError(f"array images must be uint8, got {a.dtype}")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim == 2:
        return np.repeat(a[..., None], 3, axis=-1) if color == "rgb" else a
    if a.ndim == 3 and a.shape[2] in (3, 4):
        if color == "rgb":
            return cv2.cvtColor(a, cv2.COLOR_BGR2RGB if a.shape[2] == 3 else cv2.COLOR_BGRA2RGB)
        return cv2.cvtColor(a, cv2.COLOR_BGR2GRAY if a.shape[2] == 3 else cv2.COLOR_BGRA2GRAY)
    raise RecognizeError(f"array images must be [H, W] or [H, W, 3|4], got shape {a.shape}")


def _name(source) -> str:
    if isinstance(source, np.ndarray):
        return "<array>"
    return "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


# --------------------------------------------------------------------------------------- recognizer

class Recognizer:
    """Apply one model (or an ensemble) to photos, crops and videos; see the module docstring.

    ``tta``: test-time augmentation copies averaged with the plain prediction (evaluate.tta's flip and
    small affine, ``tta_augment``, seeded by ``seed``), or ``tta_mode="tencrop"``: the ten crops averaged; ``margin`` > 1 shows the model more around each
    face than the FER-2013 framing (default: the margin of the ingest face crop the model was trained
    on, else 1); ``detector`` a FaceDetector (its passes and thresholds).
    """

    def __init__(self, model=None, tta: int = 0, tta_augment: dict | None = None, seed: int = 2020,
                 batch_size: int = 256, device: str = "cpu", detector: FaceDetector | None = None,
                 margin: float | None = None, threads: int = 0, tta_mode: str = "random"):
        if threads:
            torch.set_num_threads(int(threads))
        self.device = torch.device(device)
        self.members = load_members(model, self.device)
        self.classes: list[str] = list(self.members[0].info["classes"])   # a regression's: its target names
        self.regression = self.members[0].scale is not None   # valence/arousal values instead of probabilities
        self.tta, self.seed, self.batch_size = int(tta), int(seed), int(batch_size)
        self.tta_augment = tta_augment or {"hflip": 0.5, "degrees": 5, "scale": [0.95, 1.05], "translate": 0.05}
        if self.tta < 0 or self.batch_size < 1:
            raise RecognizeError("tta must be >= 0 and batch_size >= 1")
        if tta_mode not in TTA_MODES:
            raise RecognizeError(f"tta_mode must be one of {', '.join(TTA_MODES)}, got {tta_mode!r}")
        self.tta_mode = tta_mode
        self._detector = detector
        pre = self.members[0].preprocess
        # a model trained on ingest's face crops sees faces cut with that margin; else FER-2013's framing
        self.margin = float(margin if margin is not None else (pre.get("face_margin") or 1.0))
        self.ingest_size, self.gray48_size = int(pre["ingest_size"]), int(pre["gray48_size"])
        # what the faces are cut from: the colour image for a model trained on RGB (ingest.color rgb)
        self.color = "rgb" if self.members[0].spec.image_channels == 3 else "gray"

    @property
    def detector(self) -> FaceDetector:
        if self._detector is None:
            self._detector = FaceDetector()
        return self._detector

    def __repr__(self) -> str:
        names = sorted({m.info["model"] for m in self.members})
        what = "targets" if self.regression else "classes"
        return f"Recognizer({'+'.join(names)}, {len(self.members)} checkpoint(s), {what}={self.classes})"

    # -- the network ---------------------------------------------------------------------------
    def crop_shape(self) -> tuple[int, ...]:
        """The shape of one face crop: (ingest_size, ingest_size), and 3 RGB channels for an RGB model."""
        side = (self.ingest_size, self.ingest_size)
        return (*side, 3) if self.color == "rgb" else side

    def model_inputs(self, crops: np.ndarray) -> list[np.ndarray]:
        """Each member's uint8 input pixels [N, C, S, S] for face crops [N, ingest_size, ingest_size]
        (RGB model: [N, ingest_size, ingest_size, 3]; the ingest stage's output for these faces): the
        gray48 resize, and for guided and collage models the maps made from the landmarks stage's
        cascade run on the crops (their gray, as the stages), with the run's params."""
        crops = np.asarray(crops, np.uint8)
        if crops.ndim != 1 + len(self.crop_shape()) or crops.shape[1:] != self.crop_shape():
            shape = ", ".join(map(str, self.crop_shape()))
            raise RecognizeError(f"crops must be uint8 [N, {shape}], got {crops.shape}")
        image = resize_batch(crops, self.gray48_size)
        gray = gray_images(image)
        landmarks: dict[tuple, np.ndarray] = {}
        out = []
        for m in self.members:
            maps = {"gray48": image}
            lm_cfg, lm = m.preprocess.get("landmarks"), None
            if lm_cfg and set(m.preprocess["guides"]) - {"saliency"}:
                key = (int(lm_cfg["size"]), tuple(lm_cfg["passes"]))
                if key not in landmarks:
                    from ferpipe.faces.landmarks import detect_landmarks
                    found = detect_landmarks(gray_images(crops), size=key[0], passes=key[1], workers=1,
                                             progress=False)
                    landmarks[key] = (found.points, found.found)
                lm, lm_found = landmarks[key]
            for kind, prm in m.preprocess["guides"].items():
                maps[kind] = make_guide(kind, gray, lm, found=None if lm is None else lm_found, **prm)
            arrays = [image_planes(maps[m.spec.image])] + ([maps[m.spec.guide][:, None]] if m.spec.guide else [])
            out.append(np.ascontiguousarray(np.concatenate(arrays, axis=1)))
        return out

    def predict(self, crops: np.ndarray) -> np.ndarray:
        """For uint8 face crops [N, ingest_size, ingest_size]: class probabilities [N, C], or a
        valence/arousal model's values [N, 2] on the original scale; averaged over the ensemble."""
        if len(crops) == 0:
            return np.zeros((0, len(self.classes)))
        probs = np.zeros((len(crops), len(self.classes)))
        for m, pixels in zip(self.members, self.model_inputs(crops)):
            probs += predict_pixels(m.model, torch.from_numpy(pixels).to(self.device), m.spec, self.tta,
                                    self.tta_augment, self.seed, self.batch_size, m.scale, self.tta_mode)
        return probs / len(self.members)

    def classify(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities [N, C] for uint8 face crops [N, ingest_size, ingest_size], averaged over
        the ensemble (a valence/arousal model has no classes: ``predict``)."""
        if self.regression:
            raise RecognizeError("a valence/arousal model has no class probabilities: use predict()")
        return self.predict(crops)

    # -- faces in one image (gray, or RGB for an RGB model) ------------------------------------
    def _faces(self, image: np.ndarray, crops: bool) -> tuple[list[np.ndarray], list[tuple], str]:
        """(crops at the ingest size, [(box, confidence, detector, landmarks)], reason when none).
        Faces are found on the gray; an RGB image's crops are cut from its colours."""
        h, w = image.shape[:2]
        if crops:
            return [resize(image, self.ingest_size)], [(np.array([0, 0, w, h], np.float32), float("nan"), "crop",
                                                        None)], ""
        faces = self.detector.detect(gray_images(image[None])[0])
        if not faces:
            return [], [], "no face found"
        cut = [align_face(image, f.landmarks, self.ingest_size, self.margin) for f in faces]
        return cut, [(f.box, f.confidence, f.method, f.landmarks) for f in faces], ""

    def _finish(self, results: list[Result], pending: list[tuple[int, tuple]], crops: list[np.ndarray]) -> None:
        out = self.predict(np.stack(crops)) if crops else np.zeros((0, len(self.classes)))
        for (i, (box, conf, det, lm)), p in zip(pending, out):
            named = dict(zip(self.classes, map(float, p)))
            face = Face(box, conf, det, lm, {}, named) if self.regression else Face(box, conf, det, lm, named)
            results[i].faces.append(face)

    def recognize(self, image, crops: bool = False) -> Result:
        """The faces of one image: a path, image bytes, or a numpy array (gray, or BGR as OpenCV)."""
        return self.recognize_many([image], crops)[0]

    def recognize_many(self, images: Iterable, crops: bool = False, progress: bool = False) -> list[Result]:
        """Results for several images, the network batched across them. Unreadable inputs give a
        failed Result with the reason, not an exception."""
        from tqdm import tqdm

        images = list(images)
        results: list[Result] = []
        pending, cut = [], []
        for source in tqdm(images, desc="recognize", unit="img", disable=not progress):
            r = Result(_name(source))
            results.append(r)
            try:
                image = array_image(source, self.color) if isinstance(source, np.ndarray) \
                    else decode_full(source, color=self.color)
            except (ImageError, RecognizeError) as e:
                r.reason, r.failed = str(e), True
                continue
            faces_cut, faces, r.reason = self._faces(image, crops)
            pending += [(len(results) - 1, f) for f in faces]
            cut += faces_cut
            if len(cut) >= self.batch_size:
                self._finish(results, pending, cut)
                pending, cut = [], []
        self._finish(results, pending, cut)
        return results

    def recognize_batch(self, images: Iterable, crops: bool = False, progress: bool = False) -> pd.DataFrame:
        """``recognize_many`` as a DataFrame: one row per face, one row (success 0, reason) per input
        without a face or that could not be read."""
        return results_table(self.recognize_many(images, crops, progress), self.classes, self.regression)

    # -- video ----------------------------------------------------------------------------------
    def recognize_video(self, path, every: int = 1, max_frames: int | None = None, progress: bool = False,
                        tracker: "IoUTracker | None" = None, sequence_model=None) -> pd.DataFrame:
        """Per kept frame and face (every Nth frame, at most max_frames): a DataFrame with frame,
        timestamp and a face_id kept across frames by an IoU tracker. With ``sequence_model`` (a
        train_sequence model.pt, or a TrackLabeler) every row also gets its track's ``track_label`` and
        ``track_probability``: the sequence model over all of that face's crops. A video that does not
        open or has no decodable frame is a RecognizeError."""
        labeler = sequence_model if isinstance(sequence_model, TrackLabeler) or sequence_model is None \
            else TrackLabeler(sequence_model)
        results = list(self.video_results(path, every, max_frames, progress, tracker, keep_crops=labeler is not None))
        table = results_table(results, self.classes, self.regression)
        return label_tracks(table, results, labeler) if labeler is not None else table

    def video_results(self, path, every: int = 1, max_frames: int | None = None, progress: bool = False,
                      tracker: "IoUTracker | None" = None, keep_crops: bool = False) -> Iterator[Result]:
        from tqdm import tqdm

        if int(every) < 1:
            raise RecognizeError(f"every must be >= 1, got {every}")
        path = str(path)
        if not os.path.isfile(path):
            raise RecognizeError(f"{path}: video not found")
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            raise RecognizeError(f"{path}: does not open as a video (not a video, or a codec OpenCV lacks)")
        fps = cap.get(cv2.CAP_PROP_FPS) or 0.0
        total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        tracker = tracker or IoUTracker()
        bar = tqdm(total=total or None, desc=Path(path).name, unit="frame", disable=not progress)
        batch: list[Result] = []
        pending, cut = [], []
        index = kept = 0
        try:
            while max_frames is None or kept < int(max_frames):
                ok = cap.grab()
                if not ok:
                    break
                bar.update(1)
                if index % int(every):
                    index += 1
                    continue
                ok, frame = cap.retrieve()
                if not ok or frame is None:
                    break
                r = Result(path, frame=index, timestamp=index / fps if fps > 0 else float("nan"))
                faces_cut, faces, r.reason = self._faces(array_image(frame, self.color), crops=False)
                r.face_ids = tracker.update([f[0] for f in faces])
                if keep_crops:
                    r.crops = faces_cut
                batch.append(r)
                pending += [(len(batch) - 1, f) for f in faces]
                cut += faces_cut
                index += 1
                kept += 1
                if len(cut) >= self.batch_size:
                    self._finish(batch, pending, cut)
                    yield from batch
                    batch, pending, cut = [], [], []
            self._finish(batch, pending, cut)
            yield from batch
        finally:
            cap.release()
            bar.close()
        if kept == 0:
            raise RecognizeError(f"{path}: no frame could be decoded (an empty or broken video stream)")


class IoUTracker:
    """Face ids across frames: each face takes the id of the live track whose last box overlaps it most
    (IoU >= ``min_iou``, greedy, largest overlap first); the others start new ids. A track not seen for
    ``max_missed`` kept frames ends."""

    def __init__(self, min_iou: float = 0.3, max_missed: int = 15):
        self.min_iou, self.max_missed = float(min_iou), int(max_missed)
        self.tracks: dict[int, tuple[np.ndarray, int]] = {}   # id -> (last box, frames since seen)
        self.next_id = 0

    @staticmethod
    def iou(a: np.ndarray, b: np.ndarray) -> float:
        x0, y0 = max(a[0], b[0]), max(a[1], b[1])
        x1, y1 = min(a[2], b[2]), min(a[3], b[3])
        inter = max(0.0, x1 - x0) * max(0.0, y1 - y0)
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        return float(inter / union) if union > 0 else 0.0

    def update(self, boxes: list[np.ndarray]) -> list[int]:
        pairs = sorted(((self.iou(box, last), tid, i) for i, box in enumerate(boxes)
                        for tid, (last, _) in self.tracks.items()), reverse=True)
        ids: list[int | None] = [None] * len(boxes)
        taken = set()
        for overlap, tid, i in pairs:
            if overlap < self.min_iou:
                break
            if ids[i] is None and tid not in taken:
                ids[i] = tid
                taken.add(tid)
        for i, box in enumerate(boxes):
            if ids[i] is None:
                ids[i] = self.next_id
                self.next_id += 1
            self.tracks[ids[i]] = (np.asarray(box, np.float32), 0)
        for tid in list(self.tracks):
            if tid not in ids:
                box, missed = self.tracks[tid]
                if missed + 1 > self.max_missed:
                    del self.tracks[tid]
                else:
                    self.tracks[tid] = (box, missed + 1)
        return [int(i) for i in ids]


# ------------------------------------------------------------------------------------ sequences

class TrackLabeler:
    """train_sequence's model.pt applied to the face crops of each video track: one label per face_id.

    The frames go through what made the model's training features: the features file it was trained
    on (its meta, path relative to the project root) names the CNN checkpoint and the layer and holds
    its standardization; a model that kept its own training statistics (train_sequence does) applies
    those to the raw features instead, as ``train_sequence --test-only`` does. The CNN's input comes
    from its checkpoint's preprocessing record (Recognizer.model_inputs). Classification models only.
    """

    def __init__(self, model_path, root: str | os.PathLike | None = None):

        model_path = Path(model_path)
        if not model_path.is_file():
            raise RecognizeError(f"{model_path}: sequence model not found")
        try:
            self.model, info = load_sequence_model(model_path)
        except ValueError as e:  # CheckpointError included
            raise RecognizeError(str(e).replace("--test-only", "--sequence-model")) from None
        meta = info.get("meta") or {}
        if meta.get("regression") or (meta.get("config") or {}).get("task") == "regress":
            raise RecognizeError(f"{model_path}: a regression sequence model; track labels need a classifier")
        self.classes = list(meta["classes"])
        self.config = meta.get("config") or {}
        feats = self._find(meta.get("features", ""), model_path, root)
        attrs = read_attrs(feats)
        if attrs.get("mode") != "cnn":
            raise RecognizeError(f"{feats}: features of mode {attrs.get('mode')!r}; track labels need CNN features")
        self.layer = str(attrs["layer"])
        cnn = self._find(attrs["checkpoint"], model_path, root)
        self.cnn = Recognizer(cnn)
        self.tap_model, _ = load_checkpoint(cnn)          # unfolded: the layer names the features used
        stats = read_h5(feats, ["mean", "std"]) if attrs.get("standardized") else {}
        self.mean = torch.from_numpy(stats["mean"]) if stats else None
        self.std = torch.from_numpy(stats["std"]) if stats else None
        self.input_mean = torch.tensor(meta["input_mean"], dtype=torch.float32) if meta.get("input_mean") is not None else None
        self.input_std = torch.tensor(meta["input_std"], dtype=torch.float32) if meta.get("input_mean") is not None else None

    @staticmethod
    def _find(path: str, model_path: Path, root) -> Path:
        """A path the pipeline recorded relative to its project root: tried under `root`, under each
        folder above the model file, then as given."""
        p = Path(path)
        if p.is_absolute():
            if p.exists():
                return p
            raise RecognizeError(f"{path}: recorded by {model_path} but not found")
        for base in [*([Path(root)] if root else []), *model_path.resolve().parents, Path(".")]:
            if (base / p).exists():
                return base / p
        raise RecognizeError(f"{path}: recorded by {model_path} but not found (run from the project root, or "
                             "pass the project root)")

    @torch.no_grad()
    def probabilities(self, crops: np.ndarray) -> np.ndarray:
        """Class probabilities [K] for one track's crops [T, ingest_size, ingest_size], in frame order."""

        member = self.cnn.members[0]
        pixels = torch.from_numpy(self.cnn.model_inputs(crops)[0]).float().div_(255.0)
        tap = LayerTap(self.tap_model, self.layer)
        try:
            x = tap(*split_channels(normalize(pixels, member.spec), member.spec.image_channels))
        finally:
            tap.close()
        if self.input_mean is not None:    # the model's own training statistics, on the raw features
            x = (x - self.input_mean) / self.input_std
        elif self.mean is not None:       # else the features file's
            x = (x - self.mean) / self.std
        rho, max_len = int(self.config.get("rho") or 0), int(self.config.get("max_len") or 0)
        keep = rho or max_len
        if keep:
            x = x[-keep:]
        logits = self.model.steps(x[None].float())[0, -1]
        return torch.softmax(logits, 0).numpy().astype(np.float64)


def label_tracks(table: pd.DataFrame, results: list[Result], labeler: TrackLabeler) -> pd.DataFrame:
    """Add track_label / track_probability: the sequence model over each face_id's crops (results made
    with keep_crops)."""
    tracks: dict[int, list[np.ndarray]] = {}
    for r in results:
        for fid, crop in zip(r.face_ids, r.crops):
            tracks.setdefault(fid, []).append(crop)
    probs = {fid: labeler.probabilities(np.stack(c)) for fid, c in tracks.items()}
    return table.assign(
        track_label=[labeler.classes[int(probs[f].argmax())] if f in probs else "" for f in table["face_id"]],
        track_probability=[float(probs[f].max()) if f in probs else float("nan") for f in table["face_id"]])


# ------------------------------------------------------------------------------------------ tables

def results_table(results: list[Result], classes: list[str], regression: bool = False) -> pd.DataFrame:
    """One row per face, or per input/frame without any (success 0 and the reason). With `regression`
    (a valence/arousal model; `classes` its target names) the face's values in one column per target
    (valence, arousal) in place of label, probability and the class columns."""
    coords = [f"x_{i}" for i in range(68)] + [f"y_{i}" for i in range(68)]
    answer = list(classes) if regression else ["label", "probability", *classes]
    columns = ["input", "frame", "face_id", "timestamp", "success", "reason", "detector", "confidence",
               "FaceRectX", "FaceRectY", "FaceRectWidth", "FaceRectHeight", *coords, *answer]
    rows = []
    for r in results:
        if not r.faces:
            rows.append({"input": r.input, "frame": r.frame, "face_id": -1, "timestamp": r.timestamp, "success": 0,
                         "reason": r.reason})
            continue
        ids = r.face_ids or list(range(len(r.faces)))
        for fid, f in zip(ids, r.faces):
            x0, y0, x1, y1 = (float(v) for v in f.box)
            row = {"input": r.input, "frame": r.frame, "face_id": fid, "timestamp": r.timestamp, "success": 1,
                   "reason": "", "detector": f.detector, "confidence": f.confidence, "FaceRectX": x0,
                   "FaceRectY": y0, "FaceRectWidth": x1 - x0, "FaceRectHeight": y1 - y0}
            row.update(f.values if regression else {"label": f.label, "probability": f.probability, **f.probs})
            if f.landmarks is not None:
                row.update(zip(coords, np.concatenate([f.landmarks[:, 0], f.landmarks[:, 1]]).astype(float)))
            rows.append(row)
    table = pd.DataFrame.from_records(rows, columns=columns)
    return table.astype({"frame": int, "face_id": int, "success": int}).copy()


# --------------------------------------------------------------------------------------------- draw

def draw(image, result: Result, color=(0, 200, 0)) -> np.ndarray:
    """The image (path or array) as BGR with each face's box, landmarks, label and probability."""
    if isinstance(image, np.ndarray):
        canvas = image.copy() if image.ndim == 3 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
        if canvas.shape[2] == 4:
            canvas = cv2.cvtColor(canvas, cv2.COLOR_BGRA2BGR)
    else:
        canvas = cv2.cvtColor(decode_gray(image), cv2.COLOR_GRAY2BGR)
    scale = max(canvas.shape[:2]) / 640.0
    thick = max(1, int(round(2 * scale)))
    for f in result.faces:
        x0, y0, x1, y1 = (int(round(float(v))) for v in f.box)
        cv2.rectangle(canvas, (x0, y0), (x1, y1), color, thick, cv2.LINE_AA)
        if f.landmarks is not None:
            for x, y in f.landmarks:
                cv2.circle(canvas, (int(round(x)), int(round(y))), thick, (0, 255, 255), -1, cv2.LINE_AA)
        text = (" ".join(f"{k[0]} {v:+.2f}" for k, v in f.values.items()) if f.values
                else f"{f.label} {f.probability:.2f}")
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, thick)
        ty = y0 - 4 if y0 - th - 6 > 0 else y1 + th + 4
        cv2.rectangle(canvas, (x0, ty - th - 3), (x0 + tw + 4, ty + base - 1), color, -1)
        cv2.putText(canvas, text, (x0 + 2, ty - 1), cv2.FONT_HERSHEY_SIMPLEX, 0.5 * scale, (0, 0, 0), thick, cv2.LINE_AA)
    return canvas
