"""The generated demo dataset: layout, reproducibility, atomic replace, face-likeness, learnability."""
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from ferpipe.data import demo
from ferpipe.data.demo import CLASSES, SPLITS, make_demo
from conftest import load_stage

TRAIN, TEST, SIZE, SEED = 20, 10, 96, 7


def pngs(root: Path) -> list[Path]:
    return sorted(root.rglob("*.png"))


def read(path: Path) -> np.ndarray:
    return cv2.imread(str(path), cv2.IMREAD_UNCHANGED)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    metrics = make_demo(root / "out", seed=SEED, train_per_class=TRAIN, test_per_class=TEST, size=SIZE,
                        metrics_path=root / "metrics" / "demo.json")
    return root / "out", metrics, root / "metrics" / "demo.json"


def test_layout_and_counts(generated):
    out, metrics, _ = generated
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "test", "train"]
    for split, n in (("train", TRAIN), ("test", TEST)):
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(CLASSES)
        for cls in CLASSES:
            files = pngs(out / split / cls)
            assert len(files) == n
            assert metrics["images"][split][cls] == n
    first = Image.open(pngs(out / "train" / "happy")[0])
    assert first.mode == "L" and first.size == (SIZE, SIZE)
    assert "generated" in (out / "README.txt").read_text()
    assert not list(out.parent.glob(".out.*")), "temp folder left behind"


def test_metrics_file(generated):
    _, metrics, path = generated
    on_disk = json.loads(path.read_text())
    assert on_disk == {k: v for k, v in metrics.items() if k != "seconds"}
    ids = metrics["identities"]
    assert ids["usable"] >= 40, ids            # 63 on the reference machine
    assert ids["shared_train_test"] == 0
    assert ids["train"] > 0 and ids["test"] > 0


def test_train_and_test_identities_are_disjoint(generated):
    out, _, _ = generated
    ident = {s: {p.stem.split("_", 1)[1] for p in pngs(out / s)} for s in SPLITS}
    assert ident["train"] and ident["test"] and not ident["train"] & ident["test"]


def test_dlib_finds_most_faces(generated):
    out, metrics, _ = generated
    # measured: 0.876 on the full default set (seed 2020, 500 images), 0.85-0.92 on 150-image sets
    assert metrics["face_detected"]["all"] >= 0.70, metrics["face_detected"]
    for cls in CLASSES:
        assert metrics["face_detected"][cls] >= 0.55, metrics["face_detected"]
    # the metric is measured on the files as written, not on something else
    sample = [read(p) for p in pngs(out / "test")]
    assert abs(demo.detection_rate(sample) - metrics["face_detected"]["test"]) < 1e-3


def test_classes_are_learnable_across_identities(generated):
    """HOG + logistic regression fit on the train identities classifies unseen test identities.

    Raw pixels suffer from the pose jitter (0.53 on the full set); HOG tolerates small shifts. Chance is
    0.2; measured 0.48-0.68 over 8 seeds at this size.
    """
    from skimage.feature import hog
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    out, _, _ = generated

    def load(split):
        files = pngs(out / split)
        x = np.stack([hog(read(p), orientations=8, pixels_per_cell=(12, 12), cells_per_block=(2, 2)) for p in files])
        return x, [p.parent.name for p in files]

    (xtr, ytr), (xte, yte) = load("train"), load("test")
    with threadpool_limits(1):  # BLAS threads only slow these tiny fits down on a shared machine
        acc = LogisticRegression(C=0.05, max_iter=2000).fit(xtr, ytr).score(xte, yte)
    assert acc >= 0.4, acc


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    kw = dict(train_per_class=2, test_per_class=1, size=48)
    make_demo(tmp_path / "a", seed=11, **kw)
    make_demo(tmp_path / "b", seed=11, **kw)
    make_demo(tmp_path / "c", seed=12, **kw)
    a, b, c = (pngs(tmp_path / n) for n in "abc")
    assert len(a) == len(b) == len(c) == 15
    assert [p.relative_to(tmp_path / "a") for p in a] == [p.relative_to(tmp_path / "b") for p in b]
    assert all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    assert (tmp_path / "a" / "README.txt").read_text() == (tmp_path / "b" / "README.txt").read_text()
    same = sum(x.read_bytes() == y.read_bytes() for x, y in zip(a, c) if x.name == y.name)
    assert same == 0


def test_replaces_old_output_atomically(tmp_path):
    out = tmp_path / "demo"
    (out / "train" / "fear").mkdir(parents=True)
    (out / "stale.txt").write_text("old")
    make_demo(out, seed=1, train_per_class=1, test_per_class=1, size=32)
    assert not (out / "stale.txt").exists() and not (out / "train" / "fear").exists()
    assert len(pngs(out)) == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # no temp folder left


def test_expressions_move_the_landmarks_they_name():
    templates, _ = demo.load_templates()
    for t in templates[:10]:
        p = t.points
        d = {cls: demo.displacement(p, p, demo.rbf_weights(p, demo.expression_targets(cls, p))) for cls in CLASSES[1:]}
        assert d["happy"][[48, 54], 1].max() < 0          # mouth corners up (y grows downwards)
        assert d["sad"][[48, 54], 1].min() > 0            # mouth corners down
        assert d["sad"][[21, 22], 1].max() < 0            # inner brows up
        assert d["surprise"][17:27, 1].max() < 0          # brows up
        assert d["surprise"][57, 1] > 0                   # jaw drops
        assert d["angry"][[21, 22], 1].min() > 0          # inner brows down
        assert d["angry"][21, 0] > 0 > d["angry"][22, 0]  # ... and together
        assert not np.any(demo.expression_targets("neutral", p))


