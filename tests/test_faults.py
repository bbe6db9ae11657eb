"""Faults and bad input (issue 10): nothing lost, nothing silently wrong.

Every stage runs here as a user runs it (`python stages/<stage>.py ...` in a subprocess) on small
real slices of ../shared/data, with FERPIPE_FAULT (ferpipe.store) killing it (SIGKILL) or failing a
write (ENOSPC) at named points of its output set: enter (set opened, nothing written), staged@n
(n outputs written to staging), decide (all staged, just before the commit decision), renamed@n (n
targets replaced), done (committed). After each fault the outputs must be exactly the old set or
exactly the new one (after `settle`, which the next run or reader does), no temp file may be left,
and a rerun must match a clean run byte for byte. Real write failures too: a tiny tmpfs (ENOSPC)
and RLIMIT_FSIZE (EFBIG). Then two writers at once, and one test per bad input.
"""
from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from conftest import REPO, SHARED_DATA
from ferpipe.data.decode import ImageError, decode_image
from ferpipe.data.readers import read_dataset
from ferpipe.evaluate.run import select_checkpoints
from ferpipe.store import read_h5, settle

FER = SHARED_DATA / "fer2013"
CK = SHARED_DATA / "sequences"
CLASSES = ("happy", "neutral", "sad")

pytestmark = pytest.mark.skipif(not (FER / "train").is_dir() or not (CK / "labels.csv").is_file(),
                                reason=f"real data not found under {SHARED_DATA}")


# ------------------------------------------------------------------------------------------------
# helpers

