"""Checkpoints: one .pt file that rebuilds its model without the code that trained it.

One format for every model ferpipe trains, images and sequences: {"model": registry name (an image
model of ``MODEL_SPECS``, or a sequence model ``lstm`` | ``cbm`` | ``frame``), "num_classes" (the
outputs: classes, or regression targets), "classes" (their names), "model_kwargs" (the constructor
arguments; a sequence model's include ``in_shape``, its per-frame input [C, H, W]), "state_dict",
"meta" (anything else: the input spec or statistics, fold, epoch, val accuracy, params used)}.
Written atomically. An image model of task valence_arousal has classes ["valence", "arousal"] (its two
outputs) and meta "task": "valence_arousal", "target_mean", "target_std" (``regression_scale``).
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ferpipe.models import MODEL_SPECS, SEQUENCE_MODELS, build_model
from ferpipe.store import write_torch


def save_checkpoint(path: str | os.PathLike, model: nn.Module, name: str, classes: list[str],
                    model_kwargs: dict | None = None, meta: dict | None = None) -> None:
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": name, "num_classes": len(classes), "classes": list(classes),
               "model_kwargs": dict(model_kwargs or {}), "state_dict": state, "meta": dict(meta or {})}
    write_torch(path, payload)


class CheckpointError(ValueError):
    """A file that is not a usable ferpipe checkpoint; str(error) names the file and the problem."""


_KEYS = ("model", "num_classes", "classes", "model_kwargs", "state_dict")


def read_payload(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """The checkpoint's dict, loaded with weights_only=True (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found" if not path.exists() else f"{path}: not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if not (zipfile.is_zipfile(path) or head[:1] == b"\x80"):  # torch's zip format, or a pickle
        raise CheckpointError(f"{path}: not a ferpipe checkpoint (not a torch file)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        lines = [ln.strip() for ln in str(e).splitlines() if "Unsupported" in ln or "global" in ln.lower()]
        why = f" ({lines[0][:120]})" if lines else ""
        raise CheckpointError(f"{path}: refused: loading it would run code or needs objects other than "
                              f"tensors (torch.load weights_only){why}") from None
    except Exception as e:  # not a torch zip/pickle at all, truncated, ...
        msg = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: not a ferpipe checkpoint (not a readable torch file: {msg})") from None
    if not isinstance(payload, dict) or any(k not in payload for k in _KEYS):
        what = "a plain state_dict" if isinstance(payload, dict) and payload and all(
            isinstance(v, torch.Tensor) for v in payload.values()) else f"a {type(payload).__name__}"
        raise CheckpointError(f"{path}: not a ferpipe checkpoint ({what}, without {', '.join(_KEYS)}); "
                              "weights of another program go in via train.init_from or model_kwargs.weights_path")
    return payload


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    build=None) -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (eval mode); return (model, the payload without state_dict).

    ``build(name, num_classes, **model_kwargs)`` constructs the untrained model: by default the image
    registry's ``build_model``, and a sequence model's checkpoint is then an error that says so;
    train_sequence's models load with ``ferpipe.sequences.train.load_sequence_model``. (Image code
    never imports the sequence models: editing them reruns no image stage.)
    """
    payload = read_payload(path, map_location)
    name, n = payload["model"], payload["num_classes"]
    if build is None:
        if name in SEQUENCE_MODELS:
            raise CheckpointError(f"{path}: a sequence model ('{name}', from train_sequence), not an image model")
        if name not in MODEL_SPECS:
            raise CheckpointError(f"{path}: model {name!r} is not one this ferpipe knows ({', '.join(MODEL_SPECS)})")
        build = build_model
    if len(payload["classes"]) != int(n):
        raise CheckpointError(f"{path}: {len(payload['classes'])} class names for {n} classes")
    try:
        model = build(name, n, **payload["model_kwargs"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its weights do not fit a {name!r} model with {n} classes "
                              f"({str(e).splitlines()[0][:160]})") from None
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


def regression_scale(info: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """For a valence/arousal image model (meta "task": "valence_arousal"): (mean, std) float64 [outputs]
    mapping its outputs back to the original scale (value = output * std + mean; the training rows'
    statistics of its run). None for a classifier. ``info``: load_checkpoint's or read_checkpoint_info's."""
    meta = info.get("meta") or {}
    if meta.get("task") != "valence_arousal":
        return None
    n = int(info["num_classes"])
    mean = np.asarray(meta.get("target_mean", [0.0] * n), np.float64)
    std = np.asarray(meta.get("target_std", [1.0] * n), np.float64)
    if mean.shape != (n,) or std.shape != (n,):
        raise CheckpointError(f"a valence/arousal checkpoint with {n} outputs but target_mean/std of shapes "
                              f"{mean.shape}/{std.shape}")
    return mean, std


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """The payload without its weights and without building the model (memory-mapped: cheap even
    for a 500 MB RMN checkpoint), e.g. to compare the folds' validation accuracy."""
    payload = read_payload(path, "cpu", mmap=True)
    return {k: v for k, v in payload.items() if k != "state_dict"}
