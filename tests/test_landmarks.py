import numpy as np
import pytest

from ferpipe.faces.landmarks import FALLBACK, PASSES, detect_landmarks, run_landmarks
from ferpipe.store import read_h5, write_h5
from conftest import fer_slice


@pytest.fixture(scope="module")
def real(fer_dir):
    images, labels = fer_slice(fer_dir, per_class=6)
    return images, detect_landmarks(images, workers=1, progress=False)


def test_real_faces_mostly_found_with_sane_points(real):
    images, lm = real
    assert lm.points.shape == (len(images), 68, 2) and lm.points.dtype == np.float32
    assert lm.found.mean() >= 0.85, dict(zip(*np.unique(lm.method, return_counts=True)))
    assert set(lm.method) <= set(PASSES) | {FALLBACK}
    assert (lm.found == (lm.method != FALLBACK)).all()
    pts = lm.points[lm.found]
    # a detected face on a face crop: the points spread over the image, eyes above the mouth
    assert pts.min() > -0.2 and pts.max() < 1.2
    eyes_y = pts[:, 36:48, 1].mean(1)
    mouth_y = pts[:, 48:68, 1].mean(1)
    assert (eyes_y < mouth_y).all()
    assert (pts[:, :, 0].max(1) - pts[:, :, 0].min(1)).mean() > 0.5


def test_blank_image_is_flagged_not_silent(real):
    images, _ = real
    blank = np.zeros((2, 48, 48), np.uint8)
    lm = detect_landmarks(np.concatenate([blank, images[:2]]), passes=("dlib",), workers=1, progress=False)
    assert list(lm.method[:2]) == [FALLBACK, FALLBACK] and not lm.found[:2].any()
    assert np.isfinite(lm.points[:2]).all()  # still a usable (flagged) shape
    assert lm.confidence[:2].tolist() == [0.0, 0.0]


def test_later_passes_recover_misses(real):
    images, lm = real
    only_dlib = detect_landmarks(images, passes=("dlib",), workers=1, progress=False)
    assert lm.found.sum() >= only_dlib.found.sum()
    # where plain dlib found the face, the cascade used that same pass, so the points are identical
    same = only_dlib.found
    np.testing.assert_array_equal(lm.points[same], only_dlib.points[same])


def test_two_workers_give_identical_results(real):
    images, lm = real
    par = detect_landmarks(images, workers=2, chunk=16, progress=False)
    np.testing.assert_array_equal(par.points, lm.points)
    np.testing.assert_array_equal(par.method, lm.method)


def test_unknown_pass_is_an_error():
    with pytest.raises(ValueError, match="unknown landmark passes"):
        detect_landmarks(np.zeros((1, 48, 48), np.uint8), passes=("dlib", "retinaface"), progress=False)


def test_run_landmarks_writes_artifact_metrics_and_sheet(tmp_path, fer_dir):
    images, _ = fer_slice(fer_dir, per_class=2)
    ids = np.array([f"img{i}" for i in range(len(images))])
    write_h5(tmp_path / "in.h5", {"images": images, "ids": ids})
    m = run_landmarks(str(tmp_path / "in.h5"), str(tmp_path / "lm.h5"), str(tmp_path / "m.json"),
                      str(tmp_path / "sheet.png"), workers=1)
    out = read_h5(tmp_path / "lm.h5")
    assert list(out["ids"]) == list(ids)
    assert out["landmarks"].shape == (len(images), 68, 2)
    assert abs(sum(m["share"].values()) - 1) < 1e-6 and m["images"] == len(images)
    assert (tmp_path / "sheet.png").stat().st_size > 1000
    assert not list(tmp_path.glob("*.tmp"))
