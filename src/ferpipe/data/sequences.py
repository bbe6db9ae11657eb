"""Sequence readers: CK+ frame folders and video files -> the canonical manifest, one row per frame.

Registered in `ferpipe.data.readers.READERS` as `ck_sequences` and `video`, so sequences go through
the same ingest -> gray48 -> landmarks stages as still images (stages/ingest.py
-S dataset.format=ck_sequences ...). Like every reader they return `(manifest, rejects)` and only
look at files; ingest decodes the frames (a video frame's `source` is `<video>#frame=<n>`, which
`decode_image` understands), and frames that do not decode become rejects rows there.

Manifest rows carry `sequence_id`, `frame_index` (0, 1, ... = order inside the sequence), `subject`
(CK+ `Sxxx`, or the video CSV's subject column) and one extra column, `frame_number` (the frame's
number in the original: the CK+ file number, or the video frame index), so that folds can be
subject-independent and the frame order survives every later stage.

Whole sequences are rejected (one rejects row per sequence, naming it, `line` = its labels-CSV line
or -1) for: an empty sequence folder, a labels row with no folder (or video), a folder (or video)
with no labels row, labels that disagree within a sequence (per-frame label CSVs, or repeated
sequence rows), an empty label, a video that does not decode, and a sequence with fewer than
`min_length` frames.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from ferpipe.data.paths import PathError, inside_root, printable
from ferpipe.data.tables import IMAGE_EXTENSIONS, DatasetError, _entries, _frames, _read_csv, split_name

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".m4v", ".webm", ".mpg", ".mpeg", ".wmv")
_TRAILING_NUMBER = re.compile(r"(\d+)$")
_CK_SUBJECT = re.compile(r"^(S\d+)_", re.IGNORECASE)


def _finish(rows: list[dict], rejects: list[dict], what: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    if not rows:
        reasons = pd.Series([r["reason"] for r in rejects], dtype=str)
        common = "; ".join(f"{k} x{v}" for k, v in reasons.str.split(" \\(").str[0].value_counts().head(3).items())
        raise DatasetError(f"{what}: no usable sequence ({len(rejects)} rejected: {common or 'nothing found'})")
    manifest, rej = _frames(rows, rejects, ["frame_number"])
    manifest["frame_number"] = manifest["frame_number"].astype(np.int64)
    return manifest, rej


def _subject_of(sequence_id: str) -> str:
    m = _CK_SUBJECT.match(sequence_id)
    return m.group(1) if m else ""


def _sequence_frames(folder: str, rejects: list[dict], unlisted=None, unlisted_reason: str = "") -> list[tuple]:
    """[(frame number, file stem, path)] of one sequence folder's images, by the number at the end of the
    stem; other entries (folders, non-images, no or a repeated number, names `unlisted(name)` says
    are not listed) become rejects rows."""
    found, numbers = [], {}
    for f, f_is_dir in _entries(folder, rejects, key=lambda f: f.name):
        stem, ext = os.path.splitext(f.name)
        if f_is_dir:
            rejects.append({"source": f.path, "line": -1, "reason": "folder inside a sequence folder (not read)"})
        elif ext.lower() not in IMAGE_EXTENSIONS:
            rejects.append({"source": f.path, "line": -1, "reason": "not an image extension"})
        elif unlisted is not None and unlisted(f.name):
            rejects.append({"source": f.path, "line": -1, "reason": unlisted_reason})
        elif not (m := _TRAILING_NUMBER.search(stem)):
            rejects.append({"source": f.path, "line": -1, "reason": "no frame number at the end of the file name"})
        elif int(m.group(1)) in numbers:
            rejects.append({"source": f.path, "line": -1,
                            "reason": f"duplicate frame number {int(m.group(1))} (first: {numbers[int(m.group(1))]})"})
        else:
            numbers[int(m.group(1))] = f.name
            found.append((int(m.group(1)), stem, f.path))
    return found


def _long_enough(found: list, source: str, line: int, min_length: int, rejects: list[dict]) -> bool:
    """False (and a rejects row) for a sequence with no frames or fewer than min_length."""
    if not found:
        rejects.append({"source": source, "line": line, "reason": "empty sequence (no frames)"})
    elif len(found) < min_length:
        rejects.append({"source": source, "line": line,
                        "reason": f"sequence too short: {len(found)} frame(s) < min_length {min_length}"})
    return len(found) >= max(1, min_length)


def _sequence_labels(df: pd.DataFrame, key: str, rejects: list[dict], source_of) -> dict[str, tuple[str, int]]:
    """{sequence key: (canonical label, csv line)}; sequences whose rows disagree or are empty -> rejects."""
    from ferpipe.data.labels import canonical
    out: dict[str, tuple[str, int]] = {}
    for seq, group in df.groupby(key, sort=False):
        seq = str(seq).strip()
        labels = sorted({canonical(v) for v in group["label"]})
        line = int(group["csv_line"].iloc[0])
        if labels == [""] or not seq:
            rejects.append({"source": source_of(seq), "line": line,
                            "reason": "empty label" if seq else "empty sequence id"})
        elif len(labels) > 1:
            rejects.append({"source": source_of(seq), "line": line,
                            "reason": f"labels disagree within the sequence ({', '.join(x or '<empty>' for x in labels)})"})
        else:
            out[seq] = (labels[0], line)
    return out


def _resolve_csv(path, labels: str, what: str) -> tuple[Path, Path]:
    """(labels CSV, folder) for a path that is the dataset folder or the labels CSV itself."""
    p = Path(path)
    if not p.exists():
        raise DatasetError(f"{p}: not found ({what} expects a folder with {labels}, or the labels CSV)")
    if p.is_dir():
        csv = Path(labels) if os.path.isabs(labels) else p / labels
        if not csv.is_file():
            raise DatasetError(f"{p}: no {labels} (the labels CSV of the {what} format)")
        return csv, p
    return p, p.parent


# ---------------------------------------------------------------------------------------------
# CK+ frame folders

def read_ck_sequences(path, root: str = "", split: str = "train", min_length: int = 1,
                      labels: str = "labels.csv", frames: str = "frames") -> tuple[pd.DataFrame, pd.DataFrame]:
    """CK+ layout: `<path>/frames/<sequence>/<sequence>_<frame#>.png` + `<path>/labels.csv`.

    labels.csv: `sequence_id,label[,frame_count][,subject]` (one row per sequence), or per-frame
    `sequence_id,file,label` (rows whose labels disagree within a sequence reject the sequence).
    `path` may also be the labels CSV itself; `root` overrides the frames folder. Frames are ordered
    by the number at the end of the file stem (`..._00000010.png` -> 10); frame_index counts 0, 1, ...
    in that order. subject = the CSV's `subject` column if present, else the `Sxxx` prefix of the
    sequence id. Labels are canonical (anger -> angry, sadness -> sad; contempt kept).
    id = "<sequence>/<file stem>". Sequences with fewer than `min_length` frames are rejected.
    """
    from ferpipe.data.labels import canonical
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"ck_sequences: split {split!r} is not a split name (train/val/test)")
    csv, top = _resolve_csv(path, labels, "ck_sequences")
    frames_dir = Path(root) if root else top / frames
    if not frames_dir.is_dir():
        raise DatasetError(f"{frames_dir}: frames folder not found (expected <folder>/{frames}/<sequence>/<frame>.png)")
    df, rejects = _read_csv(csv, ["sequence_id", "label"])
    df["sequence_id"] = df["sequence_id"].str.strip()
    per_frame = "file" in {c.strip().lower() for c in df.columns}
    if per_frame:
        df = df.rename(columns={c: "file" for c in df.columns if c.strip().lower() == "file"})
    subj_col = next((c for c in df.columns if c.strip().lower() == "subject"), None)
    seq_labels = _sequence_labels(df, "sequence_id", rejects, lambda s: str(frames_dir / s))
    bad_seqs = {str(s).strip() for s in df["sequence_id"]} - set(seq_labels)
    subjects = {}
    if subj_col:
        for s, v in zip(df["sequence_id"], df[subj_col]):
            subjects.setdefault(s, str(v).strip())
    frame_labels = None
    if per_frame:  # per-frame rows: which files the CSV names (others are frames without a label row)
        frame_labels = {(s, str(f).strip()): int(line) for s, f, line in zip(df["sequence_id"], df["file"], df["csv_line"])}

    folders = {}
    for e, is_dir in _entries(frames_dir, rejects, key=lambda e: e.name):
        if is_dir:
            folders[e.name] = e
        else:
            rejects.append({"source": e.path, "line": -1, "reason": "file outside a sequence folder"})
    for seq, (_, line) in seq_labels.items():
        if seq not in folders:
            rejects.append({"source": str(frames_dir / seq), "line": line,
                            "reason": f"{csv.name} row has no frame folder"})

    rows = []
    for seq in sorted(folders):
        folder = folders[seq]
        if seq in bad_seqs:
            continue  # already rejected from its labels rows
        if seq not in seq_labels:
            rejects.append({"source": folder.path, "line": -1, "reason": f"sequence folder has no {csv.name} row"})
            continue
        label, line = seq_labels[seq]
        unlisted = None if frame_labels is None else (lambda name: (seq, name) not in frame_labels)
        found = _sequence_frames(folder.path, rejects, unlisted, f"frame has no {csv.name} row")
        if frame_labels is not None:
            for (s, name), fline in frame_labels.items():
                if s == seq and not (Path(folder.path) / name).is_file():
                    rejects.append({"source": str(Path(folder.path) / name), "line": fline, "reason": "file not found"})
        if not _long_enough(found, folder.path, line, min_length, rejects):
            continue
        subject = subjects.get(seq) or _subject_of(seq)
        for index, (number, stem, source) in enumerate(sorted(found)):
            rows.append({"id": f"{seq}/{stem}", "source": source, "split": split_c, "label_name": canonical(label),
                         "sequence_id": seq, "frame_index": index, "subject": subject, "frame_number": number})
    return _finish(rows, rejects, str(csv))


# ---------------------------------------------------------------------------------------------
# videos

def count_frames(video: str | os.PathLike) -> int:
    """Frames OpenCV can actually decode from a video (0 if it does not open): reads it through."""
    import cv2
    cap = cv2.VideoCapture(str(video))
    try:
        if not cap.isOpened():
            return 0
        n = 0
        while cap.grab():
            n += 1
        return n
    finally:
        cap.release()


def read_video(path, root: str = "", split: str = "train", labels: str = "labels.csv", every: int = 1,
               max_frames: int = 0, min_length: int = 1, outside_root: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Videos (mp4, avi, ...) + a labels CSV `file,label[,subject]`; one sequence per video.

    `path` is the folder holding the videos and `labels` (default labels.csv), or the CSV itself
    (videos relative to `root`, default the CSV's folder). Frames are decoded with OpenCV: every
    `every`-th frame (0, every, 2*every, ...), at most `max_frames` (0 = all). A video that does not
    open or has no decodable frame, a CSV row without its file, a video in the folder without a CSV row
    and rows of one file whose labels disagree are rejects rows. sequence_id = the file path relative
    to the video folder without its extension; id = "<sequence>/<frame number, 6 digits>";
    source = "<video path>#frame=<n>". A `file` that resolves outside the video folder (`../`, an
    absolute path, a symlink out) is a rejects row unless outside_root=True.
    """
    if every < 1 or max_frames < 0 or min_length < 1:
        raise DatasetError(f"video: every must be >= 1, max_frames >= 0, min_length >= 1 "
                              f"(got {every}, {max_frames}, {min_length})")
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"video: split {split!r} is not a split name (train/val/test)")
    csv, top = _resolve_csv(path, labels, "video")
    base = Path(root) if root else top
    df, rejects = _read_csv(csv, ["file", "label"])
    df["file"] = df["file"].str.strip()
    subj_col = next((c for c in df.columns if c.strip().lower() == "subject"), None)
    file_labels = _sequence_labels(df, "file", rejects, lambda f: str(base / f))
    subjects = {}
    if subj_col:
        for f, v in zip(df["file"], df[subj_col]):
            subjects.setdefault(f, str(v).strip())
    listed = {os.path.normpath(f) for f in df["file"]}
    for f in sorted(base.rglob("*")) if base.is_dir() else []:
        rel = os.path.normpath(os.path.relpath(f, base))
        if f.suffix.lower() in VIDEO_EXTENSIONS and rel not in listed and f.is_file():
            rejects.append({"source": printable(f), "line": -1, "reason": f"video has no {csv.name} row"})
    rows = []
    for rel, (label, line) in file_labels.items():
        video = base / rel
        try:
            video = Path(inside_root(base, rel, outside_root))
        except PathError as e:
            rejects.append({"source": printable(video), "line": line, "reason": str(e)})
            continue
        if not video.is_file():
            rejects.append({"source": str(video), "line": line, "reason": "file not found"})
            continue
        n = count_frames(video)
        if n == 0:
            rejects.append({"source": str(video), "line": line,
                            "reason": "video does not decode (OpenCV read no frame)"})
            continue
        picked = list(range(0, n, every))
        if max_frames:
            picked = picked[:max_frames]
        if len(picked) < min_length:
            rejects.append({"source": str(video), "line": line,
                            "reason": f"sequence too short: {len(picked)} frame(s) < min_length {min_length}"})
            continue
        seq = os.path.splitext(os.path.normpath(rel))[0].replace(os.sep, "/")
        for index, number in enumerate(picked):
            rows.append({"id": f"{seq}/{number:06d}", "source": f"{video}#frame={number}", "split": split_c,
                         "label_name": label, "sequence_id": seq, "frame_index": index,
                         "subject": subjects.get(rel, ""), "frame_number": number, "_line": line})
    return _finish(rows, rejects, str(csv))


