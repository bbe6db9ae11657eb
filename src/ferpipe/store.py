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

`FERPIPE_FAULT=<point>[@<n>]:<kill|enospc|sleep<seconds>>[,...]` injects a fault at the n-th
(default 1st) pass of a named point: enter (the set opened), staged (a file written to staging),
decide (just before the commit decision), renamed (a target replaced), done (the set committed).
tests/test_faults.py uses it.
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
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in "UO":
                f.create_dataset(name, data=arr.astype(object), dtype=STR)
            else:
                # uncompressed: lzf saved 3% on FER-2013 faces and costs read time in every epoch
                f.create_dataset(name, data=arr)
        for key, value in (attrs or {}).items():
            f.attrs[key] = value if isinstance(value, (int, float, str, bool, np.generic)) else json.dumps(value)


def read_h5(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """Read whole datasets into memory (str datasets as numpy str arrays)."""
    settle(path)
    out = {}
    with h5py.File(path, "r") as f:
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