def test_warps_never_fold():
    """x -> x + s d(x) keeps a positive Jacobian over the visible frame at the largest strength."""
    templates, _ = demo.load_templates()
    u = np.linspace(0.0, 1.0, 81)
    gx, gy = np.meshgrid(u, u)
    x = np.stack([gx.ravel(), gy.ravel()], 1)
    h = 1e-3
    for t in templates[::4]:
        for cls in CLASSES[1:]:
            w = demo.rbf_weights(t.points, demo.expression_targets(cls, t.points)) * demo.MAX_STRENGTH
            jx = (demo.displacement(x + [h, 0], t.points, w) - demo.displacement(x - [h, 0], t.points, w)) / (2 * h)
            jy = (demo.displacement(x + [0, h], t.points, w) - demo.displacement(x - [0, h], t.points, w)) / (2 * h)
            det = (1 + jx[:, 0]) * (1 + jy[:, 1]) - jx[:, 1] * jy[:, 0]
            assert det.min() > 0.1, (t.name, cls, det.min())


def test_stage_cli_reads_params_and_overrides(tmp_path):
    stage = load_stage("demo")
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  seed: 3\n  train_per_class: 2\n  test_per_class: 1\n  size: 64\n")
    out, met = tmp_path / "data" / "demo", tmp_path / "metrics" / "demo.json"
    stage.main(["--params", str(params), "--out", str(out), "--metrics", str(met), "-S", "demo.test_per_class=0"])
    m = json.loads(met.read_text())
    assert m["seed"] == 3 and m["size"] == 64
    assert m["images"]["train"]["total"] == 10 and m["images"]["test"]["total"] == 0
    assert Image.open(pngs(out / "train")[0]).size == (64, 64)
    assert all((out / "test" / c).is_dir() for c in CLASSES)


# ------------------------------------------------------------------------------------------------ sequences

def test_demo_sequences_ck_layout_read_by_the_ck_reader(tmp_path):
    import pandas as pd
    from ferpipe.data.readers import read_dataset
    m = demo.make_demo_sequences(tmp_path / "s", seed=5, per_class=3, frames=4, size=48,
                                 metrics_path=tmp_path / "m.json")
    assert m["sequences"] == 12 and m["per_class"] == {c: 3 for c in demo.SEQUENCE_CLASSES}
    assert json.loads((tmp_path / "m.json").read_text()) == m
    labels = pd.read_csv(tmp_path / "s" / "labels.csv")
    assert list(labels.columns) == ["sequence_id", "label", "frame_count", "subject"]
    assert (labels["frame_count"] == 4).all() and labels["sequence_id"].str.match(r"S\d{3}_\d{3}$").all()
    man, rej = read_dataset("ck_sequences", tmp_path / "s")
    assert len(rej) == 0 and len(man) == 48 and man.groupby("sequence_id")["frame_index"].max().eq(3).all()
    assert (man["subject"] == man["sequence_id"].str[:4]).all()
    # onset neutral, apex expressed: the last frame differs from the first more than neighbours do
    first, second, last = (cv2.imread(str(p), cv2.IMREAD_GRAYSCALE).astype(float)
                           for p in sorted((tmp_path / "s" / "frames" / labels["sequence_id"][0]).iterdir())[:2]
                           + [sorted((tmp_path / "s" / "frames" / labels["sequence_id"][0]).iterdir())[-1]])
    assert np.abs(last - first).mean() > np.abs(second - first).mean()


def test_demo_sequences_same_seed_same_bytes_and_atomic(tmp_path):
    kw = dict(per_class=1, frames=3, size=32)
    demo.make_demo_sequences(tmp_path / "a", seed=1, **kw)
    demo.make_demo_sequences(tmp_path / "b", seed=1, **kw)
    a, b = pngs(tmp_path / "a"), pngs(tmp_path / "b")
    assert len(a) == 12 and all(x.read_bytes() == y.read_bytes() for x, y in zip(a, b))
    (tmp_path / "a" / "stale.txt").write_text("old")
    demo.make_demo_sequences(tmp_path / "a", seed=2, **kw)
    assert not (tmp_path / "a" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temp folder left
    with pytest.raises(ValueError, match="at least 2 frames"):
        demo.make_demo_sequences(tmp_path / "c", frames=1)


def test_stage_cli_sequences(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text("demo:\n  seed: 3\n  train_per_class: 2\n  test_per_class: 1\n  size: 40\n"
                      "  sequences: {per_class: 2, frames: 3}\n")
    out, met = tmp_path / "seq", tmp_path / "m.json"
    load_stage("demo").main(["--params", str(params), "--sequences", "--out", str(out), "--metrics", str(met),
                             "-S", "demo.sequences.frames=5"])
    m = json.loads(met.read_text())
    assert m["sequences"] == 8 and m["frames_per_sequence"] == 5 and m["size"] == 40
    assert len(pngs(out)) == 40 and not (out / "train").exists()
    with pytest.raises(SystemExit):  # a count out of range is a usage error, the old output stays
        load_stage("demo").main(["--params", str(params), "--sequences", "--out", str(out), "-S", "demo.sequences.frames=1"])
    for wrong in ("demo.test_per_class=1", "demo.frames=3", "demo.sequences.frames=x"):  # the images' key, a typo, not a count
        with pytest.raises(SystemExit):
            load_stage("demo").main(["--params", str(params), "--sequences", "--out", str(out), "-S", wrong])
    assert len(pngs(out)) == 40