def stage(name: str, *args, fault: str | None = None, check: bool = True, preexec=None, wait: bool = True):
    """Run stages/<name>.py with this checkout's code; FERPIPE_FAULT=fault when given."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    env.pop("FERPIPE_FAULT", None)
    if fault:
        env["FERPIPE_FAULT"] = fault
    cmd = [sys.executable, str(REPO / "stages" / f"{name}.py"), *map(str, args)]
    if not wait:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=preexec, timeout=900)
    if check and res.returncode != 0:
        raise AssertionError(f"{name} {args} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return res


def snap(paths, skip_dirs=("dvclive",)) -> dict:
    """{path: bytes | {file: bytes} | None}; dvclive folders by file name only (their tsv rows hold
    wall-clock timestamps)."""
    out = {}
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file())
            out[str(p)] = {str(f.relative_to(p)): (None if p.name in skip_dirs or p.parent.name in skip_dirs
                                                   else f.read_bytes()) for f in files}
        else:
            out[str(p)] = p.read_bytes() if p.exists() else None
    return out


def strays(paths) -> list[str]:
    """Temp, staging and journal files left in the folders of these outputs."""
    dirs = {Path(p).parent for p in paths}
    return sorted(f"{d}/{n}" for d in dirs if d.is_dir() for n in os.listdir(d) if n.startswith("."))


def settle_all(paths) -> None:
    for p in paths:
        settle(p)


def has_commit_journal(paths) -> bool:
    return any(n.endswith(".commit") for d in {Path(p).parent for p in paths} if d.is_dir() for n in os.listdir(d))


def fer_slice(dst: Path, per_class: int, offset: int = 0, test_per_class: int | None = None) -> Path:
    """Real FER-2013 images: per_class train and test_per_class test images of three classes."""
    for split, n in (("train", per_class), ("test", test_per_class or max(2, per_class // 2))):
        for cls in CLASSES:
            files = sorted((FER / split / cls).iterdir())[offset:offset + n]
            (dst / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                shutil.copy(f, dst / split / cls / f.name)
    return dst


def ck_slice(dst: Path, n: int = 8) -> Path:
    """Real CK+ sequences: the first n sequence folders and their labels.csv rows."""
    labels = pd.read_csv(CK / "labels.csv", dtype=str)
    have = sorted(p.name for p in (CK / "frames").iterdir())
    # two sequences per subject where possible, several subjects (folds are subject-independent)
    keep, per_subject = [], {}
    for s in have:
        subj = s.split("_")[0]
        if per_subject.get(subj, 0) < 2 and s in set(labels["sequence_id"]):
            keep.append(s)
            per_subject[subj] = per_subject.get(subj, 0) + 1
        if len(keep) == n:
            break
    for s in keep:
        shutil.copytree(CK / "frames" / s, dst / "frames" / s)
    labels[labels["sequence_id"].isin(keep)].to_csv(dst / "labels.csv", index=False)
    return dst


def ingest_outs(root: Path) -> list[Path]:
    return [root / "data/images.h5", root / "data/manifest.csv", root / "data/rejects.csv",
            root / "metrics/ingest.json", root / "plots/ingest.png"]


def ingest_args(ds: Path, root: Path, fmt: str = "folder") -> list:
    o = ingest_outs(root)
    return ["-S", f"dataset.format={fmt}", "-S", f"dataset.path={ds}", "--out", o[0], "--manifest", o[1], "--rejects",
            o[2], "--metrics", o[3], "--sheet", o[4], "-S", "ingest.workers=1", "--quiet"]


@pytest.fixture(scope="module")
def fer_ab(tmp_path_factory) -> Path:
    """Two different real slices: A (the old set) and B (the new set)."""
    root = tmp_path_factory.mktemp("fer_ab")
    fer_slice(root / "A", 4)
    fer_slice(root / "B", 6, offset=20)
    return root


# ------------------------------------------------------------------------------------------------
# the output set itself (in process)

def test_output_set_is_all_or_nothing(tmp_path):
    from ferpipe.store import output_set, staged, write_json, write_text

    a, b, models = tmp_path / "m/a.json", tmp_path / "p/b.txt", tmp_path / "models"
    with output_set([a, b], dirs=[models]):
        write_json(a, {"v": 1})
        write_text(b, "one")
        write_text(models / "fold0.pt", "w0")
        write_text(models / "fold1.pt", "w1")
        assert not a.exists() and staged(a) != a  # nothing visible before the block ends
    old = snap([a, b, models])
    with pytest.raises(RuntimeError):  # an exception: the old set stays, staging is gone
        with output_set([a, b], dirs=[models]):
            write_json(a, {"v": 2})
            write_text(models / "fold0.pt", "new")
            raise RuntimeError("boom")
    assert snap([a, b, models]) == old and strays([a, b, models]) == []
    with pytest.raises(ValueError, match="does not declare it"):  # a write the set does not declare
        with output_set([a]):
            write_json(tmp_path / "m/other.json", {})
    assert snap([a, b, models]) == old
    with output_set([a, b], dirs=[models]):  # a declared file not written is not part of the new set
        write_json(a, {"v": 3})
        write_text(models / "fold0.pt", "only")
        with output_set([models / "final.pt"]):  # nested: commits into the outer staging
            write_text(models / "final.pt", "f")
        assert not (models / "final.pt").exists()
    assert not b.exists() and sorted(p.name for p in models.iterdir()) == ["final.pt", "fold0.pt"]
    with pytest.raises(OSError):  # a failing run creates no folders
        with output_set([tmp_path / "new/deep/x.json"]):
            raise OSError("disk")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# ingest: kill -9 / ENOSPC at every point of the commit

# (fault, the set expected afterwards): before the decision the old set stays, after it the next
# reader or run completes the new one
INGEST_FAULTS = [("enter:kill", "old"), ("staged@1:kill", "old"), ("staged@3:kill", "old"), ("decide:kill", "old"),
                 ("renamed@1:kill", "new"), ("renamed@3:kill", "new"), ("done:kill", "new"),
                 ("staged@2:enospc", "old"), ("decide:enospc", "old"), ("renamed@2:enospc", "new")]


def test_ingest_killed_or_out_of_space_at_every_point(fer_ab, tmp_path):
    root = tmp_path / "run"
    outs = ingest_outs(root)
    ref = tmp_path / "ref"
    stage("ingest", *ingest_args(fer_ab / "B", ref))
    stage("ingest", *ingest_args(fer_ab / "A", root))
    old = snap(outs)
    new = {str(p): v for p, v in zip(outs, snap(ingest_outs(ref)).values())}  # same bytes, other folder
    assert old != new
    for fault, expect in INGEST_FAULTS:
        res = stage("ingest", *ingest_args(fer_ab / "B", root), fault=fault, check=False)
        assert res.returncode == (-signal.SIGKILL if fault.endswith("kill") else 1), (fault, res.stderr[-500:])
        raw = snap(outs)
        assert raw in (old, new) or has_commit_journal(outs), f"{fault}: a mix with no journal to complete it"
        settle_all(outs)  # what the next run (or read_h5) does first
        assert snap(outs) == (old if expect == "old" else new), fault
        assert strays(outs) == [], fault
        if fault.endswith("enospc"):
            assert "No space left on device" in res.stderr and "Traceback" not in res.stderr.splitlines()[-1]
        stage("ingest", *ingest_args(fer_ab / "B", root))  # a rerun after the fault == a clean run
        assert snap(outs) == new, fault
        stage("ingest", *ingest_args(fer_ab / "A", root))  # back to the old set for the next fault
        assert snap(outs) == old, fault


def test_killed_or_out_of_space_between_blocks_keeps_the_old_set(fer_ab, tmp_path):
    """The block writer (store.h5_writer, fault point `block`): ingest appends one block per decoded chunk
    (4 blocks of slice B here), gray48 one per 64 MiB of rows. A kill or ENOSPC after some blocks leaves a
    partial staged file, never a partial output: the old set stays, and the next reader removes the file."""
    root = tmp_path / "run"
    outs = ingest_outs(root)
    gray = [root / "gray/images.h5", root / "plots/gray48.png"]
    gray_args = ["--images", outs[0], "--out", gray[0], "--sheet", gray[1]]
    stage("ingest", *ingest_args(fer_ab / "A", root))
    stage("gray48", *gray_args, "-S", "gray48.size=40")
    for name, args, fault in [("ingest", ingest_args(fer_ab / "B", root), "block@2:kill"),
                              ("ingest", ingest_args(fer_ab / "B", root), "block@3:enospc"),
                              ("gray48", [*gray_args, "-S", "gray48.size=48"], "block@1:kill"),
                              ("gray48", [*gray_args, "-S", "gray48.size=48"], "block@1:enospc")]:
        files = outs if name == "ingest" else gray
        old = snap(files)
        res = stage(name, *args, fault=fault, check=False)
        assert res.returncode == (-signal.SIGKILL if fault.endswith("kill") else 1), (fault, res.stderr[-500:])
        if fault.endswith("kill"):  # died mid-file: its partial staged HDF5 is there until settled
            assert any(".images.h5.ferpipe-" in f for f in strays(files)), fault
        else:
            assert "injected at block@" in res.stderr and "Traceback" not in res.stderr.splitlines()[-1]
        assert snap(files) == old, fault
        settle_all(files)
        assert snap(files) == old and strays(files) == [], fault


def test_ingest_stray_temps_of_a_killed_run_are_removed(fer_ab, tmp_path):
    root = tmp_path / "run"
    outs = ingest_outs(root)
    stage("ingest", *ingest_args(fer_ab / "A", root))
    old = snap(outs)
    stage("ingest", *ingest_args(fer_ab / "B", root), fault="staged@4:kill", check=False)
    # and a temp file of the atomic writes before output sets (tempfile.mkstemp naming)
    (root / "data" / ".images.h5.k2j_9x0q.tmp").write_bytes(b"partial")
    assert len(strays(outs)) > 4
    stage("ingest", *ingest_args(fer_ab / "A", root))
    assert snap(outs) == old and strays(outs) == []


def test_ingest_on_a_full_disk_keeps_the_old_set(fer_ab, tmp_path):
    """A real ENOSPC: the outputs on a tmpfs too small for the new set beside the old one."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        fer_slice(tmp_path / "big", 40, offset=100)
        outs = ingest_outs(mnt)
        stage("ingest", *ingest_args(fer_ab / "A", mnt))
        old = snap(outs)
        res = stage("ingest", *ingest_args(tmp_path / "big", mnt), "-S", "ingest.size=96", check=False)
        assert res.returncode == 1 and "No space left on device" in res.stderr
        assert snap(outs) == old and strays(outs) == []
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


