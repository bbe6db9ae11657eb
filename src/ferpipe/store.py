"""The packed artifact store (one HDF5 file per stage output) and output sets (a stage's outputs as one unit).

Every image stage writes ONE file (DVC hashes each file of a directory output, which is slow for
tens of thousands of small images). Layout conventions:
  images     uint8 [N, H, W]        grayscale pixels
  landmarks  float32 [N, 68, 2]     (x, y) as a share of the image width/height (see faces/landmarks.py:
                                    points the predictor puts past the border fall slightly outside [0, 1])
  ids        str [N]                the manifest ids, same order in every artifact of a run
Stage params are stored as attrs (JSON for non-scalars) so a file says how it was made.

Output sets
-----------
A stage writes several files (ingest: images.h5, manifest.csv, rejects.csv, metrics, sheet; train:
the models/ folder and train.json). After a kill -9, a full disk or an exception at ANY point, they
must be the old set or the new set, never a mix. `output_set(files, dirs)` (or the `writes`
decorator) does it:

  * every write to a declared output inside the block goes to a staging path beside it
    (`.<name>.ferpipe-<token>`): `atomic_path` (and so write_h5 / write_csv / write_json /
    write_torch / plots' write_png) redirects there; code writing by other means asks `staged(path)`.
    A directory output starts empty in staging and replaces the old folder whole (no stale fold files);
  * each folder holding outputs gets a journal `.ferpipe-<token>.pending`, flock'ed while the run
    lives (so other runs can tell a live run from a dead one);
  * commit: under flock'ed parent folders, the journal `.ferpipe-<token>.commit` is written (the one
    decision point), then the staged outputs are renamed over the targets, then the journals go.
    A declared file that the block did not write is removed (it is not part of the new set);
  * recovery, at the start of every output set and whenever a reader (read_h5, read_attrs, `settle`)
    finds journals beside its file: a dead run with a `.commit` is rolled forward, one without is
    rolled back (its staged files deleted); stray staged files and the old `.<name>.<random>.tmp` temps
    of the outputs are removed;
  * two concurrent runs into one output stage privately and commit one after the other under the
    folder locks: the result is one run's complete set, never a mix.
The staged bytes are the bytes of a direct write, so reruns stay byte-identical.

Arrays larger than memory
-------------------------
`h5_writer(path, rows=N)` writes a file block by block (`append` a block of rows, `write` a whole
small array such as ids) and publishes it like write_h5 (staged, inside the same output sets);
`read_blocks` reads a dataset back in consecutive blocks and `read_rows` reads chosen rows. With a
known row count an appended dataset is contiguous, as write_h5 writes it: reading 128 random rows of
a contiguous array takes 0.9 ms at 48 px and 2.7 ms at 224 px, against 20 ms and 440 ms with chunks
of one or a few rows (h5py selections across chunks; bench/stream_speed.py). Only a writer that
cannot know its row count (ingest: rows that fail to decode are dropped) appends to a chunked,
growable dataset (chunks of about CHUNK_BYTES), read row by row when rows are chosen.

`FERPIPE_FAULT=<point>[@<n>]:<kill|enospc|sleep<seconds>>[,...]` injects a fault at the n-th
(default 1st) pass of a named point: enter (the set opened), staged (a file written to staging),
decide (just before the commit decision), renamed (a target replaced), done (the set committed),
block (a block of rows appended by h5_writer). tests/test_faults.py uses it.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import inspect
import json
import os
import re
import secrets
import shutil
import signal
import time
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import h5py
import numpy as np

STR = h5py.string_dtype("utf-8")
BLOCK_BYTES = 64 * 2**20  # rows a producer holds at once (read_blocks): 1300 images at 224 px, 29000 at 48 px
CHUNK_BYTES = 64 * 2**10  # the chunk of a growable dataset: 1 row at 224 px, 28 at 48 px

_ACTIVE: list["OutputSet"] = []  # output sets open in this process, outermost first
_HELD: dict[str, list[int]] = {}  # folder -> [fd, depth]: folder flocks held by this process (reentrant)
_JOURNAL = re.compile(r"^\.ferpipe-(?P<token>\d+-[0-9a-f]+)\.(?P<kind>pending|commit|commit\.tmp)$")
_STAGED = re.compile(r"^\.(?P<name>.+)\.ferpipe-(?P<token>\d+-[0-9a-f]+)(?P<old>\.old)?$")
_LEGACY_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # the earlier atomic_path / mkdtemp temps
_FAULT_COUNTS: dict[str, int] = {}


def _fault(point: str) -> None:
    """Fault injection for tests (see the module docstring): kill, sleep<s>, anything else ENOSPC."""
    spec = os.environ.get("FERPIPE_FAULT")
    if not spec:
        return
    _FAULT_COUNTS[point] = _FAULT_COUNTS.get(point, 0) + 1
    for item in spec.split(","):
        where, _, action = item.strip().partition(":")
        name, _, nth = where.partition("@")
        if name == point and _FAULT_COUNTS[point] == int(nth or 1):
            if action == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if action.startswith("sleep"):  # hold this point a while (tests of concurrent writers)
                time.sleep(float(action[5:] or 2))
                continue
            raise OSError(errno.ENOSPC, f"No space left on device (injected at {point}@{nth or 1})")


def _abs(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def _exists(p: Path) -> bool:
    return os.path.lexists(p)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _fsync_dir(d: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(p: Path) -> None:
    """Flush a staged file (or every file of a staged folder) to disk before it is renamed in."""
    files = [p] if p.is_file() else [Path(r, f) for r, _, fs in os.walk(p) for f in fs]
    for f in files:
        if f.is_symlink() or not f.is_file():
            continue
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ---------------------------------------------------------------------------------------------
# folder locks (flock on the folder itself: no lock files left behind)

@contextlib.contextmanager
def _locked(dirs: Iterable[Path]) -> Iterator[None]:
    """Hold flocks on these folders, taken in sorted order (no deadlock between runs); reentrant."""
    taken = []
    try:
        for d in sorted({str(d) for d in dirs}):
            if d in _HELD:
                _HELD[d][1] += 1
            else:
                try:
                    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
                except (FileNotFoundError, NotADirectoryError):
                    continue  # a folder of a dead run's journal that is gone: nothing there to protect
                fcntl.flock(fd, fcntl.LOCK_EX)
                _HELD[d] = [fd, 1]
            taken.append(d)
        yield
    finally:
        for d in reversed(taken):
            _HELD[d][1] -= 1
            if _HELD[d][1] == 0:
                os.close(_HELD.pop(d)[0])


@contextlib.contextmanager
def _settled(dirs: Iterable[Path], names: Iterable[str] = ()) -> Iterator[None]:
    """Lock `dirs` and recover every dead run found in them (locking the other folders those runs
    wrote to as well); yields with the locks held."""
    want = {Path(d) for d in dirs}
    while True:
        with _locked(want):
            need = _recover(want, set(names))
            if need <= want:
                yield
                return
        want |= need


def _is_live(journal: Path) -> bool:
    """A pending journal is live while its run holds the flock on it."""
    try:
        fd = os.open(journal, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _recover(dirs: set[Path], names: set[str]) -> set[Path]:
    """Roll dead runs in `dirs` (all locked) forward or back; returns the folders this needs locked."""
    need: set[Path] = set()
    tokens: dict[str, dict] = {}
    for d in dirs:
        try:
            entries = os.listdir(d)
        except FileNotFoundError:
            continue
        for name in entries:
            if m := _JOURNAL.match(name):
                tokens.setdefault(m["token"], {"journals": [], "staged": []})["journals"].append(d / name)
            elif m := _STAGED.match(name):
                tokens.setdefault(m["token"], {"journals": [], "staged": []})["staged"].append(d / name)
            elif (m := _LEGACY_TMP.match(name)) and m["name"] in names:
                _remove(d / name)
    for token, found in tokens.items():
        pending = [j for j in found["journals"] if j.name.endswith(".pending")]
        if any(_is_live(j) for j in pending):
            continue
        journal = None
        for j in sorted(found["journals"], key=lambda j: not j.name.endswith(".commit")):
            if not j.name.endswith(".tmp"):
                with contextlib.suppress(OSError, ValueError):
                    journal = json.loads(j.read_text())
                    break
        if journal is None:  # staged leftovers with no journal beside them: their run is over
            for p in found["staged"] + found["journals"]:
                _remove(p)
            continue
        run_dirs = {Path(d) for d in journal["dirs"]}
        if not run_dirs <= dirs:
            need |= run_dirs
            continue
        if (Path(journal["dirs"][0]) / f".ferpipe-{token}.commit").exists():
            _roll_forward(journal)
        else:
            _roll_back(journal)
    return need


def _roll_forward(journal: dict) -> None:
    """Put a decided set's staged outputs in place (idempotent: safe to redo after a kill), then
    remove its journals, the commit last."""
    token = journal["token"]
    for e in journal["entries"]:
        target, stage = Path(e["target"]), Path(e["stage"])
        if e["dir"]:
            old = stage.with_name(stage.name + ".old")
            if _exists(stage):
                if _exists(target):
                    os.rename(target, old)
                os.rename(stage, target)
                _fault("renamed")
            _remove(old)
        elif e["written"]:
            if _exists(stage):
                os.replace(stage, target)
                _fault("renamed")
        else:  # declared but not written this time: not part of the new set
            _remove(target)
    dirs = [Path(d) for d in journal["dirs"]]
    for d in dirs:
        _fsync_dir(d)
    for d in dirs:
        _remove(d / f".ferpipe-{token}.pending")
    _remove(dirs[0] / f".ferpipe-{token}.commit")


def _roll_back(journal: dict) -> None:
    token = journal["token"]
    for e in journal["entries"]:
        _remove(Path(e["stage"]))
    dirs = [Path(d) for d in journal["dirs"]]
    _remove(dirs[0] / f".ferpipe-{token}.commit.tmp")
    for d in dirs:
        _remove(d / f".ferpipe-{token}.pending")


def settle(path: str | os.PathLike) -> None:
    """Finish (or undo) any dead run's output set beside `path` before reading it: a run killed
    between the renames of its commit leaves a journal, and this completes it. Cheap when there is
    nothing to do (one listdir)."""
    d = _abs(path).parent
    try:
        if not any(_JOURNAL.match(n) for n in os.listdir(d)):
            return
    except OSError:  # no folder, or not one we may list: nothing to settle here
        return
    with _settled([d]):
        pass


# ---------------------------------------------------------------------------------------------
# output sets

class OutputSet:
    """The outputs of one run, staged beside their targets and swapped in together (see the module
    docstring). Use `output_set(...)` or `@writes(...)`; `path(p)` is the staged location of p."""

    def __init__(self, files: Iterable, dirs: Iterable = ()):
        self.token = f"{os.getpid()}-{secrets.token_hex(6)}"
        self.entries: list[dict] = []
        seen = set()
        for p, is_dir in [(p, False) for p in files if p] + [(p, True) for p in dirs if p]:
            target = _staged(p) or _abs(p)  # inside an outer set: stage within its staging
            if target in seen:
                continue
            seen.add(target)
            stage = target.with_name(f".{target.name}.ferpipe-{self.token}")
            self.entries.append({"target": str(target), "stage": str(stage), "dir": is_dir})
        for e in self.entries:
            for f in self.entries:
                if e is not f and f["dir"] and Path(e["target"]).is_relative_to(f["target"]):
                    raise ValueError(f"output {e['target']} lies inside the output folder {f['target']}")
        self.dirs = sorted({Path(e["target"]).parent for e in self.entries})
        self._fds: list[int] = []
        self._made: list[Path] = []

    def path(self, p: str | os.PathLike) -> Path | None:
        """The staged location of a declared output (or of a file inside a declared folder), else None."""
        p = _abs(p)
        for e in self.entries:
            target = Path(e["target"])
            if p == target:
                return Path(e["stage"])
            if e["dir"] and p.is_relative_to(target):
                return Path(e["stage"]) / p.relative_to(target)
        return None

    def _open(self) -> None:
        for d in self.dirs:  # remember the folders made here: a failed run removes them again
            missing = [p for p in [d, *d.parents] if not p.exists()]
            d.mkdir(parents=True, exist_ok=True)
            self._made += missing
        journal = {"token": self.token, "dirs": [str(d) for d in self.dirs], "entries": self.entries}
        with _settled(self.dirs, [Path(e["target"]).name for e in self.entries]):
            try:
                for d in self.dirs:
                    fd = os.open(d / f".ferpipe-{self.token}.pending", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                    self._fds.append(fd)
                    fcntl.flock(fd, fcntl.LOCK_EX)
                    os.write(fd, json.dumps(journal).encode())
                for e in self.entries:
                    if e["dir"]:
                        os.mkdir(e["stage"], 0o755)
            except BaseException:
                self._abort()
                raise
        _fault("enter")

    def _abort(self) -> None:
        for e in self.entries:
            _remove(Path(e["stage"]))
        for d in self.dirs:
            _remove(d / f".ferpipe-{self.token}.pending")
        self._close()
        for d in sorted(self._made, key=lambda d: len(d.parts), reverse=True):  # deepest first
            with contextlib.suppress(OSError):
                d.rmdir()

    def _close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _commit(self) -> None:
        for e in self.entries:
            e["written"] = e["dir"] or _exists(Path(e["stage"]))
            if e["written"]:
                _fsync_tree(Path(e["stage"]))
        journal = {"token": self.token, "dirs": [str(d) for d in self.dirs], "entries": self.entries}
        primary = self.dirs[0] / f".ferpipe-{self.token}.commit"
        with _settled(self.dirs):
            try:
                _fault("decide")
                tmp = primary.with_name(primary.name + ".tmp")
                with open(tmp, "w") as f:
                    json.dump(journal, f)
                    f.flush()
                    os.fsync(f.fileno())
                os.rename(tmp, primary)  # the decision: from here on the set is rolled forward
                _fsync_dir(self.dirs[0])
            except BaseException:
                self._abort()
                raise
            try:
                _roll_forward(journal)
            finally:
                self._close()  # on a failed rename the journal stays: the next run rolls forward
        _fault("done")


@contextlib.contextmanager
def output_set(files: Iterable = (), dirs: Iterable = ()) -> Iterator[OutputSet]:
    """Write a stage's outputs as one unit: the old set or the new one, never a mix.

    `files` and `dirs` are output paths (None / "" entries are skipped). Inside the block, writes
    through `atomic_path` (write_h5, write_csv, write_json, write_torch, write_png, ...) to a declared
    output, or to a file inside a declared folder, go to its staging path; other code writes to
    `staged(path)`. A write to an undeclared path inside the block is an error. On success every
    output is swapped in (a declared file not written is removed); on any exception or kill the old
    outputs stay exactly as they were. Sets nest (an inner set stages inside the outer staging).
    """
    s = OutputSet(files, dirs)
    if not s.entries:
        yield s
        return
    s._open()
    _ACTIVE.append(s)
    try:
        yield s
    except BaseException:
        _ACTIVE.remove(s)
        s._abort()
        raise
    _ACTIVE.remove(s)
    s._commit()


def writes(*files: str, dirs: Iterable[str] = ()):
    """Decorator: run the function inside `output_set` of its output arguments.

    `files` / `dirs` name the function's parameters holding output paths (a None or "" value means
    no such output), or are callables taking the bound arguments (a dict) and returning a path or a
    list of paths, for outputs derived from an argument (e.g. `<plots_dir>/confusion.png`).
    """
    def collect(specs, bound) -> list:
        out = []
        for spec in specs:
            value = spec(bound) if callable(spec) else bound[spec]
            out += list(value) if isinstance(value, (list, tuple)) else [value]
        return out

    def wrap(fn):
        sig = inspect.signature(fn)
        unknown = [s for s in (*files, *dirs) if not callable(s) and s not in sig.parameters]
        if unknown:
            raise TypeError(f"@writes: {fn.__name__} has no parameter {', '.join(unknown)}")

        @functools.wraps(fn)
        def run(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            with output_set(collect(files, bound.arguments), collect(dirs, bound.arguments)):
                return fn(*args, **kwargs)
        return run
    return wrap


def _staged(path: str | os.PathLike) -> Path | None:
    """The staging path of `path` in the open output sets (absolute), or None when none declares it."""
    p = q = _abs(path)
    for s in _ACTIVE:
        q = s.path(q) or q
    return None if q == p else q


def staged(path: str | os.PathLike) -> Path:
    """Where a write to `path` goes now: its staging path inside the open output sets, else path."""
    return _staged(path) or Path(path)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield the path to write `path` at; it appears at `path` only if everything succeeds.

    Inside an output set: the staged location (a failed write leaves nothing staged). Outside: a
    one-file output set. A kill at any point leaves the old file, never a half-written one.
    """
    if not _ACTIVE:
        with output_set([path]) as s:
            with atomic_path(path) as tmp:
                yield tmp
        return
    tmp = _staged(path)
    if tmp is None:
        raise ValueError(f"{path} is written inside an output set that does not declare it "
                         f"(declared: {[e['target'] for s in _ACTIVE for e in s.entries]})")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    _fault("staged")


