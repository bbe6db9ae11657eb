"""Dataset readers: every supported layout -> one canonical manifest plus a rejects table.

Each reader returns `(manifest, rejects)`:
  manifest  one row per usable input, columns MANIFEST_COLUMNS in that order, then reader extras
            (`pixels` for fer2013.csv; `box_x, box_y, box_w, box_h` for AffectNet; `label_value`,
            `labels_extra` for list files);
  rejects   one row per input the reader could not use: source, line (-1 if not from a text
            file), reason. Nothing is skipped silently.
Structural problems (missing file or column, nothing to read, unknown format) raise DatasetError
instead: there is no useful partial result.

Readers only look at files (names, existence, CSV text); decoding images is ingest's job. Line
numbers are physical lines of the file, from 1 (the header is line 1; blank lines and newlines
inside quoted fields count), so an editor's "go to line" finds the row. Relative image paths in
CSV/list files are joined to `root`, which defaults to the folder of the CSV/list file, and must
resolve inside it (data/paths.py; reader option outside_root=true allows others). One bad row (bad
label, bad path, a name or line that is not UTF-8, too many fields) is a rejects row, never the end
of the run.
"""
from __future__ import annotations

import inspect
import math
import os
import re
from pathlib import Path

import pandas as pd

from ferpipe.data.decode import ImageError, parse_pixels
from ferpipe.data.labels import LabelError, affectnet_name, canonical, fer2013_name, polarity_name
from ferpipe.data.paths import PathError, inside_root, printable
from ferpipe.data.sequences import SEQUENCE_READERS
from ferpipe.data.tables import (IMAGE_EXTENSIONS, MANIFEST_COLUMNS, REJECT_COLUMNS, DatasetError,  # noqa: F401
                                 _check_file, _entries, _frames, _read_csv, split_name)  # (tables re-exported)

def _base(path, root) -> Path:
    """Folder that relative image paths are joined to: `root`, or the CSV/list file's folder."""
    return Path(root) if root else Path(path).parent


def _number(value, what: str) -> float:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{what} {value!r} is not a number") from None
    if math.isnan(f):
        raise LabelError(f"{what} is empty")
    if not math.isfinite(f):
        raise LabelError(f"{what} {value!r} is not a finite number")
    return f


_DIGITS = re.compile(r"(\d+)", re.ASCII)
_TRAILING = re.compile(r"(\d+)$", re.ASCII)


def natural_key(text: str) -> list:
    """Sort key that orders the numbers inside a text by value: frame2 < frame10."""
    return [int(t) if i % 2 else t for i, t in enumerate(_DIGITS.split(text))]


def frame_number(path: str) -> int | None:
    """The number at the end of a file's stem (`S005_001_00000010.png` -> 10), or None."""
    m = _TRAILING.search(os.path.splitext(os.path.basename(path))[0])
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------
# readers, one per format