def test_ingest_write_failure_inside_hdf5_keeps_the_old_set(fer_ab, tmp_path):
    """A real write failure in C code (h5py), mid-file: RLIMIT_FSIZE makes writes past 64 kB fail."""
    root = tmp_path / "run"
    outs = ingest_outs(root)
    stage("ingest", *ingest_args(fer_ab / "A", root), "-S", "ingest.size=24")
    old = snap(outs)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    res = stage("ingest", *ingest_args(fer_ab / "B", root), "-S", "ingest.size=96", check=False, preexec=limit)
    assert res.returncode != 0 and ("File too large" in res.stderr or "Errno 27" in res.stderr), res.stderr[-800:]
    assert snap(outs) == old and strays(outs) == []


def test_two_ingests_into_one_output_never_mix(fer_ab, tmp_path):
    """Run A holds its staging while run B starts, stages and commits; A then commits: the result is
    A's complete set (B must not have removed A's live staging, and the two commits must not interleave)."""
    root = tmp_path / "run"
    outs = ingest_outs(root)
    refs = {}
    for name in ("A", "B"):
        stage("ingest", *ingest_args(fer_ab / name, tmp_path / f"ref{name}"))
        refs[name] = list(snap(ingest_outs(tmp_path / f"ref{name}")).values())
    a = stage("ingest", *ingest_args(fer_ab / "A", root), fault="staged@1:sleep4", wait=False)
    staged_file = lambda: (root / "data").is_dir() and any(".images.h5.ferpipe-" in n for n in os.listdir(root / "data"))  # noqa: E731
    deadline = time.time() + 120
    while not staged_file():
        assert time.time() < deadline and a.poll() is None, "run A did not start"
        time.sleep(0.05)
    stage("ingest", *ingest_args(fer_ab / "B", root))  # runs while A is staged, holding its set open
    assert list(snap(outs).values()) == refs["B"]
    assert a.wait(timeout=300) == 0, a.stderr.read()
    assert list(snap(outs).values()) == refs["A"] and strays(outs) == []
    # the other order, commits overlapping: A sleeps mid-commit holding the folder locks; B waits
    a = stage("ingest", *ingest_args(fer_ab / "A", root), fault="renamed@1:sleep3", wait=False)
    while not any(n.endswith(".commit") for n in os.listdir(root / "data")):
        assert a.poll() is None, a.stderr.read()
        time.sleep(0.02)
    stage("ingest", *ingest_args(fer_ab / "B", root))
    assert a.wait(timeout=300) == 0
    assert list(snap(outs).values()) == refs["B"] and strays(outs) == []


