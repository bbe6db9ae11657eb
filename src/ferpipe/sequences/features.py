"""The features stage: frames -> HDF5 in the LSTM-on-CNN layout (DESIGN.md 4.2).

Two modes:
  cnn     a trained CNN (a checkpoint of the training stage, or a torchvision backbone built with
          `build_model("resnet18", weights_path=...)`) runs over every frame in large batches under
          `torch.inference_mode`; a forward hook dumps one layer (`layer`: a module name such as "fc1",
          "classifier.fc1", "dropout", "layer4", or "flatten" = the input of the first Linear layer of the classifier (an STN's
          classifier, not its localization net),
          or "logits" = the model output).
  images  the frames themselves, resized to `size` and scaled to [0, 1], mean-subtracted.

File layout (one row per frame; frames of a sequence contiguous and in frame order):
  outputs       float32 [N, C, H, W]  (a vector layer as [N, D, 1, 1]; images as [N, 1, size, size]);
                standardized when `standardize` (outputs = (raw - mean) / std), mean-subtracted in
                images mode
  label         int64 (N, 1)    class index into attrs["classes"] (-1 = no label)
  valence, arousal, label_value  float32 (N, 1)  raw regression targets, when the manifest has them
                (label_value = the first label of an LSTM-on-CNN list file, e.g. a pain intensity;
                label_value_2, label_value_3 ... its further labels, NaN where a line has fewer)
  seq_number    int32 (N,)      0, 1, ... one number per sequence, in order
  paths         str (N,)        the frame's source; ids, sequence_id, subject, split (str), frame_index (int32)
  mean, std     float32 [C, H, W]  the statistics applied (std = 1 in images mode)
  label_mean, label_std  float32 [L]  for the regression labels (attrs["regression_labels"])
attrs: stage, mode, layer, checkpoint, classes, label_names, standardized, stats_from.
A test file reuses a training file's statistics (and class list): `stats_from=<train features.h5>`.

Pixel input: exactly what the training stage fed the CNN: its checkpoint's meta["input"] (resize to
the model's size, per-channel standardization) via ferpipe.models.inputs.prepare_input; a checkpoint
without that spec (or a backbone) gets float [B, 1, H, W] = uint8 / 255.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ferpipe.data.labels import class_list
from ferpipe.guides.maps import make_guide
from ferpipe.imaging import resize_batch
from ferpipe.models import MODEL_SPECS, build_model
from ferpipe.models.checkpoint import load_checkpoint, read_checkpoint_info
from ferpipe.models.inference import inference_model
from ferpipe.models.inputs import prepare_input
from ferpipe.store import read_attrs, read_h5, write_h5, write_json, writes

MODES = ("cnn", "images")
# params.yaml sequence.features: the stage's settings and their code defaults (conf/config.yaml's values; tests)
DEFAULTS = {"mode": "cnn", "checkpoint": "src/ferpipe/weights/fer2013_vgg7.pt", "layer": "flatten", "batch_size": 1024,
            "standardize": True, "size": 48}
REGRESSION_LABELS = ("valence", "arousal", "label_value")  # label_value: a list file's first label


class FeatureError(ValueError):
    """Inputs that do not fit together (ids, sizes, a layer name)."""


# ---------------------------------------------------------------------------------------------
# frames and their order

def read_manifest(path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, na_values=[""],
                       dtype={"id": str, "label_name": str, "subject": str, "sequence_id": str, "source": str})


def sequence_order(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(row order, seq_number) putting frames of a sequence together in frame order.

    Sequences keep the order of their first row in the manifest; a row without a sequence id is a
    sequence of its own. Returns order int64 [N] (indices into the manifest) and seq_number int32 [N]
    (for the reordered rows: 0, 0, 0, 1, 1, ...).
    """
    n = len(manifest)
    seq = manifest["sequence_id"].fillna("").astype(str).to_numpy() if "sequence_id" in manifest else np.full(n, "")
    seq = np.where(seq == "", np.char.add("#row", np.arange(n).astype(str)), seq)
    first: dict[str, int] = {}
    for i, s in enumerate(seq):
        first.setdefault(s, len(first))
    rank = np.array([first[s] for s in seq], np.int64)
    frame = manifest["frame_index"].to_numpy().astype(np.int64) if "frame_index" in manifest else np.zeros(n, np.int64)
    order = np.lexsort((np.arange(n), frame, rank))
    return order, rank[order].astype(np.int32)


