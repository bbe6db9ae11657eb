"""The demo sequences: faces of the image demo going from neutral to an expression, in the CK+ layout
the sequence stages read (make_demo_sequences).
"""
from __future__ import annotations

import os

import cv2
import numpy as np

from ferpipe.data.demo.expressions import expression_targets, rbf_weights
from ferpipe.data.demo.images import _wrap
from ferpipe.data.demo.render import compose, draw_look
from ferpipe.data.demo.templates import load_templates
from ferpipe.store import staged, write_json, writes

SEQUENCE_CLASSES = ("happy", "sad", "surprise", "angry")  # each sequence starts neutral, like CK+


def generate_sequences(seed: int = 2020, per_class: int = 12, frames: int = 6, size: int = 96):
    """Yield (sequence_id, subject, class, frame number, uint8 image) in a fixed order.

    A sequence is one identity and one pose/photometry (``draw_look``) going from neutral (strength
    0) to its apex strength along a smoothstep, with fresh sensor noise and a small head drift per
    frame: the CK+ onset-to-apex layout. Ids are CK+-like, ``S<identity>_<n>``, so the subject is
    the identity and folds can keep subjects apart.
    """
    if frames < 2:
        raise ValueError(f"a sequence needs at least 2 frames, got {frames}")
    templates, _ = load_templates()
    if not templates:
        raise RuntimeError("dlib found no usable face in the packaged images")
    rng = np.random.default_rng(seed)
    per_subject: dict[int, int] = {}
    fields_: dict[tuple[int, str], np.ndarray] = {}
    for cls in SEQUENCE_CLASSES:
        reps = -(-per_class // len(templates))
        picks = np.concatenate([rng.permutation(len(templates)) for _ in range(reps)])[:per_class] if per_class else []
        for k in picks:
            k = int(k)
            per_subject[k] = per_subject.get(k, 0) + 1
            sid = f"S{k:03d}_{per_subject[k]:03d}"
            if (k, cls) not in fields_:
                pts = templates[k].points
                fields_[k, cls] = rbf_weights(pts, expression_targets(cls, pts))
            look = draw_look(size, rng)
            apex = look.strength
            for f in range(frames):
                u = f / (frames - 1)
                look.strength = apex * u * u * (3 - 2 * u)
                look.noise = rng.standard_normal((size, size)).astype(np.float32)
                look.shift = look.shift + rng.uniform(-0.005, 0.005, 2)
                yield sid, f"S{k:03d}", cls, f + 1, compose(templates[k], cls, size, look, fields_[k, cls])


@writes("metrics_path", dirs=["out_dir"])
def make_demo_sequences(out_dir: str | os.PathLike, seed: int = 2020, per_class: int = 12, frames: int = 6,
                        size: int = 96, metrics_path: str | os.PathLike | None = None) -> dict:
    """Write demo sequences in the CK+ layout of ../shared/data/sequences (replacing out_dir atomically):
    ``frames/<sequence>/<sequence>_<frame:08d>.png`` and ``labels.csv`` (sequence_id, label,
    frame_count, subject). Returns (and writes to metrics_path) counts per class and subjects."""
    if size < 16:
        raise ValueError(f"size {size} is too small for a face")
    if per_class < 1:
        raise ValueError("sequences per class must be >= 1")
    tmp = staged(out_dir)  # this run's staging folder (ferpipe.store): it replaces out_dir whole on success
    rows: dict[str, dict] = {}
    for sid, subject, cls, number, img in generate_sequences(seed, per_class, frames, size):
        folder = tmp / "frames" / sid
        folder.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", img)
        if not ok:
            raise RuntimeError(f"could not encode {sid} frame {number}")
        (folder / f"{sid}_{number:08d}.png").write_bytes(buf.tobytes())
        row = rows.setdefault(sid, {"sequence_id": sid, "label": cls, "frame_count": 0, "subject": subject})
        row["frame_count"] += 1
    lines = ["sequence_id,label,frame_count,subject"] + [
        f"{r['sequence_id']},{r['label']},{r['frame_count']},{r['subject']}" for r in sorted(rows.values(), key=lambda r: r["sequence_id"])]
    (tmp / "labels.csv").write_text("\n".join(lines) + "\n")
    (tmp / "README.txt").write_text(_wrap(SEQUENCE_README.format(
        seed=seed, per_class=per_class, frames=frames, size=size, classes=", ".join(SEQUENCE_CLASSES))))
    metrics = {"seed": seed, "size": size, "frames_per_sequence": frames, "sequences": len(rows),
               "per_class": {c: sum(r["label"] == c for r in rows.values()) for c in SEQUENCE_CLASSES},
               "subjects": len({r["subject"] for r in rows.values()})}
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics


SEQUENCE_README = """\
ferpipe demo sequences (generated, not real data)
=================================================

Made by `python stages/demo.py --sequences` (ferpipe.data.demo.make_demo_sequences) with seed={seed},
per_class={per_class}, frames={frames}, size={size}. The same parameters give byte-identical files.

Layout: the CK+ layout of ferpipe's sequence readers (format ck_sequences):
frames/<sequence>/<sequence>_<frame>.png and labels.csv (sequence_id,label,frame_count,subject).
Classes: {classes}. Sequence ids are S<identity>_<n>: the subject is the identity.

Each sequence is one face of the image demo (same templates and expression warps) going from neutral
to its apex expression along a smoothstep, with one pose and photometry per sequence, fresh noise and
a small head drift per frame. It exists so the sequence stages run on a fresh machine; numbers
measured on it say nothing about real facial expression recognition.
"""