# ------------------------------------------------------------------------------------------------
# a small real pipeline for the other stages

@pytest.fixture(scope="module")
def pipe(tmp_path_factory) -> Path:
    """ingest -> gray48 -> landmarks -> guide soft -> split -> train (baseline, 2 folds, 1 epoch), and
    CK+ sequences ingest -> gray48 -> features (images), all on real slices."""
    p = tmp_path_factory.mktemp("pipe")
    fer_slice(p / "fer", 8, offset=40, test_per_class=4)
    stage("ingest", "-S", "dataset.format=folder", "-S", f"dataset.path={p / 'fer'}", "--out", p / "ingest/images.h5",
          "--manifest", p / "ingest/manifest.csv", "--rejects", p / "ingest/rejects.csv", "--metrics",
          p / "metrics/ingest.json", "--sheet", "", "-S", "ingest.workers=1", "--quiet")
    stage("gray48", "--images", p / "ingest/images.h5", "--out", p / "gray48/images.h5", "--sheet", "")
    stage("landmarks", "--images", p / "ingest/images.h5", "--out", p / "landmarks/landmarks.h5", "--metrics", "",
          "--sheet", "", "-S", "landmarks.passes=[dlib, dlib_equalized]", "-S", "landmarks.workers=1")
    stage("guide", "soft", "--images", p / "gray48/images.h5", "--landmarks", p / "landmarks/landmarks.h5",
          "--out", p / "guides/soft.h5", "--sheet", "")
    stage("split", "--manifest", p / "ingest/manifest.csv", "--out", p / "split/split.csv", "--summary",
          p / "metrics/split.json", "-S", "split.folds=2")
    stage("train", *train_args(p, p / "models", p / "metrics/train.json", p / "dvclive/train", "train.max_epochs=1"))
    ck_slice(p / "ck", n=10)
    stage("ingest", "-S", "dataset.format=ck_sequences", "-S", f"dataset.path={p / 'ck'}", "--out",
          p / "seq/ingest/images.h5", "--manifest", p / "seq/ingest/manifest.csv", "--rejects",
          p / "seq/ingest/rejects.csv", "--metrics", p / "metrics/ingest_seq.json", "--sheet", "", "-S",
          "ingest.workers=1", "--quiet")
    stage("gray48", "--images", p / "seq/ingest/images.h5", "--out", p / "seq/gray48/images.h5", "--sheet", "")
    stage("features", "--params", p / "none.yaml", "-S", "sequence.features.mode=images", "--images",
          p / "seq/gray48/images.h5",
          "--manifest", p / "seq/ingest/manifest.csv", "--out", p / "seq/features.h5", "--metrics", "")
    return p


def train_args(p: Path, models: Path, metrics: Path, live: Path, *settings: str) -> list:
    """Baseline on the slice's two folds, 1 thread; `settings` are more -S overrides (the last wins)."""
    sets = ("model=baseline", "train.folds=[0,1]", "train.threads=1", "train.patience=0", "train.device=cpu",
            "train.batch_size=16", *settings)
    return ["--split", p / "split/split.csv", "--gray48", p / "gray48/images.h5", "--guides", p / "guides",
            "--models", models, "--metrics", metrics, "--live", live, "--curves", "",  # not the repository's
            *[x for s in sets for x in ("-S", s)]]


def test_train_failed_or_killed_keeps_the_old_models(pipe, tmp_path):
    """The data-loss bug: train emptied models/ first. Now a failed (init_from missing) or killed run
    leaves models/, train.json and the curves exactly as they were, and evaluate scores that set."""
    outs = [tmp_path / "models", tmp_path / "metrics/train.json", tmp_path / "dvclive/train"]
    old_args, new_args = train_args(pipe, *outs, "train.max_epochs=1"), train_args(pipe, *outs, "train.max_epochs=2")
    stage("train", *new_args)
    new = snap(outs)
    stage("train", *old_args)
    old = snap(outs)
    assert old != new and sorted(old[str(outs[0])]) == ["fold0.pt", "fold1.pt"]
    res = stage("train", *new_args, "-S", "train.init_from=missing.pt", check=False)
    assert res.returncode != 0 and "missing.pt" in res.stderr
    assert snap(outs) == old and strays(outs) == []
    for fault in ("enter:kill", "staged@1:kill"):  # killed mid-training / after fold 0 was written
        stage("train", *new_args, fault=fault, check=False)
        assert snap(outs) == old, fault
        settle_all(outs)
        assert snap(outs) == old and strays(outs) == [], fault
    kind, paths = select_checkpoints(outs[0])
    assert kind == "folds" and [p.name for p in paths] == ["fold0.pt", "fold1.pt"]
    # killed after train.json and models/ were swapped in (renamed@2), before dvclive: completed by
    # the next reader; then a clean rerun gives the same bytes
    stage("train", *new_args, fault="renamed@2:kill", check=False)
    settle_all(outs)
    assert snap(outs) == new and strays(outs) == []  # byte for byte the clean run's set
    # a run with fewer folds replaces the folder whole: no fold1.pt of the earlier run survives
    stage("train", *train_args(pipe, *outs, "train.max_epochs=1", "train.folds=[0]"))
    assert sorted(p.name for p in outs[0].iterdir()) == ["fold0.pt"]