def load_frames(images_h5, manifest_csv, guide_h5=None):
    """The packed frames (and guide maps) with the manifest rows in the same order, checked by id."""
    data = read_h5(images_h5, ["images", "ids"])
    manifest = read_manifest(manifest_csv)
    ids = data["ids"].astype(str)
    if len(ids) != len(manifest) or not np.array_equal(ids, manifest["id"].astype(str).to_numpy()):
        by_id = pd.Series(np.arange(len(manifest)), index=manifest["id"].astype(str))
        missing = [i for i in ids if i not in by_id.index]
        if missing:
            raise FeatureError(f"{images_h5}: {len(missing)} image ids are not in {manifest_csv} "
                               f"(first: {missing[0]!r}); pass the manifest written with these images")
        manifest = manifest.iloc[by_id[ids].to_numpy()].reset_index(drop=True)
    guide = None
    if guide_h5:
        g = read_h5(guide_h5)
        key = "images" if "images" in g else next(k for k, v in g.items() if v.ndim == 3)
        if not np.array_equal(g["ids"].astype(str), ids):
            raise FeatureError(f"{guide_h5}: ids differ from {images_h5} (make both from the same ingest)")
        guide = g[key]
    return data["images"], manifest, guide


# ---------------------------------------------------------------------------------------------
# the CNN and its layer

def resolve_checkpoint(path) -> Path:
    """A checkpoint file, or the training stage's models folder: its final.pt if there is one, else
    the fold model with the best validation accuracy (its checkpoint's meta; ties: the lower fold).

    Not simply fold0.pt: one fold's early stopping can keep a near-untrained model (on the demo,
    fold 0 stops at epoch 1), and features from it carry almost nothing.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "final.pt").is_file():
            return path / "final.pt"
        folds = sorted(path.glob("fold*.pt"), key=lambda p: (len(p.stem), p.stem))
        if not folds:
            raise FeatureError(f"{path}: no final.pt or fold<k>.pt (run the train stage first)")

        def val_acc(p: Path) -> float:
            acc = (read_checkpoint_info(p).get("meta") or {}).get("val_acc")
            return float(acc) if acc is not None else float("-inf")

        scores = [val_acc(p) for p in folds]
        return folds[scores.index(max(scores))]
    if not path.is_file():
        raise FeatureError(f"{path}: checkpoint not found")
    return path


def load_landmarks(landmarks_h5, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(normalized landmarks [N, 68, 2], found [N]) of the landmarks stage, checked row by row against ids."""
    d = read_h5(landmarks_h5, ["landmarks", "found", "ids"])
    if not np.array_equal(d["ids"].astype(str), ids):
        raise FeatureError(f"{landmarks_h5}: ids differ from the frames (make both from the same ingest)")
    return d["landmarks"], np.asarray(d["found"], bool)


