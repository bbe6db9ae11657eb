"""Paths named by a dataset: printable, valid UTF-8, and inside the dataset root.

The pipeline may run as root on shared data, so an image path written in a list file or CSV
(`../../etc/passwd`, `/etc/shadow`, a symlink pointing out of the dataset) must not make ingest read
files outside the dataset: `inside_root` resolves the path (symlinks followed) and refuses it unless
it stays under the root; the readers' `outside_root=True` option allows such paths explicitly.
Folder layouts (folder, ck_sequences) walk the dataset's own tree and are not checked this way.

File names that are not valid UTF-8 (`caf\\xe9.png` on a Linux file system) cannot go into the
manifest, the HDF5 ids or the rejects CSV as they are: `printable` writes their bad bytes as \\xNN,
and `check_name` makes them a rejects row instead of a crash at write time.
"""
from __future__ import annotations

import os


class PathError(ValueError):
    """A path a reader cannot use; str(error) is the reason for the rejects table."""


def printable(path) -> str:
    """The path as valid text: bytes that are not UTF-8 (Python's surrogate escapes) as \\xNN."""
    return os.fspath(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def check_name(path) -> None:
    """PathError when the path is not valid UTF-8 (or holds a NUL character)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PathError("file name is not valid UTF-8") from None
    if "\x00" in text:
        raise PathError("path contains a NUL character")


def inside_root(root, rel: str, outside_root: bool = False) -> str:
    """root/rel, when it resolves (symlinks followed) inside root; PathError with the reason otherwise.

    An absolute `rel` is fine when it resolves inside root. With outside_root=True any path is taken.
    """
    check_name(rel)
    if not rel:
        raise PathError("empty path")
    path = os.path.join(root, rel)
    if outside_root:
        return path
    base = os.path.realpath(root)
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        what = "absolute path" if os.path.isabs(rel) else "path"
        raise PathError(f"{what} resolves outside the dataset root {printable(root) or '.'} (to {printable(real)}); "
                        "set the reader option outside_root=true to allow it")
    return path