def read_folder(path, root: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kaggle layout `<path>/<split>/<class>/<image>`.

    Split folders (any case): train, val, validation, test, PublicTest, PrivateTest; class folder
    names are canonicalised (`Anger` -> `angry`). id = "<split>/<class>/<file stem>". Files at the
    top level (README, LICENSE) are not dataset entries and are ignored; anything else that is not an
    image inside the tree is a rejects row, and so is an entry that cannot be read (a name that is
    not UTF-8, a symlink loop). `root` is unused (the folder is the root).
    """
    top = Path(path)
    if not top.exists():
        raise DatasetError(f"{top}: folder not found")
    if not top.is_dir():
        raise DatasetError(f"{top}: is a file, the folder format expects <folder>/<split>/<class>/<image>")
    rows, rejects = [], []
    split_dirs, others = [], []
    for e, is_dir in _entries(top, rejects):
        if is_dir:
            (split_dirs if split_name(e.name) else others).append(e)
    if not split_dirs:
        raise DatasetError(
            f"{top}: no split folders; expected <folder>/<split>/<class>/<image> with split one of "
            f"train, val, validation, test, PublicTest, PrivateTest (found folders: "
            f"{', '.join(e.name for e in others) or 'none'})")
    split_dirs.sort(key=lambda e: ("train", "val", "test").index(split_name(e.name)))
    for e in others:
        rejects.append({"source": e.path, "line": -1, "reason": f"folder '{e.name}' is not a split name"})

    for sd in split_dirs:
        split = split_name(sd.name)
        for cd, cd_is_dir in _entries(sd.path, rejects):
            if not cd_is_dir:
                rejects.append({"source": cd.path, "line": -1, "reason": "file outside a class folder"})
                continue
            label = canonical(cd.name)
            for f, f_is_dir in _entries(cd.path, rejects):
                if f_is_dir:
                    rejects.append({"source": f.path, "line": -1, "reason": "folder inside a class folder (not read)"})
                    continue
                stem, ext = os.path.splitext(f.name)
                if ext.lower() not in IMAGE_EXTENSIONS:
                    rejects.append({"source": f.path, "line": -1, "reason": "not an image extension"})
                    continue
                rows.append({"id": f"{split}/{label}/{stem}", "source": f.path, "split": split,
                             "label_name": label})
    if not rows:
        raise DatasetError(f"{top}: no images found under <split>/<class>/ "
                           f"(extensions {', '.join(IMAGE_EXTENSIONS)})")
    return _frames(rows, rejects, [])


def read_fer2013_csv(path, root: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """The original fer2013.csv: emotion (0..6), pixels (2304 ints), Usage.

    Usage Training/PublicTest/PrivateTest -> train/val/test. id = "fer2013/<line>", source =
    "<file name>:<line>"; the pixel string is kept in the `pixels` column for ingest to decode.
    """
    df, rejects = _read_csv(path, ["emotion", "pixels", "Usage"])
    name = Path(path).name
    rows = []
    for emotion, pixels, usage, line in zip(df["emotion"], df["pixels"], df["Usage"], df["csv_line"]):
        source = f"{name}:{line}"
        try:
            label = fer2013_name(emotion)
            split = split_name(usage)
            if split is None:
                raise LabelError(f"Usage {usage!r} is not Training/PublicTest/PrivateTest")
            parse_pixels(pixels, 48 * 48)
        except (LabelError, ImageError) as e:
            rejects.append({"source": source, "line": int(line), "reason": str(e)})
            continue
        rows.append({"id": f"fer2013/{line}", "source": source, "split": split, "label_name": label,
                     "pixels": pixels, "_line": int(line)})
    return _frames(rows, rejects, ["pixels"])


AFFECTNET_COLUMNS = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                     "expression", "valence", "arousal"]
MAX_BOX = 1e6  # pixels: a face box coordinate beyond this is a broken row (and would overflow int64)


AFFECTNET_FILES = (("training.csv", "train"), ("validation.csv", "val"))


def read_affectnet(path, root: str = "", split: str = "train",
                   outside_root: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """AffectNet's training.csv / validation.csv (read the validation file alone with split="val"), or
    the folder holding both: one manifest, training.csv's rows in split train and validation.csv's in
    split val (hold val out as the test set with split.test=[val]); `split` is then unused.

    Expression codes 8..10 (none, uncertain, no-face) are rejected with that reason, as are
    valence/arousal outside [-1, 1], face boxes that are not finite or beyond 1e6 px, and image paths
    that resolve outside the root (unless outside_root=True). The face box goes to box_x/y/w/h;
    ingest crops it. id = the CSV's relative path. (facial_landmarks is not needed and not required.)
    """
    if os.path.isdir(path):
        files = [(os.path.join(path, name), s) for name, s in AFFECTNET_FILES]
        missing = [f for f, _ in files if not os.path.isfile(f)]
        if missing:
            raise DatasetError(f"{path}: an AffectNet folder holds training.csv and validation.csv; missing "
                               f"{', '.join(os.path.basename(f) for f in missing)}")
        root = root or str(path)
    else:
        files = [(path, split)]
    rows, rejects = [], []
    for csv_path, csv_split in files:
        split_c = split_name(csv_split)
        if split_c is None:
            raise DatasetError(f"affectnet: split {csv_split!r} is not a split name (train/val/test)")
        df, bad = _read_csv(csv_path, AFFECTNET_COLUMNS)
        rejects += bad
        base = _base(csv_path, root)
        for r in df.itertuples(index=False):
            rel = str(r.subDirectory_filePath).strip()
            source = os.path.join(base, rel)
            try:
                label = affectnet_name(r.expression)
                va = {}
                for what in ("valence", "arousal"):
                    v = _number(getattr(r, what), what)
                    if not -1.0 <= v <= 1.0:
                        raise LabelError(f"{what} {v:g} outside [-1, 1]")
                    va[what] = v
                box = [_number(getattr(r, c), c) for c in ("face_x", "face_y", "face_width", "face_height")]
                if max(abs(v) for v in box) > MAX_BOX:
                    raise LabelError(f"face box {tuple(box)} out of range (beyond {MAX_BOX:g} px)")
                if box[2] <= 0 or box[3] <= 0:
                    raise LabelError(f"face box width/height not positive ({box[2]:g}x{box[3]:g})")
                if not rel:
                    raise LabelError("empty subDirectory_filePath")
                source = inside_root(base, rel, outside_root)
            except (LabelError, PathError) as e:
                rejects.append({"source": printable(source), "line": int(r.csv_line), "reason": str(e)})
                continue
            rows.append({"id": rel, "source": source, "split": split_c, "label_name": label, **va,
                         "box_x": int(round(box[0])), "box_y": int(round(box[1])),
                         "box_w": int(round(box[2])), "box_h": int(round(box[3])), "_line": int(r.csv_line)})
    return _frames(rows, rejects, ["box_x", "box_y", "box_w", "box_h"])


def _listfile_sequences(entries: list[tuple], sort: bool, per_frame_labels: bool) -> dict[int, str]:
    """{seq_number: reason} for the sequences of a list file that cannot be used as written: lines
    not contiguous, frame numbers (the number ending the file name) not increasing, or labels that
    differ between frames (unless per_frame_labels)."""
    lines_of: dict[int, list[int]] = {}
    for i, e in enumerate(entries):
        lines_of.setdefault(e[0], []).append(i)
    bad = {}
    for seq, idx in lines_of.items():
        lines = [entries[i][4] for i in idx]
        if idx != list(range(idx[0], idx[0] + len(idx))):
            bad[seq] = (f"the lines of sequence {seq} are not contiguous (lines {', '.join(map(str, lines))}); "
                        "sort=true orders them")
            continue
        numbers = [frame_number(entries[i][1]) for i in idx]
        if None not in numbers:
            for j in range(1, len(idx)):
                if numbers[j] <= numbers[j - 1]:
                    what = "repeats" if numbers[j] == numbers[j - 1] else "comes after"
                    bad[seq] = (f"frames of sequence {seq} out of order: frame {numbers[j]} (line {lines[j]}) "
                                f"{what} frame {numbers[j - 1]} (line {lines[j - 1]})"
                                + ("" if sort else "; sort=true orders them"))
                    break
            if seq in bad:
                continue
        labels = [tuple(entries[i][3]) for i in idx]
        if not per_frame_labels and len(set(labels)) > 1:
            first: dict[tuple, int] = {}  # each label set at its first line
            for lab, line in zip(labels, lines):
                first.setdefault(lab, line)
            shown = ", ".join(f"{' '.join(f'{v:g}' for v in lab)} (line {line})" for lab, line in list(first.items())[:4])
            bad[seq] = (f"labels disagree within sequence {seq}: {shown}; per_frame_labels=true keeps "
                        "per-frame labels")
    return bad


def _text_lines(path: Path, rejects: list[dict]):
    """(line number, whitespace-split fields) of a text list file; blank and '#' lines skipped, a line
    that is not UTF-8 a rejects row (the list readers: listfile, raf_db)."""
    for line_no, raw in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
        except UnicodeDecodeError:
            rejects.append({"source": printable(path), "line": line_no, "reason": "line is not valid UTF-8"})
            continue
        fields = line.split()
        if fields and not fields[0].startswith("#"):
            yield line_no, fields


def read_listfile(path, root: str = "", split: str = "train", sort: bool = False, ignore_missing: bool = False,
                  per_frame_labels: bool = False, outside_root: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """LSTM-on-CNN list file: `path label [label2 ...] seq_number` per line, whitespace separated.

    The first label goes to `label_value` (float; label_name = its integer as text when integral, so
    classification labels act as class names and regression targets leave it ""), the others,
    space-joined, to `labels_extra`. sequence_id = seq_number; frame_index = position inside the
    sequence. The frames of a sequence must be contiguous lines in frame order (the number ending the
    file name, when every frame has one) with one label for the whole sequence; a sequence that is not
    is rejected whole (every line a rejects row, with the reason), like the CK+ reader does.
    sort=True orders the lines by seq_number, then naturally by path (frame2 before frame10), and
    renumbers sequences 0, 1, ...; per_frame_labels=True accepts labels that change within a sequence
    (per-frame targets, as in Deep Pain). Image paths must resolve inside the root (symlinks followed)
    unless outside_root=True. ignore_missing=True makes absent images rejects rows; otherwise they
    are an error. Blank lines and lines starting with '#' are skipped; a line that is not UTF-8 text
    is a rejects row. id = the path as written.
    """
    if Path(path).is_dir():
        return _listfile_folder(Path(path), root, sort=sort, ignore_missing=ignore_missing,
                                per_frame_labels=per_frame_labels, outside_root=outside_root)
    path = _check_file(path)
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"listfile: split {split!r} is not a split name (train/val/test)")
    base = _base(path, root)
    entries, rejects, missing = [], [], []
    for line_no, fields in _text_lines(path, rejects):
        source = os.path.join(base, fields[0])
        if len(fields) < 3:
            rejects.append({"source": printable(source), "line": line_no,
                            "reason": f"expected 'path label [label2 ...] seq_number', got {len(fields)} fields"})
            continue
        try:
            labels = [_number(v, "label") for v in fields[1:-1]]
            seq = _number(fields[-1], "seq_number")
            if seq != int(seq):
                raise LabelError(f"seq_number {fields[-1]!r} is not an integer")
            source = inside_root(base, fields[0], outside_root)
        except (LabelError, PathError) as e:
            rejects.append({"source": printable(source), "line": line_no, "reason": str(e)})
            continue
        if not os.path.isfile(source):
            if not ignore_missing:
                missing.append(f"line {line_no}: {source}")
                continue
            rejects.append({"source": source, "line": line_no, "reason": "file not found"})
            continue
        entries.append((int(seq), fields[0], source, labels, line_no))
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DatasetError(f"{path}: {len(missing)} image(s) not found: {'; '.join(missing[:5])}{more}; "
                           f"pass ignore_missing=True to list them as rejects instead")
    if not entries and not rejects:
        raise DatasetError(f"{path}: no entries (empty list file)")
    if sort:
        entries.sort(key=lambda e: (e[0], natural_key(e[1])))
    bad = _listfile_sequences(entries, sort, per_frame_labels)
    for seq, _, source, _, line_no in entries:
        if seq in bad:
            rejects.append({"source": source, "line": line_no, "reason": bad[seq]})
    entries = [e for e in entries if e[0] not in bad]
    if sort:
        renumber = {s: i for i, s in enumerate(dict.fromkeys(e[0] for e in entries))}
        entries = [(renumber[s], *rest) for s, *rest in entries]
    rows, count = [], {}
    for seq, rel, source, labels, line_no in entries:
        v = labels[0]
        frame = count.get(seq, 0)
        count[seq] = frame + 1
        rows.append({"id": rel, "source": source, "split": split_c,
                     "label_name": str(int(v)) if v == int(v) else "", "sequence_id": str(seq),
                     "frame_index": frame, "label_value": v,
                     "labels_extra": " ".join(f"{x:g}" for x in labels[1:]), "_line": line_no})
    return _frames(rows, rejects, ["label_value", "labels_extra"])


LIST_SPLITS = ("train", "val", "test")


def _listfile_folder(folder: Path, root: str = "", **opts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """LSTM-on-CNN's train / validation (/ test) lists: a folder with train.txt, val.txt [, test.txt] read
    into one manifest, each file's rows in its split; sequence ids are `<split>/<seq_number>` (each list
    numbers its own sequences). Image paths are relative to `root`, else to the folder."""
    files = {s: folder / f"{s}.txt" for s in LIST_SPLITS if (folder / f"{s}.txt").is_file()}
    if "train" not in files:
        raise DatasetError(f"{folder}: a listfile folder needs train.txt (and val.txt, optionally test.txt)")
    manifests, rejects = [], []
    for split, file in files.items():
        m, r = read_listfile(file, root or str(folder), split=split, **opts)
        m["sequence_id"] = split + "/" + m["sequence_id"].astype(str)
        manifests.append(m)
        rejects.append(r)
    manifest, rejects = pd.concat(manifests, ignore_index=True), pd.concat(rejects, ignore_index=True)
    again = manifest["id"].duplicated(keep="first")
    if again.any():  # one image in two lists would sit in two splits: kept in the first only
        extra = manifest[again].assign(line=-1, reason=lambda d: "also in an earlier list (" + d["split"] + ")")
        rejects = pd.concat([rejects, extra[["source", "line", "reason"]]], ignore_index=True)
        manifest = manifest[~again].reset_index(drop=True)
    return manifest, rejects


def read_guided_st(path, root: str = "", outside_root: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Guided-ST distribution CSV (';'-separated): `emotion;path;in_set;fold` (their FER-2013 file) or
    `path;emotion;fold` (their AffectNet file: no in_set, every row is a training row).

    emotion is their 3-class polarity code: 0 neutral, 1 positive, 2 negative. in_set is the split
    (mapped like folder names), fold their k-fold index (-1 when empty): the split stage uses those
    folds (split.dataset_folds). id = the path as written; it must resolve inside the root unless
    outside_root=True.
    """
    df, rejects = _read_csv(path, ["emotion", "path", "fold"], sep=";", optional=("in_set",))
    base = _base(path, root)
    rows = []
    for r in df.itertuples(index=False):
        rel = str(r.path).strip()
        source = os.path.join(base, rel)
        try:
            label = polarity_name(r.emotion)
            split = split_name(r.in_set) if str(r.in_set).strip() else "train"
            if split is None:
                raise LabelError(f"in_set {r.in_set!r} is not a split name (train/val/test)")
            fold = -1
            if str(r.fold).strip():
                f = _number(r.fold, "fold")
                if f != int(f) or not -1 <= f < 10**6:
                    raise LabelError(f"fold {r.fold!r} is not an integer in -1..999999")
                fold = int(f)
            if not rel:
                raise LabelError("empty path")
            source = inside_root(base, rel, outside_root)
        except (LabelError, PathError) as e:
            rejects.append({"source": printable(source), "line": int(r.csv_line), "reason": str(e)})
            continue
        rows.append({"id": rel, "source": source, "split": split, "label_name": label, "fold": fold,
                     "_line": int(r.csv_line)})
    return _frames(rows, rejects, [])


