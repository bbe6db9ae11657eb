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
numbers count the header as line 1 (so fer2013.csv row i is line i + 2 when the file has no blank
lines). Relative image paths in CSV/list files are joined to `root`, which defaults to the folder of
the CSV/list file.
"""
from __future__ import annotations

import difflib
import inspect
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ferpipe.data.decode import ImageError, parse_pixels
from ferpipe.data.labels import LabelError, affectnet_name, canonical, fer2013_name, polarity_name

MANIFEST_COLUMNS = ["id", "source", "split", "label_name", "valence", "arousal", "sequence_id",
                    "frame_index", "subject", "fold"]
REJECT_COLUMNS = ["source", "line", "reason"]
_DEFAULTS = {"label_name": "", "valence": np.nan, "arousal": np.nan, "sequence_id": "",
             "frame_index": -1, "subject": "", "fold": -1}
_INT_COLUMNS = {"frame_index", "fold", "box_x", "box_y", "box_w", "box_h"}
_FLOAT_COLUMNS = {"valence", "arousal", "label_value"}

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp")

# split names as datasets spell them (compared lower-case) -> train / val / test
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
          "publictest": "val", "test": "test", "privatetest": "test"}


class DatasetError(ValueError):
    """The dataset as a whole cannot be read (the message names the file, line or column)."""


def split_name(name: str) -> str | None:
    """A dataset's split name (Training, PublicTest, validation, ...) -> train/val/test, or None."""
    return SPLITS.get(str(name).strip().lower())


# ---------------------------------------------------------------------------------------------
# shared helpers

def _frames(rows: list[dict], rejects: list[dict], extra: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Build the canonical (manifest, rejects) frames; duplicate ids: first kept, others rejected.

    Each row dict may carry `_line` (its line in the source file, for the duplicate message).
    """
    columns = MANIFEST_COLUMNS + extra
    defaults = {**_DEFAULTS, "_line": -1}
    df = pd.DataFrame([{**defaults, **r} for r in rows], columns=columns + ["_line"])
    for col in columns:
        if col in _INT_COLUMNS:
            df[col] = df[col].astype(np.int64)
        elif col in _FLOAT_COLUMNS:
            df[col] = df[col].astype(np.float64)
        else:
            df[col] = df[col].astype(str)

    dup = df["id"].duplicated(keep="first")
    if dup.any():
        first = df.drop_duplicates("id").set_index("id")
        for _, r in df[dup].iterrows():
            f = first.loc[r["id"]]
            where = f"line {int(f['_line'])}" if f["_line"] >= 0 else f["source"]
            rejects.append({"source": r["source"], "line": int(r["_line"]),
                            "reason": f"duplicate id {r['id']!r}, first at {where}"})
        df = df[~dup]
    manifest = df[columns].reset_index(drop=True)
    rej = pd.DataFrame(rejects, columns=REJECT_COLUMNS)
    rej["line"] = rej["line"].astype(np.int64)
    rej["source"] = rej["source"].astype(str)
    rej["reason"] = rej["reason"].astype(str)
    return manifest, rej


def _check_file(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: file not found")
    if not path.is_file():
        raise DatasetError(f"{path}: is a folder, expected a file")
    return path


def _read_csv(path, required: list[str], sep: str = ",") -> pd.DataFrame:
    """Read a CSV as strings; columns matched by name ignoring case and spaces, renamed to `required`.

    Adds `csv_line` (the file line of each row). DatasetError for a missing file, a missing column
    (naming it and the columns found), or a file with no data rows.
    """
    path = _check_file(path)
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False, skipinitialspace=True)
    except pd.errors.EmptyDataError:
        raise DatasetError(f"{path}: empty file (no header, no rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot parse as CSV (separator {sep!r}): {e}") from None
    found = {str(c).strip().lower(): c for c in df.columns}
    rename = {}
    for name in required:
        if name.lower() not in found:
            msg = f"{path}: missing column '{name}' (found columns: {', '.join(map(str, df.columns))})"
            close = difflib.get_close_matches(name.lower(), list(found), n=1)
            if close:
                msg += f"; did you mean '{found[close[0]]}'?"
            other = ";" if sep == "," else ","
            if len(df.columns) == 1 and other in str(df.columns[0]):
                msg += f"; the file looks {other!r}-separated, this format expects {sep!r}"
            raise DatasetError(msg)
        rename[found[name.lower()]] = name
    if df.empty:
        raise DatasetError(f"{path}: header only, no data rows")
    df = df.rename(columns=rename)
    df["csv_line"] = np.arange(len(df)) + 2
    return df


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
    return f


# ---------------------------------------------------------------------------------------------
# readers, one per format

def read_folder(path, root: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Kaggle layout `<path>/<split>/<class>/<image>`.

    Split folders (any case): train, val, validation, test, PublicTest, PrivateTest; class folder
    names are canonicalised (`Anger` -> `angry`). id = "<split>/<class>/<file stem>". Files at the
    top level (README, LICENSE) are not dataset entries and are ignored; anything else that is not an
    image inside the tree is a rejects row. `root` is unused (the folder is the root).
    """
    top = Path(path)
    if not top.exists():
        raise DatasetError(f"{top}: folder not found")
    if not top.is_dir():
        raise DatasetError(f"{top}: is a file, the folder format expects <folder>/<split>/<class>/<image>")
    rows, rejects = [], []

    def by_name(p):  # deterministic order, independent of case and of the file system
        return sorted(os.scandir(p), key=lambda e: (e.name.lower(), e.name))

    split_dirs, others = [], []
    for e in by_name(top):
        if e.is_dir():
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
        for cd in by_name(sd.path):
            if not cd.is_dir():
                rejects.append({"source": cd.path, "line": -1, "reason": "file outside a class folder"})
                continue
            label = canonical(cd.name)
            for f in by_name(cd.path):
                if f.is_dir():
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
    df = _read_csv(path, ["emotion", "pixels", "Usage"])
    name = Path(path).name
    rows, rejects = [], []
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


def read_affectnet(path, root: str = "", split: str = "train") -> tuple[pd.DataFrame, pd.DataFrame]:
    """AffectNet's training.csv / validation.csv (read the validation file with split="val").

    Expression codes 8..10 (none, uncertain, no-face) are rejected with that reason, as are
    valence/arousal outside [-1, 1]. The face box goes to box_x/y/w/h; ingest crops it. id = the
    CSV's relative path. (facial_landmarks is not needed and not required.)
    """
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"affectnet: split {split!r} is not a split name (train/val/test)")
    df = _read_csv(path, AFFECTNET_COLUMNS)
    base = _base(path, root)
    rows, rejects = [], []
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
            if box[2] <= 0 or box[3] <= 0:
                raise LabelError(f"face box width/height not positive ({box[2]:g}x{box[3]:g})")
            if not rel:
                raise LabelError("empty subDirectory_filePath")
        except LabelError as e:
            rejects.append({"source": source, "line": int(r.csv_line), "reason": str(e)})
            continue
        rows.append({"id": rel, "source": source, "split": split_c, "label_name": label, **va,
                     "box_x": int(round(box[0])), "box_y": int(round(box[1])),
                     "box_w": int(round(box[2])), "box_h": int(round(box[3])), "_line": int(r.csv_line)})
    return _frames(rows, rejects, ["box_x", "box_y", "box_w", "box_h"])


