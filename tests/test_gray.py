import cv2
import numpy as np

from ferpipe.data.gray import run_gray
from ferpipe.imaging import resize_batch
from ferpipe.store import read_attrs, read_h5, write_h5
from conftest import fer_slice


def test_real_faces_resized_and_identity_at_48(fer_dir, tmp_path):
    images, _ = fer_slice(fer_dir, "test", per_class=3)
    ids = np.array([f"f{i}" for i in range(len(images))])
    write_h5(tmp_path / "in.h5", {"images": images, "ids": ids}, {"stage": "ingest", "size": 48})
    # at 48 px the stage is the identity: no resampling of FER-2013's native pixels
    run_gray(str(tmp_path / "in.h5"), str(tmp_path / "g48.h5"), None, size=48)
    np.testing.assert_array_equal(read_h5(tmp_path / "g48.h5")["images"], images)
    # smaller: area-averaged (2x2 blocks at 24 px), attrs record the size, ids kept
    m = run_gray(str(tmp_path / "in.h5"), str(tmp_path / "g24.h5"), str(tmp_path / "s.png"), size=24)
    out = read_h5(tmp_path / "g24.h5")
    assert m == {"images": len(images), "size": 24} and out["images"].shape == (len(images), 24, 24)
    block_mean = images.reshape(-1, 24, 2, 24, 2).mean((2, 4))
    assert np.abs(out["images"].astype(float) - block_mean).max() <= 1.0
    assert list(out["ids"]) == list(ids) and read_attrs(tmp_path / "g24.h5")["size"] == 24
    assert (tmp_path / "s.png").exists()


def test_upsizing_uses_cubic():
    img = (np.arange(48 * 48) % 251).astype(np.uint8).reshape(1, 48, 48)
    np.testing.assert_array_equal(resize_batch(img, 96)[0], cv2.resize(img[0], (96, 96), interpolation=cv2.INTER_CUBIC))


def test_blocks_of_rows_give_the_whole_array_result(fer_dir, tmp_path, monkeypatch):
    """gray48 reads ingest's array and writes its own in blocks (a 224 px AffectNet never fits in memory): with
    blocks of 5 rows the file, its sheet and attrs are those of one block, byte for byte (real faces)."""
    import ferpipe.store as store
    images, _ = fer_slice(fer_dir, "train", per_class=6)
    ids = np.array([f"f{i}" for i in range(len(images))])
    write_h5(tmp_path / "in.h5", {"images": images, "ids": ids}, {"stage": "ingest", "size": 48})
    run_gray(str(tmp_path / "in.h5"), str(tmp_path / "one.h5"), str(tmp_path / "one.png"), size=40)
    monkeypatch.setattr(store, "BLOCK_BYTES", 5 * 48 * 48)
    run_gray(str(tmp_path / "in.h5"), str(tmp_path / "many.h5"), str(tmp_path / "many.png"), size=40)
    np.testing.assert_array_equal(read_h5(tmp_path / "many.h5")["images"], resize_batch(images, 40))
    assert (tmp_path / "many.h5").read_bytes() == (tmp_path / "one.h5").read_bytes()
    assert (tmp_path / "many.png").read_bytes() == (tmp_path / "one.png").read_bytes()
    assert read_attrs(tmp_path / "many.h5")["ingest_size"] == 48