# ---------------------------------------------------------------------------------------------
# writers and readers

def write_h5(path: str | os.PathLike, arrays: Mapping[str, np.ndarray], attrs: Mapping | None = None) -> None:
    """Write arrays (str arrays as UTF-8) and attrs to `path` atomically."""
    with h5_writer(path, attrs) as out:
        for name, arr in arrays.items():
            out.write(name, arr)


class H5Writer:
    """An HDF5 file being written (``h5_writer``): whole arrays (`write`) or arrays in blocks of rows
    (`append`); `attrs` are written when the file closes. Uncompressed: lzf saved 3% on FER-2013
    faces and costs read time in every epoch."""

    def __init__(self, f: h5py.File, rows: int | None, attrs: Mapping | None):
        self.f = f
        self.rows = rows
        self.attrs = dict(attrs or {})
        self.filled: dict[str, int] = {}  # appended dataset -> rows written so far

    def write(self, name: str, arr: np.ndarray) -> None:
        """A whole array as dataset `name` (str arrays as UTF-8)."""
        arr = np.asarray(arr)
        if arr.dtype.kind in "UO":
            self.f.create_dataset(name, data=arr.astype(object), dtype=STR)
        else:
            self.f.create_dataset(name, data=arr)

    def append(self, name: str, block: np.ndarray) -> None:
        """Rows at the end of dataset `name`; the first block creates it: contiguous of the writer's
        row count when it has one, else chunked and growable (module docstring)."""
        block = np.asarray(block)
        row = block.shape[1:]
        if name not in self.filled:
            if self.rows is not None:
                self.f.create_dataset(name, (self.rows, *row), block.dtype)
            else:
                per_chunk = max(1, CHUNK_BYTES // max(1, int(np.prod(row)) * block.dtype.itemsize))
                self.f.create_dataset(name, (0, *row), block.dtype, maxshape=(None, *row), chunks=(per_chunk, *row))
            self.filled[name] = 0
        ds, start = self.f[name], self.filled[name]
        stop = start + len(block)
        if self.rows is None:
            ds.resize(stop, axis=0)
        elif stop > self.rows:
            raise ValueError(f"{name}: {stop} rows appended to a file of {self.rows}")
        ds[start:stop] = block
        self.filled[name] = stop
        _fault("block")

    def keep(self, name: str, mask: np.ndarray) -> None:
        """Drop the rows of a growable dataset where `mask` is False, in place (blocks of rows moved
        down, then the dataset shrunk): rows rejected after they were appended."""
        ds = self.f[name]
        mask = np.asarray(mask, bool)
        if self.rows is not None or len(mask) != len(ds):
            raise ValueError(f"{name}: keep needs a growable dataset and one flag per row ({len(mask)} for {len(ds)})")
        kept = 0
        for start, block in _blocks(ds):
            block = block[mask[start:start + len(block)]]
            ds[kept:kept + len(block)] = block
            kept += len(block)
        ds.resize(kept, axis=0)
        self.filled[name] = kept

    def read(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Rows of a dataset written so far (``read_rows``), e.g. for a contact sheet."""
        return read_rows(self.f[name], rows)


@contextlib.contextmanager
def h5_writer(path: str | os.PathLike, attrs: Mapping | None = None, rows: int | None = None) -> Iterator[H5Writer]:
    """Write `path` atomically, as write_h5 does, through an ``H5Writer``; `rows`: the row count of
    every appended dataset when known (each must get exactly that many, else ValueError)."""
    # no chunk cache: each block goes to disk in its own write, so a full disk fails that write cleanly
    # (with dirty chunks cached, HDF5 2.0 failed only when closing the file, then crashed: SIGSEGV)
    with atomic_path(path) as tmp, h5py.File(tmp, "w", rdcc_nbytes=0) as f:
        out = H5Writer(f, None if rows is None else int(rows), attrs)
        yield out
        short = {k: v for k, v in out.filled.items() if out.rows is not None and v != out.rows}
        if short:
            raise ValueError(f"{path}: datasets {sorted(short)} got {sorted(short.values())} of {out.rows} rows")
        for key, value in out.attrs.items():
            f.attrs[key] = value if isinstance(value, (int, float, str, bool, np.generic)) else json.dumps(value)


def open_h5(path: str | os.PathLike) -> h5py.File:
    """An HDF5 file open for reading (after ``settle``), for datasets read in parts (read_rows)."""
    settle(path)
    return h5py.File(path, "r")


def _blocks(ds: h5py.Dataset, block_bytes: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    row_bytes = max(1, int(np.prod(ds.shape[1:])) * ds.dtype.itemsize)
    step = max(1, (block_bytes or BLOCK_BYTES) // row_bytes)
    for start in range(0, len(ds), step):
        yield start, ds[start:start + step]


def read_blocks(path: str | os.PathLike, name: str, block_bytes: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Dataset `name` of `path` in consecutive blocks of rows of about `block_bytes` (default
    BLOCK_BYTES): (first row, block). A producer's input without the whole array in memory."""
    with open_h5(path) as f:
        if name not in f:
            raise KeyError(f"{path}: no dataset '{name}' (has {sorted(f.keys())})")
        yield from _blocks(f[name], block_bytes)


def read_rows(ds: h5py.Dataset, rows: np.ndarray) -> np.ndarray:
    """The rows `rows` (any order, repeats allowed) of an open dataset, in that order. Each distinct
    row is read once, in file order: one selection of a contiguous dataset, row by row from a
    chunked one (an h5py selection across chunks is 20-150x slower: module docstring)."""
    rows = np.asarray(rows, np.int64).reshape(-1)
    if len(rows) and (rows.min() < 0 or rows.max() >= len(ds)):
        raise IndexError(f"{ds.file.filename}:{ds.name}: rows {rows.min()}..{rows.max()} outside 0..{len(ds) - 1}")
    distinct, order = np.unique(rows, return_inverse=True)
    if ds.chunks is None:
        got = ds[distinct] if len(distinct) else np.empty((0, *ds.shape[1:]), ds.dtype)
    else:
        got = np.empty((len(distinct), *ds.shape[1:]), ds.dtype)
        for k, r in enumerate(distinct):
            got[k] = ds[r]
    return got[order]


def read_h5(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read whole datasets into memory (str datasets as numpy str arrays)."""
    out = {}
    with open_h5(path) as f:
        for name in names or list(f.keys()):
            if name not in f:
                raise KeyError(f"{path}: no dataset '{name}' (has {sorted(f.keys())})")
            ds = f[name]
            if h5py.check_string_dtype(ds.dtype):
                out[name] = ds.asstr()[()].astype(str)
            else:
                out[name] = ds[()]
    return out


def read_attrs(path: str | os.PathLike) -> dict:
    settle(path)
    with h5py.File(path, "r") as f:
        out = {}
        for k, v in f.attrs.items():
            if isinstance(v, str):
                try:
                    v = json.loads(v)
                except ValueError:
                    pass
            out[k] = v
        return out


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_csv(path: str | os.PathLike, frame) -> None:
    """Write a pandas DataFrame atomically (no index)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def write_torch(path: str | os.PathLike, obj) -> None:
    """torch.save atomically. Through a buffer: torch.save names the zip's inner folder after the
    file, and the temp file's name is random, so saving to it directly made reruns differ in bytes."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.getvalue())
