"""Guide maps (DESIGN.md 4.1): landmark drawing, soft, dilation, patches, weighted, saliency."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from ferpipe.faces.draw import REGIONS, draw_regions, draw_regions_batch
from ferpipe.guides import maps
from ferpipe.guides.maps import GUIDE_KINDS, make_guide, run_guide
from ferpipe.store import read_attrs, read_h5, write_h5
from conftest import load_stage

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# A mean dlib 68-point face (x, y normalized), from dlib on FER-2013 faces, shrunk into the frame.
_MEAN = np.array([
    (0.089, 0.401), (0.095, 0.504), (0.106, 0.604), (0.129, 0.704), (0.171, 0.794), (0.239, 0.870),
    (0.322, 0.928), (0.414, 0.972), (0.512, 0.980), (0.607, 0.963), (0.685, 0.911), (0.754, 0.845),
    (0.813, 0.764), (0.848, 0.673), (0.864, 0.574), (0.872, 0.475), (0.871, 0.374), (0.163, 0.309),
    (0.212, 0.262), (0.280, 0.245), (0.351, 0.253), (0.418, 0.280), (0.557, 0.272), (0.619, 0.240),
    (0.688, 0.227), (0.756, 0.240), (0.804, 0.281), (0.492, 0.357), (0.496, 0.422), (0.500, 0.486),
    (0.505, 0.551), (0.420, 0.601), (0.460, 0.613), (0.503, 0.623), (0.544, 0.609), (0.580, 0.594),
    (0.245, 0.377), (0.289, 0.349), (0.341, 0.350), (0.387, 0.383), (0.340, 0.391), (0.288, 0.392),
    (0.591, 0.374), (0.637, 0.337), (0.688, 0.334), (0.730, 0.359), (0.692, 0.376), (0.642, 0.379),
    (0.328, 0.720), (0.391, 0.696), (0.458, 0.681), (0.503, 0.690), (0.549, 0.678), (0.613, 0.687),
    (0.672, 0.707), (0.617, 0.781), (0.556, 0.815), (0.506, 0.823), (0.459, 0.819), (0.391, 0.790),
    (0.351, 0.723), (0.459, 0.711), (0.504, 0.714), (0.549, 0.708), (0.648, 0.714), (0.552, 0.768),
    (0.505, 0.775), (0.459, 0.772)], np.float32)
TEMPLATE = (0.1 + 0.8 * _MEAN).astype(np.float32)
S = 48


def _faces(n=4, size=S, seed=0):
    """n random images (values 1..255) and n jittered/shifted template faces."""
    rng = np.random.default_rng(seed)
    images = rng.integers(1, 256, (n, size, size), dtype=np.uint8)
    shift = rng.uniform(-0.04, 0.04, (n, 1, 2))
    lm = (TEMPLATE + shift + rng.normal(0, 0.004, (n, 68, 2))).astype(np.float32)
    return images, lm


def _dist_to_points(points_px, size):
    """[size, size] distance from each pixel center to the nearest of the points (pixel coords)."""
    yy, xx = np.mgrid[:size, :size]
    d2 = (xx[..., None] - points_px[:, 0]) ** 2 + (yy[..., None] - points_px[:, 1]) ** 2
    return np.sqrt(d2.min(-1))


# ------------------------------------------------------------------------------------ all kinds
@pytest.mark.parametrize("kind", GUIDE_KINDS)
@pytest.mark.parametrize("size", [48, 64])
def test_every_kind_shape_dtype_and_not_blank(kind, size):
    images, lm = _faces(3, size)
    out = make_guide(kind, images, lm)
    assert out.shape == (3, size, size) and out.dtype == np.uint8
    assert all(out[i].max() > out[i].min() for i in range(3))


def test_guide_kinds_and_defaults_match_params_yaml():
    import yaml
    prm = yaml.safe_load((REPO / "params.yaml").read_text())["guides"]
    assert set(prm) == set(GUIDE_KINDS)
    for kind in GUIDE_KINDS:
        assert set(prm[kind]) <= set(maps.DEFAULT_PARAMS[kind]), kind
        make_guide(kind, *_faces(1), **prm[kind])


def test_unknown_kind_and_param_errors():
    images, lm = _faces(1)
    with pytest.raises(ValueError, match="blur"):
        make_guide("blur", images, lm)
    with pytest.raises(ValueError, match="radius"):
        make_guide("dilation", images, lm, radius=3)
    with pytest.raises(ValueError, match="thickness"):   # a param of another kind
        make_guide("soft", images, lm, thickness=2)
    with pytest.raises(ValueError, match="bogus"):
        make_guide("soft", images, lm, mode="bogus")
    with pytest.raises(ValueError, match="bogus"):
        make_guide("saliency", images, None, method="bogus")
    with pytest.raises(ValueError, match="landmarks"):
        make_guide("landmarks", images, lm[:, :5])
    with pytest.raises(ValueError, match="uint8"):
        make_guide("landmarks", images.astype(np.float32), lm)


# --------------------------------------------------------------------------------- the drawing
def test_landmark_drawing_white_in_mouth_black_far_from_points():
    images, lm = _faces(4)
    out = make_guide("landmarks", images, lm)
    for img, pts in zip(out, lm * S):
        mx, my = pts[48:60].mean(0)                      # inside the outer mouth hull
        assert img[int(my), int(mx)] == 255
        ex, ey = pts[36:42].mean(0)                      # inside the right eye hull
        assert img[int(round(ey)), int(round(ex))] > 0
        far = _dist_to_points(pts, S) > 6                 # no hull is that wide at 48 px
        assert far.sum() > S * S // 3
        assert img[far].max() == 0
        mid = (img > 0) & (img < 255)
        assert mid.any(), "expected anti-aliased edge pixels"


def test_draw_regions_jaw_line_and_nonfinite():
    pts = TEMPLATE * S
    with_jaw = draw_regions(pts, S)
    without = draw_regions(pts, S, jaw=False)
    assert (with_jaw >= without).all() and with_jaw.sum() > without.sum()
    thick = draw_regions(pts, S, thickness=3)
    assert (thick > 0).sum() > (with_jaw > 0).sum()
    bad = pts.copy()
    bad[5] = np.nan
    assert draw_regions(bad, S).max() == 0
    batch = draw_regions_batch(TEMPLATE[None], S)
    np.testing.assert_array_equal(batch[0], with_jaw)
    assert set(REGIONS) == {"jaw", "right_brow", "left_brow", "nose", "right_eye", "left_eye",
                            "mouth", "inner_mouth"}


# ------------------------------------------------------------------------------------------ soft
def test_soft_threshold_two_levels_from_the_drawing():
    images, lm = _faces(3)
    drawing = make_guide("landmarks", images, lm)
    soft = make_guide("soft", images, lm, mode="threshold", threshold=38, low=127)
    assert set(np.unique(soft)) == {127, 255}
    np.testing.assert_array_equal(soft == 255, drawing >= 38)
    soft2 = make_guide("soft", images, lm, threshold=200, low=100)
    assert set(np.unique(soft2)) == {100, 255}
    assert (soft2 == 255).sum() < (soft == 255).sum()


def test_soft_gaussian_peaks_at_points():
    images, lm = _faces(2)
    g = make_guide("soft", images, lm, mode="gaussian", sigma=1.5, low=127)
    for img, pts in zip(g, lm * S):
        assert img.min() >= 127 and img.max() == 255
        d = _dist_to_points(pts, S)
        assert (img[d > 6] == 127).all()                 # background
        # at the pixel nearest each point the heat is >= exp(-0.5 / sigma^2) ~ 0.8 of the peak
        xi, yi = np.clip(np.rint(pts).astype(int), 0, S - 1).T
        assert (img[yi, xi] >= 127 + 0.75 * 128).all()
        y, x = np.unravel_index(np.argmax(img), img.shape)
        assert d[y, x] <= 1.0


def test_gaussian_heat_is_vectorised_and_exact():
    pts = np.array([[[0.25, 0.5]] * 68], np.float32)      # all points at one spot
    heat = maps.gaussian_heat(pts, 8, sigma=1.0)
    yy, xx = np.mgrid[:8, :8]
    ref = np.exp(-((xx - 2.0) ** 2 + (yy - 4.0) ** 2) / 2)
    np.testing.assert_allclose(heat[0], ref / ref.max(), atol=1e-6)


# ------------------------------------------------------------------------------ dilation/collages
def test_dilation_has_no_jaw_and_grows_the_drawing():
    images, lm = _faces(3)
    dil = make_guide("dilation", images, lm, kernel=2, iterations=2)
    plain = draw_regions_batch(lm, S, jaw=False)
    full = make_guide("landmarks", images, lm)
    for i, pts in enumerate(lm * S):
        assert (dil[i] >= plain[i]).all()
        assert (dil[i] > 0).sum() > (plain[i] > 0).sum()
        others = pts[17:]
        for j in range(17):                               # jaw points far from every other region
            x, y = pts[j]
            if np.hypot(*(others - pts[j]).T).min() > 5:
                xi, yi = int(round(x)), int(round(y))
                assert full[i, yi, xi] > 0 and dil[i, yi, xi] == 0, (i, j)
    bigger = make_guide("dilation", images, lm, kernel=3, iterations=3)
    assert (bigger > 0).sum() > (dil > 0).sum()
    np.testing.assert_array_equal(make_guide("dilation", images, lm, iterations=0), plain)


def test_patches_is_image_inside_mask_zero_outside():
    images, lm = _faces(3)
    mask = make_guide("dilation", images, lm, kernel=2, iterations=2) > 0
    out = make_guide("patches", images, lm, kernel=2, iterations=2)
    assert (out[~mask] == 0).all()
    np.testing.assert_array_equal(out[mask], images[mask])
    assert mask.any() and (~mask).any()


@pytest.mark.parametrize("mode", ["threshold", "gaussian"])
def test_weighted_is_image_times_soft(mode):
    images, lm = _faces(3)
    soft = make_guide("soft", images, lm, mode=mode, low=127, threshold=38, sigma=1.5)
    out = make_guide("weighted", images, lm, mode=mode, low=127, threshold=38, sigma=1.5)
    ref = images.astype(np.float64) * soft / 255.0
    assert np.abs(out - ref).max() <= 0.5 + 1e-9
    assert not np.array_equal(out, images)


# ------------------------------------------------------------------------------------- saliency
@pytest.mark.parametrize("method", ["spectral_residual", "fine_grained"])
def test_saliency_differs_between_images_and_has_range(method):
    rng = np.random.default_rng(1)
    a = cv2.GaussianBlur(rng.integers(0, 256, (S, S), dtype=np.uint8), (5, 5), 0)
    b = np.full((S, S), 60, np.uint8)
    cv2.circle(b, (14, 30), 6, 230, -1)
    images = np.stack([a, b, np.full((S, S), 90, np.uint8)])
    sal = make_guide("saliency", images, None, method=method)
    assert sal.shape == (3, S, S) and sal.dtype == np.uint8
    for i in (0, 1):
        assert sal[i].min() == 0 and sal[i].max() == 255
    assert np.abs(sal[0].astype(int) - sal[1]).mean() > 10
    assert sal[2].max() == 0                               # a flat image has no salient part
    yy, xx = np.mgrid[:S, :S]
    disc = np.hypot(xx - 14, yy - 30) < 9                  # the disc (and its rim) stands out of the flat rest
    assert sal[1][disc].mean() > 1.3 * sal[1][np.hypot(xx - 14, yy - 30) > 14].mean()


# ------------------------------------------------------------------------------------ the stage
def _write_inputs(tmp_path, n=20, ids_lm=None):
    images, lm = _faces(n)
    ids = np.array([f"img{i:03d}" for i in range(n)])
    found = np.ones(n, bool)
    found[1] = False
    write_h5(tmp_path / "gray.h5", {"images": images, "ids": ids}, {"stage": "gray48"})
    write_h5(tmp_path / "lm.h5", {"landmarks": lm, "found": found, "ids": ids if ids_lm is None else ids_lm,
                                  "method": np.array(["dlib"] * n), "confidence": np.ones(n, np.float32)})
    return images, lm, ids, found


@pytest.mark.parametrize("kind", GUIDE_KINDS)
def test_run_guide_writes_packed_file_and_sheet(tmp_path, kind):
    images, lm, ids, found = _write_inputs(tmp_path)
    out, sheet = tmp_path / "guides" / f"{kind}.h5", tmp_path / "sheets" / f"guide_{kind}.png"
    summary = run_guide(kind, str(tmp_path / "gray.h5"), str(tmp_path / "lm.h5"), str(out), str(sheet))
    assert summary["images"] == 20 and summary["not_found"] == 1
    data = read_h5(out)
    assert set(data) == {"images", "ids", "found"}
    np.testing.assert_array_equal(data["images"], make_guide(kind, images, lm))
    np.testing.assert_array_equal(data["ids"], ids)
    np.testing.assert_array_equal(data["found"], found)
    assert data["images"][1].max() > 0                    # found=False faces still get a guide
    attrs = read_attrs(out)
    assert attrs["stage"] == "guide" and attrs["kind"] == kind
    for k, v in maps.DEFAULT_PARAMS[kind].items():
        assert attrs[k] == v
    png = cv2.imread(str(sheet))
    assert png is not None and png.shape[0] == 2 * 96
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_run_guide_ids_mismatch(tmp_path):
    ids_lm = np.array([f"img{i:03d}" for i in range(20)])
    ids_lm[[3, 4]] = ids_lm[[4, 3]]
    _write_inputs(tmp_path, ids_lm=ids_lm)
    out = tmp_path / "out.h5"
    with pytest.raises(ValueError, match="ids.*row 3"):
        run_guide("soft", str(tmp_path / "gray.h5"), str(tmp_path / "lm.h5"), str(out), None)
    assert not out.exists()
    write_h5(tmp_path / "lm.h5", {"landmarks": np.zeros((5, 68, 2), np.float32), "found": np.ones(5, bool),
                                  "ids": ids_lm[:5]})
    with pytest.raises(ValueError, match="20 images vs 5"):
        run_guide("soft", str(tmp_path / "gray.h5"), str(tmp_path / "lm.h5"), str(out), None)


def test_run_guide_failure_keeps_previous_output(tmp_path, monkeypatch):
    _write_inputs(tmp_path)
    out = tmp_path / "out.h5"
    run_guide("landmarks", str(tmp_path / "gray.h5"), str(tmp_path / "lm.h5"), str(out), None)
    before = out.read_bytes()
    import h5py

    def broken(self, *a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(h5py.File, "create_dataset", broken)
    with pytest.raises(OSError):
        run_guide("landmarks", str(tmp_path / "gray.h5"), str(tmp_path / "lm.h5"), str(out), None)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_run_guide_saliency_without_landmarks(tmp_path):
    _write_inputs(tmp_path)
    out = tmp_path / "sal.h5"
    run_guide("saliency", str(tmp_path / "gray.h5"), None, str(out), str(tmp_path / "s.png"))
    assert set(read_h5(out)) == {"images", "ids"}
    with pytest.raises(ValueError, match="landmarks"):
        run_guide("soft", str(tmp_path / "gray.h5"), None, str(out), None)


def test_stage_cli(tmp_path, capsys):
    _write_inputs(tmp_path)
    (tmp_path / "params.yaml").write_text(
        "guides:\n  soft: {mode: threshold, threshold: 38, low: 100, sigma: 1.5}\n")
    stage = load_stage("guide")
    common = ["--images", str(tmp_path / "gray.h5"), "--landmarks", str(tmp_path / "lm.h5"),
              "--params", str(tmp_path / "params.yaml")]
    stage.main(["soft", "--out", str(tmp_path / "a.h5"), "--sheet", ""] + common)
    assert set(np.unique(read_h5(tmp_path / "a.h5")["images"])) == {100, 255}
    stage.main(["--kind", "soft", "-S", "guides.soft.mode=gaussian", "-S", "guides.soft.low=0",
                "--out", str(tmp_path / "b.h5"), "--sheet", str(tmp_path / "b.png")] + common)
    assert read_attrs(tmp_path / "b.h5")["mode"] == "gaussian" and (tmp_path / "b.png").exists()
    assert read_h5(tmp_path / "b.h5")["images"].min() == 0
    with pytest.raises(SystemExit):
        stage.main(common)                                 # no kind given
    with pytest.raises(ValueError, match="radius"):
        stage.main(["soft", "-S", "guides.soft.radius=2", "--out", str(tmp_path / "c.h5"), "--sheet", ""] + common)
    with pytest.raises(SystemExit):                        # the key of another kind: not read by guide_soft
        stage.main(["soft", "-S", "guides.dilation.kernel=2", "--out", str(tmp_path / "c.h5"), "--sheet", ""] + common)
    assert not (tmp_path / "c.h5").exists()
    with pytest.raises(SystemExit) as e:
        stage.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for kind in GUIDE_KINDS:
        assert kind in text


# ------------------------------------------------------------------------------------ real faces
def _dlib_faces(k=16):
    folder = SHARED_DATA / "fer2013" / "train" / "happy"
    if not folder.is_dir():
        pytest.skip(f"real FER-2013 faces not found at {folder}")
    dlib = pytest.importorskip("dlib")
    from ferpipe.faces.models import dlib_model
    det, pred = dlib.get_frontal_face_detector(), dlib.shape_predictor(dlib_model())
    images, lms, boxes = [], [], []
    for path in sorted(folder.glob("*.png"))[:k]:
        gray = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        gray = cv2.resize(gray, (S, S), interpolation=cv2.INTER_AREA)
        big = cv2.resize(gray, (96, 96), interpolation=cv2.INTER_CUBIC)
        rects = det(big, 1)
        if not rects:
            continue
        r = rects[0]
        shape = pred(big, r)
        lms.append(np.array([[p.x, p.y] for p in shape.parts()], np.float32) / 96)
        boxes.append(np.array([r.left(), r.top(), r.right(), r.bottom()], np.float32) / 96)
        images.append(gray)
    if len(images) < 4:
        pytest.fail(f"dlib found only {len(images)} of {k} FER faces at 96 px")
    return np.stack(images), np.stack(lms), np.stack(boxes)


def test_real_faces_guides_land_on_the_face():
    images, lm, boxes = _dlib_faces()
    drawing = make_guide("landmarks", images, lm)
    dil = make_guide("dilation", images, lm)
    patches = make_guide("patches", images, lm)
    soft = make_guide("soft", images, lm, mode="gaussian")
    yy, xx = np.mgrid[:S, :S]
    for i, (x0, y0, x1, y1) in enumerate(boxes * S):
        # dlib's box is tight (brows to chin); the jaw of a turned head pokes out of it a little
        mx, my = 0.2 * (x1 - x0), 0.2 * (y1 - y0)
        inside = (xx >= x0 - mx) & (xx <= x1 + mx) & (yy >= y0 - my) & (yy <= y1 + my)
        white = drawing[i] >= 128
        assert white.sum() > 40
        assert inside[white].mean() > 0.95, i
        assert inside[dil[i] > 0].mean() > 0.95, i
        assert inside[patches[i] > 0].mean() > 0.95, i
        cx, cy = xx[white].mean(), yy[white].mean()     # the drawing is centred on the face
        assert x0 + 0.25 * (x1 - x0) < cx < x1 - 0.25 * (x1 - x0), i
        assert y0 + 0.25 * (y1 - y0) < cy < y1 - 0.15 * (y1 - y0), i
        # eyes and mouth inside the box, mouth below the eyes
        eyes_y = lm[i, 36:48, 1].mean() * S
        mouth_y = lm[i, 48:68, 1].mean() * S
        assert y0 - 1 <= eyes_y < mouth_y <= y1 + 1
        assert drawing[i, int(mouth_y), int(lm[i, 48:60, 0].mean() * S)] == 255
        y, x = np.unravel_index(np.argmax(soft[i]), soft[i].shape)
        assert inside[y, x]


def test_seed_guide_options_on_real_faces():
    """Guided-ST's seed as an option: patches masked by the landmark drawing, any face part removed before
    dilation, a white map where landmarks were not found (collages then keep the image)."""
    images, lm, _ = _dlib_faces()
    seed = make_guide("patches", images, lm, mask="landmarks")
    drawing = make_guide("landmarks", images, lm)
    assert (seed == np.where(drawing > 0, images, 0)).all()
    assert not (seed == make_guide("patches", images, lm)).all()            # the default mask differs
    no_brows = make_guide("dilation", images, lm, remove=["jaw", "right_brow", "left_brow"])
    dil = make_guide("dilation", images, lm)
    brow_rows = int(np.floor(lm[:, 17:27, 1].min() * S)) - 1
    assert (no_brows > 0).sum() < (dil > 0).sum() and (no_brows[:, :max(brow_rows, 0)] == 0).all()
    assert (make_guide("dilation", images, lm, remove=[]) > 0).sum() > (dil > 0).sum()   # the jaw is back
    with pytest.raises(ValueError, match="unknown face regions"):
        make_guide("dilation", images, lm, remove=["ears"])
    found = np.ones(len(images), bool)
    found[::2] = False
    for kind in ("landmarks", "soft", "dilation", "patches", "weighted"):
        fallback = make_guide(kind, images, lm, found=found)
        white = make_guide(kind, images, lm, found=found, missing="white")
        assert (white[found] == fallback[found]).all(), kind
        assert (white[~found] == (images[~found] if kind in ("patches", "weighted") else 255)).all(), kind
    with pytest.raises(ValueError, match="missing 'black' unknown"):
        make_guide("soft", images, lm, missing="black")