def model_inputs(model_name: str, images: np.ndarray, guide: np.ndarray | None, landmarks: np.ndarray | None,
                 guide_params: dict | None = None, found: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(image, guide) the registry model `model_name` was trained on, for these gray48 frames.

    Models trained on a collage (patches, weighted) see that collage; guided STNs see their guide
    map. Both are made here from the frames' landmarks with the guides params, exactly as the guide
    stages make them for still images, unless a guide file was given.
    """
    spec = MODEL_SPECS.get(model_name)
    if spec is None:
        return images, guide
    prm = guide_params or {}

    def build(kind: str) -> np.ndarray:
        if landmarks is None and kind != "saliency":
            raise FeatureError(f"model {model_name!r} needs the {kind} map of every frame: pass the frames' "
                               "landmarks (landmarks stage output) or a guide file")
        return make_guide(kind, images, landmarks, found=found, **(prm.get(kind) or {}))

    net_images = images if spec["image"] == "gray48" else build(spec["image"])
    if spec["guide"] and guide is None:
        guide = build(spec["guide"])
    return net_images, (guide if spec["guide"] else None)


def load_cnn(checkpoint=None, backbone: str | None = None, weights: str | None = None,
             num_classes: int = 1000) -> tuple[nn.Module, dict]:
    """A checkpoint of the training stage (load_checkpoint), or a registry backbone with a weights file, in
    its inference form (``models.inference``: the layer names still resolve, the outputs are the same)."""
    if checkpoint:
        model, info = load_checkpoint(checkpoint)
        return inference_model(model), info
    if not backbone:
        raise FeatureError("features: give a checkpoint, or a backbone (e.g. resnet18) with a weights file")
    kw = {"weights_path": weights} if weights else {}
    model = build_model(backbone, num_classes, **kw)
    return inference_model(model), {"model": backbone, "weights": weights or "", "meta": {}}


class LayerTap:
    """Capture one layer's output (or, for "flatten", the input of the first Linear layer called)."""

    def __init__(self, model: nn.Module, layer: str):
        self.model, self.layer, self.value, self.handles = model, layer, None, []
        if layer == "logits":
            return
        if layer == "flatten":  # the head's parent module: an STN's classifier, not its localization net
            head = getattr(model, "head_path", None) or ""
            scope = model.get_submodule(head.rpartition(".")[0]) if "." in head else model
            linears = [m for m in scope.modules() if isinstance(m, nn.Linear)]
            if not linears:
                raise FeatureError(f"{type(model).__name__} has no Linear layer: 'flatten' is undefined")
            for m in linears:
                self.handles.append(m.register_forward_pre_hook(self._pre))
            return
        try:
            module = model.get_submodule(layer)
        except AttributeError:
            names = [n for n, _ in model.named_modules() if n]
            raise FeatureError(f"{type(model).__name__} has no layer {layer!r}; layers: "
                               f"{', '.join(names[:40])}{' ...' if len(names) > 40 else ''}; or 'flatten', 'logits'") from None
        self.handles.append(module.register_forward_hook(self._post))

    def _pre(self, module, args):
        if self.value is None:
            self.value = args[0]

    def _post(self, module, args, output):
        self.value = output[0] if isinstance(output, (tuple, list)) else output

    def __call__(self, x: torch.Tensor, guide: torch.Tensor | None) -> torch.Tensor:
        self.value = None
        out = self.model(x, guide=guide) if guide is not None else self.model(x)
        value = out if self.layer == "logits" else self.value
        if value is None:
            raise FeatureError(f"layer {self.layer!r} was not called in the forward pass")
        return as_nchw(value)

    def close(self):
        for h in self.handles:
            h.remove()


def as_nchw(t: torch.Tensor) -> torch.Tensor:
    """[B, D] -> [B, D, 1, 1]; [B, C, L] -> [B, C, L, 1]; [B, C, H, W] as is."""
    if t.dim() == 2:
        return t[:, :, None, None]
    if t.dim() == 3:
        return t[..., None]
    if t.dim() == 4:
        return t
    raise FeatureError(f"cannot store a layer output of shape {tuple(t.shape)} as [N, C, H, W]")


def to_input(images: np.ndarray, meta: dict | None = None) -> torch.Tensor:
    """uint8 [B, H, W] -> float [B, 1, H, W] in [0, 1] (for checkpoints without an input spec)."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(255.0)[:, None]


def make_input(images: np.ndarray, guide: np.ndarray | None, meta: dict | None):
    """(image, guide) model input exactly as the training stage made it: its checkpoint's
    meta["input"] (size, per-channel mean/std) through ferpipe.models.inputs.prepare_input; a checkpoint
    without one gets uint8 / 255."""
    spec = (meta or {}).get("input")
    if spec:
        return prepare_input(images, guide if spec.get("guide") else None, spec)
    return to_input(images), (to_input(guide) if guide is not None else None)


def run_cnn(model: nn.Module, images: np.ndarray, layer: str, batch_size: int = 1024,
            guide: np.ndarray | None = None, meta: dict | None = None, in_size: int | None = None) -> np.ndarray:
    """Dump `layer` for every image: float32 [N, C, H, W]. Batches shrink by half on out-of-memory."""
    in_size = in_size or getattr(model, "in_size", None)
    if in_size and not (meta or {}).get("input") and images.shape[1:] != (in_size, in_size):
        images = resize_batch(images, in_size)
        guide = resize_batch(guide, in_size) if guide is not None else None
    tap = LayerTap(model, layer)
    out, i, bs = None, 0, max(1, int(batch_size))
    try:
        with torch.inference_mode():
            while i < len(images):
                try:
                    x, g = make_input(images[i:i + bs], guide[i:i + bs] if guide is not None else None, meta)
                    y = tap(x, g).float().cpu().numpy()
                except (RuntimeError, MemoryError) as e:
                    if bs > 1 and ("memory" in str(e).lower() or isinstance(e, MemoryError)):
                        bs //= 2
                        continue
                    raise
                if out is None:
                    out = np.empty((len(images), *y.shape[1:]), np.float32)
                out[i:i + len(y)] = y
                i += len(y)
    finally:
        tap.close()
    if out is None:
        raise FeatureError("no frames to run")
    return out


# ---------------------------------------------------------------------------------------------
# standardization

def compute_stats(outputs: np.ndarray, mode: str = "cnn") -> tuple[np.ndarray, np.ndarray]:
    """Per-element mean/std over frames (std floored at 1e-6; std = 1 in images mode)."""
    mean = outputs.mean(axis=0, dtype=np.float64).astype(np.float32)
    if mode == "images":
        return mean, np.ones_like(mean)
    std = outputs.std(axis=0, dtype=np.float64).astype(np.float32)
    return mean, np.where(std < 1e-6, 1.0, std).astype(np.float32)


def frame_labels(manifest: pd.DataFrame, classes: list[str] | None = None) -> tuple[dict, list[str], list[str]]:
    """{name: (N, 1) array} for `label` (+ valence/arousal when present), the classes, regression names."""
    names = manifest["label_name"].fillna("").astype(str).to_numpy()
    if classes is None:
        classes = class_list(names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(classes) - {""})
    if unknown:
        raise FeatureError(f"labels {unknown} are not in the class list {classes} (of the stats file?)")
    labels = {"label": np.array([index.get(n, -1) for n in names], np.int64)[:, None]}
    regression = []
    for name in REGRESSION_LABELS:
        if name in manifest and manifest[name].notna().any():
            labels[name] = manifest[name].to_numpy(np.float32)[:, None]
            regression.append(name)
    if "labels_extra" in manifest:  # a list file's 2nd, 3rd ... labels: label_value_2, label_value_3, ...
        extra = manifest["labels_extra"].map(lambda v: "" if pd.isna(v) else str(v)).str.split()
        for j in range(int(extra.str.len().max() or 0)):
            name = f"label_value_{j + 2}"
            labels[name] = np.array([float(v[j]) if len(v) > j else np.nan for v in extra], np.float32)[:, None]
            regression.append(name)
    return labels, classes, regression


@writes("out_h5", "metrics_path")
def run_features(images_h5, manifest_csv, out_h5, mode: str = DEFAULTS["mode"], checkpoint=None,
                 backbone: str | None = None, weights: str | None = None, layer: str = DEFAULTS["layer"],
                 batch_size: int = DEFAULTS["batch_size"], guide_h5=None, standardize: bool = DEFAULTS["standardize"],
                 stats_from=None, size: int = DEFAULTS["size"], metrics_path=None, landmarks_h5=None,
                 guide_params: dict | None = None) -> dict:
    """Write the features HDF5 (layout in the module docstring); return counts and speed."""
    if mode not in MODES:
        raise FeatureError(f"features mode must be one of {MODES}, got {mode!r}")
    t0 = time.perf_counter()
    images, manifest, guide = load_frames(images_h5, manifest_csv, guide_h5)
    landmarks, found = (load_landmarks(landmarks_h5, manifest["id"].astype(str).to_numpy()) if landmarks_h5
                        else (None, None))
    order, seq_number = sequence_order(manifest)
    manifest = manifest.iloc[order].reset_index(drop=True)
    images = images[order]
    guide = guide[order] if guide is not None else None
    landmarks = landmarks[order] if landmarks is not None else None
    ref = read_h5(stats_from) if stats_from else None
    ref_attrs = read_attrs(stats_from) if stats_from else {}

    info: dict = {}
    t1 = time.perf_counter()
    if mode == "images":
        outputs = (resize_batch(images, size).astype(np.float32) / 255.0)[:, None]
    else:
        if checkpoint:
            checkpoint = resolve_checkpoint(checkpoint)
        model, info = load_cnn(checkpoint, backbone, weights)
        net_images, guide = model_inputs(info.get("model"), images, guide, landmarks, guide_params, found)
        outputs = run_cnn(model, net_images, layer, batch_size, guide, info.get("meta"))
    cnn_seconds = time.perf_counter() - t1

    labels, classes, regression = frame_labels(manifest, (ref_attrs.get("classes") or None) if ref is not None else None)
    arrays = {}
    if ref is not None:
        if "mean" not in ref:
            raise FeatureError(f"{stats_from}: no mean/std to reuse (was it written with standardize on?)")
        mean, std = ref["mean"], ref["std"]
        if mean.shape != outputs.shape[1:]:
            raise FeatureError(f"{stats_from}: statistics of shape {mean.shape}, these outputs are {outputs.shape[1:]}")
    elif standardize or mode == "images":
        mean, std = compute_stats(outputs, mode)
    else:
        mean = std = None
    if mean is not None:
        outputs -= mean
        outputs /= std
        arrays.update(mean=mean, std=std)
    if regression and (standardize or ref is not None):
        reg = np.concatenate([labels[n] for n in regression], axis=1)
        if ref is not None and "label_mean" in ref:
            lm, ls = ref["label_mean"], ref["label_std"]
        else:
            lm = np.nanmean(reg, axis=0).astype(np.float32)
            ls = np.nanstd(reg, axis=0).astype(np.float32)
            ls = np.where(ls < 1e-6, 1.0, ls).astype(np.float32)
        arrays.update(label_mean=lm, label_std=ls)

    arrays = {"outputs": outputs, **labels, "seq_number": seq_number,
              "paths": manifest["source"].astype(str).to_numpy(), "ids": manifest["id"].astype(str).to_numpy(),
              "sequence_id": manifest["sequence_id"].fillna("").astype(str).to_numpy() if "sequence_id" in manifest
              else seq_number.astype(str),
              "subject": manifest["subject"].fillna("").astype(str).to_numpy() if "subject" in manifest
              else np.full(len(manifest), ""),
              "split": manifest["split"].fillna("train").astype(str).to_numpy() if "split" in manifest
              else np.full(len(manifest), "train"),
              "frame_index": manifest["frame_index"].to_numpy().astype(np.int32) if "frame_index" in manifest
              else np.zeros(len(manifest), np.int32),
              **arrays}
    attrs = {"stage": "features", "mode": mode, "layer": layer if mode == "cnn" else "images",
             "checkpoint": str(checkpoint or ""), "backbone": backbone or "", "cnn": str(info.get("model", "")),
             "classes": classes, "label_names": list(labels), "regression_labels": regression,
             "standardized": bool(mean is not None), "stats_from": str(stats_from or ""), "size": int(size)}
    write_h5(out_h5, arrays, attrs)
    n = len(outputs)
    metrics = {"frames": int(n), "sequences": int(seq_number.max() + 1) if n else 0,
               "shape": list(outputs.shape[1:]), "classes": classes}
    if metrics_path:
        write_json(metrics_path, metrics)  # timings stay out: `dvc metrics diff` would show noise
    return {**metrics, "seconds": round(time.perf_counter() - t0, 3),
            "images_per_s": round(n / cnn_seconds, 1) if cnn_seconds > 0 else None}


def read_features(path) -> dict:
    """The features file as a dict of arrays plus its attrs under "attrs"."""
    data = read_h5(path)
    data["attrs"] = read_attrs(path)
    for key in ("classes", "label_names", "regression_labels"):
        v = data["attrs"].get(key, [])
        data["attrs"][key] = json.loads(v) if isinstance(v, str) else list(v)
    return data


__all__ = ["MODES", "FeatureError", "LayerTap", "as_nchw", "compute_stats", "frame_labels", "load_cnn",
           "load_frames", "load_landmarks", "make_input", "model_inputs", "read_features", "read_manifest",
           "resolve_checkpoint", "run_cnn", "run_features", "sequence_order", "to_input"]