# ---------------------------------------------------------------------------------------------
# class / video / frame folders

_UCF_GROUP = re.compile(r"_(g\d+)_", re.IGNORECASE)


def read_ucf(path, root: str = "", split: str = "train", min_length: int = 1) -> tuple[pd.DataFrame, pd.DataFrame]:
    """UCF-101 layout (the Deep RNN Framework's data): `<path>/<class>/<video>/<frame#>.<ext>`.

    label = the class folder's name (canonical: `Happiness` -> `happy`; other class names kept,
    lower-cased); sequence_id = the video folder's name, which must be unique across classes (a
    repeat is rejected); frames ordered by the number at the end of the file stem. subject = UCF's
    group (`v_Biking_g08_c01` -> `g08`, so folds keep a group's clips together), else CK+'s `Sxxx`
    prefix, else none. `root` is unused (the layout is the folder itself).
    """
    from ferpipe.data.labels import canonical
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"ucf: split {split!r} is not a split name (train/val/test)")
    top = Path(path)
    if not top.is_dir():
        raise DatasetError(f"{top}: not a folder (ucf: <folder>/<class>/<video>/<frame>.png)")
    rejects: list[dict] = []
    rows, seen = [], {}
    for cls, cls_is_dir in _entries(top, rejects, key=lambda e: e.name):
        if not cls_is_dir:
            rejects.append({"source": cls.path, "line": -1, "reason": "file outside a class folder"})
            continue
        for video, is_dir in _entries(cls.path, rejects, key=lambda e: e.name):
            if not is_dir:
                rejects.append({"source": video.path, "line": -1, "reason": "file outside a video folder"})
                continue
            if video.name in seen:
                rejects.append({"source": video.path, "line": -1,
                                "reason": f"video name repeated in another class (first: {seen[video.name]})"})
                continue
            seen[video.name] = video.path
            found = _sequence_frames(video.path, rejects)
            if not _long_enough(found, video.path, -1, min_length, rejects):
                continue
            group = _UCF_GROUP.search(video.name)
            subject = group.group(1).lower() if group else _subject_of(video.name)
            for index, (number, stem, source) in enumerate(sorted(found)):
                rows.append({"id": f"{video.name}/{stem}", "source": source, "split": split_c,
                             "label_name": canonical(cls.name), "sequence_id": video.name, "frame_index": index,
                             "subject": subject, "frame_number": number})
    return _finish(rows, rejects, str(top))


SEQUENCE_READERS = {"ck_sequences": read_ck_sequences, "video": read_video, "ucf": read_ucf}