RAF_DB_CLASSES = ("surprise", "fear", "disgust", "happy", "sad", "angry", "neutral")  # its labels 1..7


def read_raf_db(path, root: str = "", aligned: bool = False, outside_root: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RAF-DB's basic label list (EmoLabel/list_patition_label.txt, also the Emotion SDK's `path label`
    lists): `train_00001.jpg 5` per line, labels 1-based (1 surprise, 2 fear, 3 disgust, 4 happy, 5 sad,
    6 angry, 7 neutral), the split from the name (train_ / test_). aligned=True reads the aligned faces
    (Image/aligned/train_00001_aligned.jpg, give that folder as root); the id stays the name as listed.
    Blank lines and '#' lines are skipped; a bad label, an unknown split or a line that is not UTF-8 is
    a rejects row.
    """
    path = _check_file(path)
    base = _base(path, root)
    rows, rejects = [], []
    for line_no, fields in _text_lines(path, rejects):
        name = fields[0]
        rel = re.sub(r"(\.[^./]+)$", r"_aligned\1", name) if aligned else name
        source = os.path.join(base, rel)
        try:
            if len(fields) != 2:
                raise LabelError(f"expected 'name label', got {len(fields)} fields")
            code = _number(fields[1], "label")
            if code != int(code) or not 1 <= code <= len(RAF_DB_CLASSES):
                raise LabelError(f"label {fields[1]!r} is not 1..{len(RAF_DB_CLASSES)}")
            split = split_name(os.path.basename(name).split("_")[0])
            if split is None:
                raise LabelError(f"cannot tell the split of {name!r} (RAF-DB names start with train_ or test_)")
            source = inside_root(base, rel, outside_root)
        except (LabelError, PathError) as e:
            rejects.append({"source": printable(source), "line": line_no, "reason": str(e)})
            continue
        rows.append({"id": name, "source": source, "split": split, "label_name": RAF_DB_CLASSES[int(code) - 1],
                     "_line": line_no})
    return _frames(rows, rejects, [])


READERS = {
    "folder": read_folder,
    "fer2013_csv": read_fer2013_csv,
    "affectnet": read_affectnet,
    "listfile": read_listfile,
    "guided_st": read_guided_st,
    "raf_db": read_raf_db,
}
# the sequence formats (ck_sequences, video, ucf) live in data/sequences.py, which imports this module

READERS.update(SEQUENCE_READERS)


def reader_options(fmt: str) -> list[str]:
    """The extra keyword options a format's reader takes (besides path and root)."""
    if fmt not in READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; valid formats: {', '.join(READERS)}")
    return [p for p in inspect.signature(READERS[fmt]).parameters if p not in ("path", "root")]


def read_dataset(format: str, path, root: str = "", **opts) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Read a dataset of the named format -> (manifest, rejects). See the reader of each format."""
    allowed = reader_options(format)
    bad = sorted(set(opts) - set(allowed))
    if bad:
        raise DatasetError(f"format {format!r} has no option {', '.join(bad)} "
                           f"(options: {', '.join(allowed) or 'none'})")
    return READERS[format](path, root=root, **opts)