def test_evaluate_ignores_stray_checkpoint_names(pipe, tmp_path, capsys):
    models = tmp_path / "models"
    shutil.copytree(pipe / "models", models)
    shutil.copy(models / "fold0.pt", models / "fold_old.pt")
    kind, paths = select_checkpoints(models)
    assert [p.name for p in paths] == ["fold0.pt", "fold1.pt"]
    assert "fold_old.pt is not a train stage checkpoint name" in capsys.readouterr().out


def _cases(p: Path, t: Path) -> dict:
    """stage -> (outputs, args, old extra args, new extra args)."""
    ev = [t / "metrics/eval.json", t / "plots/predictions.csv", t / "plots/confusion.png", t / "plots/errors.png",
          t / "metrics/results.json"]
    ts = [t / "seq/model.pt", t / "metrics/sequence.json", t / "plots/seq/confusion.png", t / "seq/predictions.csv",
          t / "dvclive/sequence", t / "metrics/sequence_results.json"]
    return {
        "gray48": ([t / "gray48/images.h5", t / "plots/gray48.png"],
                   ["--images", p / "ingest/images.h5", "--out", t / "gray48/images.h5", "--sheet", t / "plots/gray48.png"],
                   ["-S", "gray48.size=40"], ["-S", "gray48.size=48"]),
        "landmarks": ([t / "lm/landmarks.h5", t / "metrics/landmarks.json", t / "plots/landmarks.png"],
                      ["--images", p / "ingest/images.h5", "--out", t / "lm/landmarks.h5", "--metrics",
                       t / "metrics/landmarks.json", "--sheet", t / "plots/landmarks.png", "-S",
                       "landmarks.passes=[dlib, dlib_equalized]", "-S", "landmarks.workers=1"],
                      ["-S", "landmarks.size=80"], ["-S", "landmarks.size=96"]),
        "guide": ([t / "guides/soft.h5", t / "plots/soft.png"],
                  ["soft", "--images", p / "gray48/images.h5", "--landmarks", p / "landmarks/landmarks.h5",
                   "--out", t / "guides/soft.h5", "--sheet", t / "plots/soft.png"], ["-S", "guides.soft.threshold=60"], []),
        "split": ([t / "split/split.csv", t / "metrics/split.json"],
                  ["--manifest", p / "ingest/manifest.csv", "--out", t / "split/split.csv", "--summary",
                   t / "metrics/split.json"], ["-S", "split.folds=3"], ["-S", "split.folds=2"]),
        "evaluate": (ev, ["--models", p / "models", "--split", p / "split/split.csv", "--gray48", p / "gray48/images.h5",
                          "--guides", p / "guides", "--metrics", ev[0], "--predictions", ev[1], "--confusion", ev[2],
                          "--errors", ev[3], "--results", ev[4], "--train-metrics", p / "metrics/train.json",
                          "-S", "evaluate.device=cpu", "-S", "evaluate.threads=1"], ["-S", "evaluate.tta=1"],
                     ["-S", "evaluate.tta=0"]),
        "features": ([t / "seq/features.h5", t / "metrics/features.json"],
                     ["--params", p / "none.yaml", "-S", "sequence.features.mode=images", "--images",
                      p / "seq/gray48/images.h5",
                      "--manifest", p / "seq/ingest/manifest.csv", "--out", t / "seq/features.h5", "--metrics",
                      t / "metrics/features.json"], ["-S", "sequence.features.size=24"],
                     ["-S", "sequence.features.size=32"]),
        "train_sequence": (ts, ["--params", p / "none.yaml", "--features", p / "seq/features.h5", "--model-out", ts[0],
                                "--metrics", ts[1], "--plots", ts[2].parent, "--predictions", ts[3], "--live", ts[4], "--results", ts[5],
                                "-S", "sequence.model=lstm", "-S", "sequence.lstm.hidden=8", "-S", "sequence.folds=3",
                                "-S", "sequence.train.threads=1", "-S", "sequence.train.patience=3"],
                           ["-S", "sequence.train.epochs=2"], ["-S", "sequence.train.epochs=3"]),
        "demo": ([t / "demo", t / "metrics/demo.json"],
                 ["--out", t / "demo", "--metrics", t / "metrics/demo.json", "-S", "demo.train_per_class=1",
                  "-S", "demo.test_per_class=1", "-S", "demo.size=48"], ["-S", "demo.seed=1"], ["-S", "demo.seed=2"]),
    }


@pytest.mark.parametrize("name", ["gray48", "landmarks", "guide", "split", "evaluate", "features", "train_sequence",
                                  "demo"])