def read_listfile(path, root: str = "", split: str = "train", sort: bool = False,
                  ignore_missing: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """LSTM-on-CNN list file: `path label [label2 ...] seq_number` per line, whitespace separated.

    The first label goes to `label_value` (float; label_name = its integer as text when integral, so
    classification labels act as class names and regression targets leave it ""), the others,
    space-joined, to `labels_extra`. sequence_id = seq_number; frame_index = position inside the
    sequence. sort=True orders lines by (seq_number, path) and renumbers sequences 0, 1, ...
    ignore_missing=True makes absent images rejects rows; otherwise they are an error. Blank lines and
    lines starting with '#' are skipped. id = the path as written.
    """
    path = _check_file(path)
    split_c = split_name(split)
    if split_c is None:
        raise DatasetError(f"listfile: split {split!r} is not a split name (train/val/test)")
    base = _base(path, root)
    entries, rejects, missing = [], [], []
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a text file ({e})") from None
    for line_no, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        source = os.path.join(base, fields[0])
        if len(fields) < 3:
            rejects.append({"source": source, "line": line_no,
                            "reason": f"expected 'path label [label2 ...] seq_number', got {len(fields)} fields"})
            continue
        try:
            labels = [_number(v, "label") for v in fields[1:-1]]
            seq = _number(fields[-1], "seq_number")
            if seq != int(seq):
                raise LabelError(f"seq_number {fields[-1]!r} is not an integer")
        except LabelError as e:
            rejects.append({"source": source, "line": line_no, "reason": str(e)})
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
        entries.sort(key=lambda e: (e[0], e[1]))
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


def read_guided_st(path, root: str = "") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Guided-ST distribution CSV `emotion;path;in_set;fold` (';'-separated).

    emotion is their 3-class polarity code: 0 neutral, 1 positive, 2 negative. in_set is the split
    (mapped like folder names), fold their k-fold index (-1 when empty). id = the path as written.
    """
    df = _read_csv(path, ["emotion", "path", "in_set", "fold"], sep=";")
    base = _base(path, root)
    rows, rejects = [], []
    for r in df.itertuples(index=False):
        rel = str(r.path).strip()
        source = os.path.join(base, rel)
        try:
            label = polarity_name(r.emotion)
            split = split_name(r.in_set)
            if split is None:
                raise LabelError(f"in_set {r.in_set!r} is not a split name (train/val/test)")
            fold = -1
            if str(r.fold).strip():
                f = _number(r.fold, "fold")
                if f != int(f):
                    raise LabelError(f"fold {r.fold!r} is not an integer")
                fold = int(f)
            if not rel:
                raise LabelError("empty path")
        except LabelError as e:
            rejects.append({"source": source, "line": int(r.csv_line), "reason": str(e)})
            continue
        rows.append({"id": rel, "source": source, "split": split, "label_name": label, "fold": fold,
                     "_line": int(r.csv_line)})
    return _frames(rows, rejects, [])


READERS = {
    "folder": read_folder,
    "fer2013_csv": read_fer2013_csv,
    "affectnet": read_affectnet,
    "listfile": read_listfile,
    "guided_st": read_guided_st,
}
# the sequence formats (ck_sequences, video) live in data/sequences.py, which imports this module
from ferpipe.data.sequences import SEQUENCE_READERS  # noqa: E402

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
