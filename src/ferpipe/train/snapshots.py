"""Snapshots of training runs: every N epochs a fit's whole state goes to a file, and a stopped run resumes there.

A stage run's snapshots live in ``.ferpipe/snapshots/<stage>/<run-id>/<fit>.pt`` (``RunSnapshots``): beside the
stage's DVC outputs, never inside one (DVC deletes those before a run). The run-id hashes what the stage says
determines its results (params but the reporting ones, the identity of its input files) and the ferpipe sources;
each file also holds a key of its own fit (``snapshot_key``: settings, rows, model shapes, process count), so
only the very same fit resumes. ``save_snapshot`` writes model, optimizer, scaler, plateau, step, the shuffling
generator and every process's RNG states (``rng_states``); ``read_snapshot`` returns a matching one or None.
``ferpipe.train.loop.fit`` uses them; ``rt`` arguments are its ``Runtime``.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

# settings that change no weight, history or plot: left out of a snapshot's key (FitConfig fields, and the
# train stage's memory_gb: streamed batches are the in-memory ones, bit for bit)
REPORTING = ("progress", "log_every", "snapshot_every", "memory_gb")

SNAPSHOTS = Path(".ferpipe/snapshots")  # beside the stages' outputs, never inside one: DVC deletes those before a run


def note(msg: str) -> None:
    """A line about the run's state (resumed, fresh start) on stderr: stdout keeps the results' lines."""
    print(msg, file=sys.stderr, flush=True)


def file_identity(path: str | os.PathLike | None) -> dict | None:
    """What stands for a data file in a run-id: its absolute path, size and modification time (cheap for
    arrays of gigabytes; a rewritten or checked-out file counts as other data: a fresh start, never a mix)."""
    if not path:
        return None
    p = Path(path).resolve()
    if not p.is_file():
        return {"path": str(p)}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def code_identity() -> str:
    """sha256 of the ferpipe package's Python sources: a snapshot never resumes under other code."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


class RunSnapshots:
    """The snapshots of one stage run: ``<root>/<run-id>/<name>.pt``, one per fit (fold0, ..., final).

    The run-id is a hash of `identity` (what the stage says determines its results: its params but the
    reporting ones, the identity of its input files) and of the ferpipe sources. A run finds the
    snapshots of an earlier run with the same run-id (killed, or failed after some folds) and resumes;
    snapshots of any other run-id are removed, saying so in one line. `every` is the params'
    snapshot_every (0: nothing is read or written). Only the main process removes anything; ``clear``
    (after the stage's outputs are written) removes this run's folder.
    """

    def __init__(self, root: str | os.PathLike, identity: dict, every: int, main: bool = True):
        if int(every) < 0:
            raise ValueError(f"snapshot_every must be >= 0 epochs (0 = none), got {every}")
        self.root, self.every, self.main = Path(root), int(every), main
        self.folder = self.root / _digest({**identity, "code": code_identity()})[:16]
        if not (main and self.every and self.root.is_dir()):
            return
        others = sorted(p for p in self.root.iterdir() if p != self.folder)
        for p in others:
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        if others:
            note(f"{self.root}: snapshots of another run (other params, data or code) removed: "
                  f"this run starts from epoch 1")
        found = sorted(p.stem for p in self.folder.glob("*.pt"))
        if found:
            note(f"{self.folder}: resuming a stopped run with the same params, data and code "
                  f"(snapshots of {', '.join(found)})")

    def path(self, name: str) -> Path | None:
        """The snapshot file of fit `name` (None: snapshots are off)."""
        return self.folder / f"{name}.pt" if self.every else None

    def clear(self) -> None:
        if self.main:
            shutil.rmtree(self.folder, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.root.rmdir()  # when empty


def _plain(obj) -> dict | None:
    """An objective's or augmentation's settings for a snapshot key (tensors as lists, generators left out)."""
    if obj is None:
        return None
    return {"type": type(obj).__name__, **{k: v.tolist() if isinstance(v, torch.Tensor) else v
                                          for k, v in vars(obj).items() if not isinstance(v, torch.Generator)}}


def snapshot_key(settings: dict, net: nn.Module, train_rows, val_rows, world: int, objective, augment) -> str:
    """What a snapshot must match to be resumed: the settings (not the reporting ones), the rows, the
    model's tensors' names and shapes, the process count, the objective and augmentation settings."""
    settings = {k: v for k, v in settings.items() if k not in REPORTING}
    shapes = [(k, list(v.shape), str(v.dtype)) for k, v in net.state_dict().items()]
    rows = [None if r is None else hashlib.sha256(r.cpu().numpy().tobytes()).hexdigest() for r in (train_rows, val_rows)]
    return _digest([settings, shapes, rows, world, _plain(objective), _plain(augment)])


def rng_states(rt, augment) -> list[dict]:
    """The random states the next epoch draws from, of every process (a collective call under DDP):
    torch's global CPU (and this device's CUDA) generator and the augmentation's own."""
    gen = getattr(augment, "generator", None)
    mine = {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(rt.device) if rt.device.type == "cuda" else None,
            "augment": gen.get_state() if gen is not None else None}
    if not rt.distributed:
        return [mine]
    states = [None] * rt.world
    dist.all_gather_object(states, mine)
    return states


def set_rng_state(state: dict, device: torch.device, augment) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    gen = getattr(augment, "generator", None)
    if gen is not None and state["augment"] is not None:
        gen.set_state(state["augment"])


def _write_snapshot(path: Path, payload: dict) -> None:
    """torch.save to a temp file beside `path`, then os.replace: a kill leaves the previous snapshot."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(buf.getvalue())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_snapshot(path: Path, key: str, desc: str, main: bool = True) -> dict | None:
    """The snapshot at `path` when it is one of this fit (its key); else None (and a line saying why)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # a snapshot of another torch or ferpipe version: start again, say so
        state = {"unreadable": f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"}
    if isinstance(state, dict) and state.get("key") == key:
        return state
    if main:
        why = (f"unreadable ({state['unreadable']})" if isinstance(state, dict) and "unreadable" in state
               else "of another fit (settings, rows, model or process count)")
        note(f"{desc}: snapshot {path} is {why}: this fit starts from epoch 1")
    return None



def save_snapshot(path: Path, key: str, epoch: int, done: bool, result: dict, plots: dict, rt, augment,
                  net: nn.Module, optimizer, scaler, plateau, step: int, order: torch.Generator) -> None:
    """The state after `epoch` (every process calls it: the RNG states are gathered; the main one writes).
    A finished fit's (`done`) keeps only its result and plots: nothing more trains from it."""
    payload = {"key": key, "epoch": epoch, "done": done,
               "result": result,
               "plots": {e: torch.frombuffer(bytearray(png), dtype=torch.uint8) for e, png in plots.items()}}
    if not done:
        payload.update(rng=rng_states(rt, augment), step=step, order=order.get_state(),
                       model={k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()},
                       optimizer=optimizer.state_dict(), scaler=scaler.state_dict() if scaler is not None else None,
                       plateau=[plateau.scale, plateau.best, plateau.bad] if plateau is not None else None)
    if rt.is_main:
        _write_snapshot(path, payload)