def test_stage_killed_before_and_during_its_commit(pipe, tmp_path, name):
    """Each stage: killed after writing its first output to staging -> exactly the old set; killed
    after replacing its first output -> exactly the new set once settled, byte for byte a clean run."""
    outs, args, old_args, new_args = _cases(pipe, tmp_path)[name]
    stage(name, *args, *new_args)
    new = snap(outs)
    stage(name, *args, *old_args)
    old = snap(outs)
    assert old != new
    stage(name, *args, *new_args, fault="staged@1:kill", check=False)
    assert snap(outs) == old
    settle_all(outs)
    assert snap(outs) == old and strays(outs) == []
    stage(name, *args, *new_args, fault="renamed@1:kill", check=False)
    assert has_commit_journal(outs) or snap(outs) == new
    settle_all(outs)
    assert snap(outs) == new and strays(outs) == []


# ------------------------------------------------------------------------------------------------
# landmarks workers die with the stage

def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
                cmd = Path(f"/proc/{d}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
                out.append(int(d))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_landmarks_workers_die_with_a_killed_stage(pipe, tmp_path):
    big = tmp_path / "big.h5"
    from ferpipe.store import write_h5
    imgs = read_h5(pipe / "ingest/images.h5")
    write_h5(big, {"images": np.concatenate([imgs["images"]] * 30), "ids": np.arange(30 * len(imgs["ids"])).astype(str)})
    proc = stage("landmarks", "--images", big, "--out", tmp_path / "lm.h5", "--metrics", "", "--sheet", "",
                 "-S", "landmarks.passes=[dlib, dlib_equalized, dlib_padded]", "-S", "landmarks.workers=2", "-S",
                 "landmarks.size=160", wait=False)
    deadline = time.time() + 300
    while len(_children(proc.pid)) < 2:
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
        time.sleep(0.1)
    workers = _children(proc.pid)
    time.sleep(3)  # let them take a chunk each (models built, detection running)
    assert proc.poll() is None, "the run finished before it could be killed: make the input bigger"
    proc.kill()
    proc.wait()
    t0 = time.time()
    while any(_alive(w) for w in workers) and time.time() - t0 < 10:
        time.sleep(0.05)
    assert not any(_alive(w) for w in workers), "landmarks workers outlived the killed stage"
    assert time.time() - t0 < 2
    assert not (tmp_path / "lm.h5").exists()


# ------------------------------------------------------------------------------------------------
# bad input: one bad row never sinks a run, and each is a rejects row with its reason

def ingest_dir(ds: Path, tmp_path: Path, *extra, fmt="folder") -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    out = tmp_path / "out"
    stage("ingest", *ingest_args(ds, out, fmt), *extra)
    man = pd.read_csv(out / "data/manifest.csv", keep_default_na=False)
    rej = pd.read_csv(out / "data/rejects.csv", keep_default_na=False)
    return man, rej, read_h5(out / "data/images.h5")


def test_non_utf8_file_name_is_a_reject(tmp_path):
    ds = fer_slice(tmp_path / "ds", 2)
    n_good = len(list(ds.glob("*/*/*.png")))
    good = next((ds / "train/happy").iterdir())
    bad = os.path.join(os.fsencode(ds / "train/happy"), b"caf\xe9.png")
    shutil.copy(good, bad)
    man, rej, h5 = ingest_dir(ds, tmp_path)
    assert len(man) == len(h5["ids"]) == n_good  # every good image kept
    row = rej[rej["reason"] == "file name is not valid UTF-8"]
    assert len(row) == 1 and row["source"].iloc[0].endswith("train/happy/caf\\xe9.png")


def test_self_referencing_symlink_is_a_reject(tmp_path):
    ds = fer_slice(tmp_path / "ds", 2)
    n_good = len(list(ds.glob("*/*/*.png")))
    os.symlink("loop.png", ds / "train/sad/loop.png")
    os.symlink("loopdir", ds / "train/loopdir")
    man, rej, _ = ingest_dir(ds, tmp_path)
    assert len(man) == n_good
    reasons = dict(zip(rej["source"].str.rsplit("/", n=1).str[-1], rej["reason"]))
    assert reasons["loop.png"] == "cannot read: Too many levels of symbolic links"
    assert reasons["loopdir"] == "cannot read: Too many levels of symbolic links"


def _listfile(tmp_path: Path, lines: list[str], frames=()) -> Path:
    src = sorted((FER / "train/happy").iterdir())
    for i, name in enumerate(frames):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src[i], tmp_path / name)
    path = tmp_path / "list.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_listfile_inf_label_and_seq_number_are_rejects(tmp_path):
    lst = _listfile(tmp_path, ["a0.png 1 0", "a1.png inf 0", "a2.png 1 inf", "a3.png 1 -inf", "a4.png 1 0"],
                    [f"a{i}.png" for i in range(5)])
    man, rej, _ = ingest_dir(lst, tmp_path, fmt="listfile")
    assert man["id"].tolist() == ["a0.png", "a4.png"]
    assert rej["line"].tolist() == [2, 3, 4]
    assert rej["reason"].tolist() == ["label 'inf' is not a finite number", "seq_number 'inf' is not a finite number",
                                      "seq_number '-inf' is not a finite number"]


