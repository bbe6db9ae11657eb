"""What every dataset reader shares: the manifest and rejects tables, DatasetError, the split names,
CSV reading with physical line numbers, and safe folder listing.

Its own module so that the image readers (readers.py) and the sequence readers (sequences.py) both
build on it without importing each other; readers.py then registers every format in READERS.
"""
from __future__ import annotations

import csv
import difflib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ferpipe.data.paths import PathError, check_name, printable

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


def _read_csv(path, required: list[str], sep: str = ",", optional: tuple[str, ...] = ()) -> tuple[pd.DataFrame, list[dict]]:
    """Read a CSV as strings; columns matched by name ignoring case and spaces, renamed to `required`
    (and to `optional`, columns that may be absent: then they hold "").

    Returns (rows, rejects). Adds `csv_line`: the physical line of the file where each row starts
    (blank lines and newlines inside quoted fields counted). A row that is not valid UTF-8 or has
    more fields than the header is a rejects row (source = the CSV, its line); a short row gets
    empty fields. DatasetError for a missing file, a header that is not UTF-8, a missing column
    (naming it and the columns found), or a file with no data rows.
    """
    path = _check_file(path)
    header, records, rejects = None, [], []
    try:
        # surrogateescape: one row with bad bytes becomes a rejects row, not a failed file
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
            reader = csv.reader(f, delimiter=sep, skipinitialspace=True)
            end = 0
            for rec in reader:
                line, end = end + 1, reader.line_num
                if not rec or (len(rec) == 1 and not rec[0].strip()):
                    continue  # a blank line
                if header is None:
                    try:
                        check_name("".join(rec))
                    except PathError:
                        raise DatasetError(f"{path}: the header (line {line}) is not valid UTF-8") from None
                    header = rec
                    continue
                try:
                    check_name("".join(rec))
                except PathError:
                    rejects.append({"source": printable(path), "line": line, "reason": "line is not valid UTF-8"})
                    continue
                if len(rec) > len(header):
                    rejects.append({"source": printable(path), "line": line,
                                    "reason": f"{len(rec)} fields, the header has {len(header)}"})
                    continue
                records.append(rec + [""] * (len(header) - len(rec)) + [line])
    except csv.Error as e:
        raise DatasetError(f"{path}: cannot parse as CSV (separator {sep!r}) at line {end + 1}: {e}") from None
    if header is None:
        raise DatasetError(f"{path}: empty file (no header, no rows)")
    columns = [c if c not in header[:i] else f"{c}.{header[:i].count(c)}" for i, c in enumerate(header)]
    df = pd.DataFrame(records, columns=columns + ["csv_line"])
    found = {str(c).strip().lower(): c for c in columns}
    rename = {}
    for name in required:
        if name.lower() not in found:
            msg = f"{path}: missing column '{name}' (found columns: {', '.join(map(str, columns))})"
            close = difflib.get_close_matches(name.lower(), list(found), n=1)
            if close:
                msg += f"; did you mean '{found[close[0]]}'?"
            other = ";" if sep == "," else ","
            if len(columns) == 1 and other in str(columns[0]):
                msg += f"; the file looks {other!r}-separated, this format expects {sep!r}"
            raise DatasetError(msg)
        rename[found[name.lower()]] = name
    if df.empty and not rejects:
        raise DatasetError(f"{path}: header only, no data rows")
    df = df.rename(columns=rename)
    for name in optional:
        if name.lower() in found:
            df = df.rename(columns={found[name.lower()]: name})
        else:
            df[name] = ""
    df["csv_line"] = df["csv_line"].astype(np.int64)
    return df, rejects


def _entries(folder, rejects: list[dict], key=lambda e: (e.name.lower(), e.name)) -> list[tuple[os.DirEntry, bool]]:
    """(entry, is_dir) for the entries of a folder, sorted by `key` (deterministic, independent of the
    file system). An entry that cannot be used (a name that is not UTF-8, a symlink loop, no
    permission) is a rejects row, and so is a folder that cannot be listed."""
    try:
        with os.scandir(folder) as it:
            found = sorted(it, key=key)
    except OSError as e:
        rejects.append({"source": printable(folder), "line": -1, "reason": f"cannot list folder: {e.strerror or e}"})
        return []
    out = []
    for e in found:
        try:
            check_name(e.name)
            out.append((e, e.is_dir()))
        except PathError as err:
            rejects.append({"source": printable(e.path), "line": -1, "reason": str(err)})
        except OSError as err:  # e.g. ELOOP: a symlink pointing to itself
            rejects.append({"source": printable(e.path), "line": -1, "reason": f"cannot read: {err.strerror or err}"})
    return out