def test_affectnet_face_box_1e20_is_a_reject(tmp_path):
    src = sorted((FER / "train/happy").iterdir())[:2]
    (tmp_path / "img").mkdir()
    for f in src:
        shutil.copy(f, tmp_path / "img" / f.name)
    csv = tmp_path / "training.csv"
    csv.write_text("subDirectory_filePath,face_x,face_y,face_width,face_height,expression,valence,arousal\n"
                   f"img/{src[0].name},0,0,48,48,1,0.5,0.1\n"
                   f"img/{src[1].name},1e20,0,48,48,1,0.5,0.1\n")
    man, rej, _ = ingest_dir(csv, tmp_path, fmt="affectnet")
    assert man["id"].tolist() == [f"img/{src[0].name}"]
    assert rej["line"].tolist() == [3] and "out of range" in rej["reason"].iloc[0]


def test_structural_error_is_one_line_and_bad_sizes_are_usage_errors(tmp_path):
    res = stage("ingest", *ingest_args(tmp_path / "absent", tmp_path / "out"), check=False)
    assert res.returncode == 1 and res.stderr.strip().splitlines() == [
        f"ingest.py: error: {tmp_path / 'absent'}: folder not found (--debug for the traceback)"]
    ds = fer_slice(tmp_path / "ds", 2)
    for size in ("0", "-5"):
        res = stage("ingest", *ingest_args(ds, tmp_path / "out"), "-S", f"ingest.size={size}", check=False)
        assert res.returncode == 2 and f"ingest.size must be a whole number >= 1, got {size}" in res.stderr
    assert not (tmp_path / "out").exists()


def test_listfile_sort_is_natural_by_frame_number(tmp_path):
    names = ["s/frame1.png", "s/frame2.png", "s/frame10.png", "s/frame11.png"]
    # written scrambled: sort=true orders them 1, 2, 10, 11 (not 1, 10, 11, 2)
    lst = _listfile(tmp_path, [f"{n} 3 0" for n in (names[3], names[0], names[2], names[1])], names)
    man, rej = read_dataset("listfile", lst, sort=True)
    assert man["id"].tolist() == names and man["frame_index"].tolist() == [0, 1, 2, 3] and rej.empty
    # an already ordered file keeps its order
    lst.write_text("".join(f"{n} 3 0\n" for n in names))
    man, _ = read_dataset("listfile", lst, sort=True)
    assert man["id"].tolist() == names


def test_listfile_unordered_frames_and_disagreeing_labels_are_rejected(tmp_path):
    names = [f"s{s}/f{i}.png" for s in (1, 2, 3) for i in (1, 2, 3)]
    lst = _listfile(tmp_path, [
        "s1/f1.png 3 0", "s1/f3.png 3 0", "s1/f2.png 3 0",   # out of order
        "s2/f1.png 3 1", "s2/f2.png 4 1", "s2/f3.png 3 1",   # labels disagree
        "s3/f1.png 5 2", "s3/f2.png 5 2", "s3/f3.png 5 2",   # fine
    ], names)
    man, rej = read_dataset("listfile", lst)
    assert man["sequence_id"].unique().tolist() == ["2"]
    reasons = dict(zip(rej["line"], rej["reason"]))
    assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
    assert reasons[3].startswith("frames of sequence 0 out of order: frame 2 (line 3) comes after frame 3 (line 2)")
    assert reasons[4].startswith("labels disagree within sequence 1: 3 (line 4), 4 (line 5)")
    man, _ = read_dataset("listfile", lst, per_frame_labels=True, sort=True)  # both fixes asked for
    assert man["sequence_id"].unique().tolist() == ["0", "1", "2"]
    assert man["id"].tolist()[:3] == ["s1/f1.png", "s1/f2.png", "s1/f3.png"]


def test_min_length_is_checked_after_decoding(tmp_path):
    ck = ck_slice(tmp_path / "ck", n=3)
    seq = sorted((ck / "frames").iterdir())[0]
    frames = sorted(seq.iterdir())
    n = len(frames)
    frames[1].write_bytes(frames[1].read_bytes()[:60])  # truncated: does not decode
    out = tmp_path / "out"
    stage("ingest", *ingest_args(ck, out, "ck_sequences"), "-S", f"dataset.min_length={n}")
    man = pd.read_csv(out / "data/manifest.csv", dtype={"sequence_id": str})
    rej = pd.read_csv(out / "data/rejects.csv")
    assert seq.name not in set(man["sequence_id"])
    short = rej[rej["reason"].str.startswith("sequence too short after decoding")]
    assert len(short) == n - 1 and f"{n - 1} of its {n} frame(s) decoded < min_length {n}" in short["reason"].iloc[0]
    assert (rej["source"] == str(frames[1])).sum() == 1  # the frame itself, with its decode reason
    for _, g in man.groupby("sequence_id"):
        assert g["frame_index"].tolist() == list(range(len(g)))


def test_paths_outside_the_root_are_rejects(tmp_path):
    root = tmp_path / "root"
    names = ["a.png", "b.png"]
    lst = _listfile(root, ["a.png 1 0", "../../../../../../etc/passwd 1 1", "/etc/shadow 1 2", "link.png 1 3",
                           f"{root}/b.png 1 4"], names)
    os.symlink("/etc/hostname", root / "link.png")
    man, rej = read_dataset("listfile", lst, ignore_missing=True)
    assert man["id"].tolist() == ["a.png", f"{root}/b.png"]  # an absolute path inside the root is fine
    assert rej["line"].tolist() == [2, 3, 4]
    assert all("outside the dataset root" in r for r in rej["reason"])
    man, rej = read_dataset("listfile", lst, ignore_missing=True, outside_root=True)
    assert not any("outside" in r for r in rej["reason"]) and len(man) + len(rej) == 5  # allowed explicitly
    csv = root / "dist.csv"
    csv.write_text("emotion;path;in_set;fold\n1;a.png;train;0\n1;../../x.png;train;0\n")
    man, rej = read_dataset("guided_st", csv)
    assert man["id"].tolist() == ["a.png"] and "outside the dataset root" in rej["reason"].iloc[0]


def test_huge_file_is_rejected_before_it_is_read(tmp_path):
    ds = fer_slice(tmp_path / "ds", 2)
    huge = ds / "train/happy/huge.png"
    with open(huge, "wb") as f:  # 2 GB, sparse: no disk used, but reading it whole takes 2 GB of memory
        f.truncate(2 * 2**30)
    t0 = time.time()
    with pytest.raises(ImageError, match=r"file too large \(2048.0 MB > 64 MB"):
        decode_image(huge, 48, max_bytes=64 * 2**20)
    assert time.time() - t0 < 1
    out = tmp_path / "out"
    # ingest.max_file_mb 0 (no limit): the header is read, not the file: memory stays small
    params = tmp_path / "params.yaml"
    params.write_text("dataset: {format: folder, path: x}\ningest: {size: 48, workers: 1, max_file_mb: 0}\n")
    wrapper = tmp_path / "maxrss.py"  # runs the stage script, then reports its peak memory
    wrapper.write_text("import resource, runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
                       "    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
                       "    print('maxrss_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    res = subprocess.run([sys.executable, str(wrapper), str(REPO / "stages/ingest.py"), "--params", str(params),
                          *map(str, ingest_args(ds, out))], cwd=REPO, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    maxrss_mb = int(res.stderr.split("maxrss_kb")[1].split()[0]) / 1024
    assert maxrss_mb < 1024, f"ingest used {maxrss_mb:.0f} MB"
    rej = pd.read_csv(out / "data/rejects.csv")
    assert rej.set_index(rej["source"].str.rsplit("/", n=1).str[-1]).loc["huge.png", "reason"] == \
        "not a recognised image format"


def test_rejects_line_numbers_are_physical_lines(tmp_path):
    src = sorted((FER / "train/happy").iterdir())[:3]
    for f in src:
        shutil.copy(f, tmp_path / f.name)
    csv = tmp_path / "dist.csv"
    csv.write_text("emotion;path;in_set;fold\n"          # line 1
                   "\n"                                   # 2 blank
                   f"1;{src[0].name};train;0\n"          # 3
                   f'1;"{src[1].name}";"a\nb";0\n'        # 4-5: quoted newline in in_set -> reject at 4
                   "\n\n"                                 # 6, 7
                   f"9;{src[2].name};train;0\n"          # 8: bad emotion
                   "1;x.png;train;0;extra\n")             # 9: too many fields
    man, rej = read_dataset("guided_st", csv)
    assert man["id"].tolist() == [src[0].name]
    reasons = dict(zip(rej["line"], rej["reason"]))
    assert sorted(reasons) == [4, 8, 9]
    assert "'a\\nb' is not a split name" in reasons[4] and reasons[9] == "5 fields, the header has 4"


def test_float_tiff_with_inf_pixel_is_rejected(tmp_path):
    from PIL import Image
    face = cv2.imread(str(sorted((FER / "train/happy").iterdir())[0]), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
    face[10, 10] = np.inf
    Image.fromarray(face).save(tmp_path / "inf.tif")
    with pytest.raises(ImageError, match="non-finite pixels"):
        decode_image(tmp_path / "inf.tif", 48)
    face[10, 10] = 0.5
    Image.fromarray(face).save(tmp_path / "ok.tif")
    assert decode_image(tmp_path / "ok.tif", 48).mean() > 20  # a real face, not black


def test_test_only_with_an_image_checkpoint_is_a_clear_error(pipe, tmp_path):
    res = stage("train_sequence", "--test-only", "--model-in", pipe / "models/fold0.pt", "--features",
                pipe / "seq/features.h5", "--outputs", tmp_path / "o.h5", "--metrics", "", check=False)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "is an image model checkpoint ('baseline', from the train stage)" in res.stderr
