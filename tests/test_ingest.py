"""Tests of the ingest stage: image decoding, labels, every reader format, run_ingest, the CLI.

Fixtures are generated in tmp_path with PIL/numpy. The real-data tests read ../shared/data/fer2013
beside the checkout and are skipped when it is absent.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from ferpipe.data.decode import ImageError, decode_image, parse_pixels
from ferpipe.data.ingest import run_ingest
from ferpipe.data.labels import (FER2013_CLASSES, LabelError, affectnet_name, canonical, class_list,
                                 fer2013_name, polarity)
from ferpipe.data.readers import (MANIFEST_COLUMNS, REJECT_COLUMNS, DatasetError, read_dataset,
                                  read_folder)
from ferpipe.store import read_attrs, read_h5
from conftest import load_stage

REPO = Path(__file__).resolve().parents[1]
REAL_FER = Path(__file__).resolve().parents[2] / "shared" / "data" / "fer2013"
needs_real = pytest.mark.skipif(not REAL_FER.is_dir(), reason=f"real FER-2013 folder not found at {REAL_FER}")


def pattern(h: int = 48, w: int = 48, seed: int = 0) -> np.ndarray:
    """A deterministic uint8 gray image with structure (a gradient plus noise)."""
    rng = np.random.default_rng(seed)
    grad = np.add.outer(np.arange(h) * 3, np.arange(w) * 2) % 200
    return (grad + rng.integers(0, 50, (h, w))).astype(np.uint8)


def save(path: Path, arr: np.ndarray, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def outputs(tmp_path: Path) -> dict:
    o = tmp_path / "out"
    return dict(out_images=o / "images.h5", out_manifest=o / "manifest.csv", out_rejects=o / "rejects.csv",
                metrics_path=o / "metrics.json", sheet_path=o / "sheet.png")


def snapshot(folder: Path) -> dict:
    """Bytes hash and mtime of every file under folder (to prove ingest never touches them)."""
    return {p: (hashlib.sha1(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# decode_image

@pytest.mark.parametrize("ext,kw", [("png", {}), ("bmp", {}), ("gif", {}), ("webp", {"lossless": True}),
                                    ("tif", {}), ("tiff", {"compression": "tiff_lzw"})])
def test_decode_lossless_formats_exact(tmp_path, ext, kw):
    a = pattern()
    p = save(tmp_path / f"x.{ext}", a, **kw)
    np.testing.assert_array_equal(decode_image(p, 48), a)


def test_decode_jpeg_close(tmp_path):
    a = pattern()
    p = save(tmp_path / "x.jpg", a, quality=95)
    d = decode_image(p, 48)
    assert d.dtype == np.uint8 and d.shape == (48, 48)
    assert np.abs(d.astype(int) - a).mean() < 4


def test_decode_rgb_uses_luma(tmp_path):
    rgb = np.zeros((48, 48, 3), np.uint8)
    rgb[..., 0] = 200
    p = save(tmp_path / "c.png", rgb)
    assert abs(int(decode_image(p, 48)[0, 0]) - round(0.299 * 200)) <= 1


def test_decode_multipage_tiff_first_page(tmp_path):
    first, second = pattern(seed=1), 255 - pattern(seed=2)
    p = tmp_path / "multi.tif"
    Image.fromarray(first).save(p, save_all=True, append_images=[Image.fromarray(second)])
    with Image.open(p) as im:
        assert im.n_frames == 2
    np.testing.assert_array_equal(decode_image(p, 48), first)


def test_decode_animated_gif_first_frame(tmp_path):
    first, second = pattern(seed=1), np.full((48, 48), 7, np.uint8)
    p = tmp_path / "anim.gif"
    Image.fromarray(first).save(p, save_all=True, append_images=[Image.fromarray(second)])
    np.testing.assert_array_equal(decode_image(p, 48), first)


def test_decode_16bit_png_scaled_not_clipped(tmp_path):
    a8 = pattern()
    a16 = a8.astype(np.uint16) * 257  # full 16-bit range
    a16[0, 0] = 40000  # clipping would give 255; scaling gives 156
    p = tmp_path / "deep.png"
    Image.fromarray(a16).save(p)
    with Image.open(p) as im:
        assert im.mode.startswith("I")
    d = decode_image(p, 48)
    assert d[0, 0] == round(40000 / 257)
    np.testing.assert_array_equal(d[1:], a8[1:])


def test_decode_palette_png(tmp_path):
    idx = (pattern() % 4).astype(np.uint8)
    im = Image.frombytes("P", (48, 48), idx.tobytes())
    im.putpalette([0, 0, 0, 255, 255, 255, 0, 0, 255, 128, 128, 128] + [0] * (256 - 4) * 3)
    p = tmp_path / "pal.png"
    im.save(p)
    d = decode_image(p, 48)
    expected = np.array([0, 255, round(0.114 * 255), 128])[idx]
    assert np.abs(d.astype(int) - expected).max() <= 1


def test_decode_palette_with_transparency_on_black(tmp_path):
    idx = np.zeros((48, 48), np.uint8)
    idx[:, 24:] = 1
    im = Image.frombytes("P", (48, 48), idx.tobytes())
    im.putpalette([255, 255, 255, 200, 200, 200] + [0] * 254 * 3)
    im.info["transparency"] = 0  # index 0 (white) is transparent -> black
    p = tmp_path / "tpal.png"
    im.save(p, transparency=0)
    d = decode_image(p, 48)
    assert d[:, :24].max() == 0 and d[:, 24:].min() == 200


def test_decode_rgba_composited_on_black(tmp_path):
    rgba = np.zeros((48, 48, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:16, :, 3] = 255
    rgba[16:32, :, 3] = 0
    rgba[32:, :, 3] = 128
    d = decode_image(save(tmp_path / "a.png", rgba), 48)
    assert (d[:16] == 200).all() and (d[16:32] == 0).all() and (np.abs(d[32:].astype(int) - 100) <= 1).all()


def test_decode_exif_orientation_applied(tmp_path):
    # 60 wide x 30 tall, left half black, right half white; EXIF 6 = rotate 90 deg clockwise to view,
    # which puts the left (black) half at the top
    a = np.zeros((30, 60), np.uint8)
    a[:, 30:] = 255
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6
    p = tmp_path / "rot.jpg"
    im.save(p, exif=exif.tobytes(), quality=95)
    d = decode_image(p, 48)
    assert d[:20].mean() < 30 and d[-20:].mean() > 225  # rotated: top dark, bottom bright
    plain = save(tmp_path / "plain.jpg", a, quality=95)
    d0 = decode_image(plain, 48)
    assert d0[:, :20].mean() < 30 and d0[:, -20:].mean() > 225  # no EXIF: left dark


def test_decode_resize_area_down_cubic_up(tmp_path):
    big = pattern(96, 96)
    d = decode_image(save(tmp_path / "big.png", big), 48)
    np.testing.assert_array_equal(d, cv2.resize(big, (48, 48), interpolation=cv2.INTER_AREA))
    small = pattern(24, 24)
    d = decode_image(save(tmp_path / "small.png", small), 48)
    np.testing.assert_array_equal(d, cv2.resize(small, (48, 48), interpolation=cv2.INTER_CUBIC))
    wide = pattern(48, 96)  # non-square: the whole image is squeezed to size x size
    assert decode_image(save(tmp_path / "wide.png", wide), 48).shape == (48, 48)


def test_decode_box_crop_and_clip(tmp_path):
    a = np.zeros((80, 100), np.uint8)
    a[20:60, 30:70] = pattern(40, 40)
    p = save(tmp_path / "box.png", a)
    np.testing.assert_array_equal(decode_image(p, 40, box=(30, 20, 40, 40)), a[20:60, 30:70])
    # a box hanging over the edge is clipped to the image
    np.testing.assert_array_equal(decode_image(p, 20, box=(80, 60, 50, 50)), a[60:80, 80:100])
    with pytest.raises(ImageError, match="empty"):
        decode_image(p, 48, box=(200, 0, 10, 10))


def test_decode_bytes_source(tmp_path):
    a = pattern()
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_image(buf.getvalue(), 48), a)
    with pytest.raises(ImageError, match="0 bytes"):
        decode_image(b"", 48)


def test_decode_errors_have_reasons(tmp_path):
    good = save(tmp_path / "good.png", pattern(64, 64, seed=3))
    data = good.read_bytes()
    (tmp_path / "trunc.png").write_bytes(data[: len(data) // 2])
    jpg = save(tmp_path / "good.jpg", pattern(64, 64, seed=3)).read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(jpg[: len(jpg) // 2])
    (tmp_path / "zero.png").write_bytes(b"")
    (tmp_path / "text.png").write_bytes(b"this is not an image at all")
    corrupt = bytearray(data)
    corrupt[60:80] = b"\xff" * 20  # inside the IDAT: CRC/zlib failure
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    cases = {"missing.png": "not found", "zero.png": "0 bytes", "text.png": "not a recognised image",
             "trunc.png": "(truncated|corrupt)", "trunc.jpg": "truncated", "corrupt.png": "(corrupt|truncated)"}
    for name, reason in cases.items():
        with pytest.raises(ImageError, match=reason):
            decode_image(tmp_path / name, 48)
    with pytest.raises(ImageError, match="folder"):
        decode_image(tmp_path, 48)


def test_parse_pixels():
    assert parse_pixels(" ".join(["7"] * 2304)).tolist() == [7] * 2304
    for bad, msg in [(" ".join(["7"] * 2303), "2303 values"), (" ".join(["7"] * 2303 + ["256"]), "range"),
                     (" ".join(["7"] * 2303 + ["x"]), "not an integer"), ("", "0 values")]:
        with pytest.raises(ImageError, match=msg):
            parse_pixels(bad)


# ------------------------------------------------------------------------------------------------
# labels

def test_labels_canonical_and_codes():
    assert [canonical(n) for n in ["Anger", "SADNESS", "happiness", "Surprised", "fearful", "disgusted",
                                   "contempt", " Neutral "]] == \
        ["angry", "sad", "happy", "surprise", "fear", "disgust", "contempt", "neutral"]
    assert [fer2013_name(i) for i in range(7)] == list(FER2013_CLASSES)
    assert FER2013_CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert [affectnet_name(i) for i in range(8)] == ["neutral", "happy", "sad", "surprise", "fear", "disgust",
                                                     "angry", "contempt"]
    for code, word in [(8, "none"), (9, "uncertain"), (10, "no-face")]:
        with pytest.raises(LabelError, match=word):
            affectnet_name(code)
    for bad in [7, -1, "x", "1.5"]:
        with pytest.raises(LabelError):
            fer2013_name(bad)


def test_polarity_mapping():
    assert polarity("neutral") == 0 and polarity("Happiness") == 1
    assert {polarity(n) for n in ["angry", "disgust", "fear", "sad", "contempt"]} == {2}
    assert polarity("surprise") is None
    # AffectNet: the valence decides, with 0.2 bounds inclusive for neutral
    assert [polarity("happy", v) for v in [0.2, -0.2, 0.21, -0.21, 0.0]] == [0, 0, 1, 2, 0]
    assert polarity("happy", float("nan")) == 1


def test_class_list_order():
    assert class_list(["neutral", "contempt", "happy", "angry", "", "happy"]) == \
        ["angry", "happy", "neutral", "contempt"]
    assert class_list(["negative", "neutral", "positive"]) == ["neutral", "positive", "negative"]
    assert class_list(["10", "2", "0"]) == ["0", "2", "10"]


# ------------------------------------------------------------------------------------------------
# readers

def make_folder(root: Path) -> Path:
    save(root / "train" / "Happy" / "a.png", pattern(seed=1))
    save(root / "train" / "Happy" / "b.jpg", pattern(seed=2))
    save(root / "train" / "Happy" / "a.tif", pattern(seed=3))  # same stem as a.png: duplicate id
    save(root / "train" / "anger" / "c.PNG", pattern(seed=4))
    save(root / "Validation" / "sadness" / "d.webp", pattern(seed=5), lossless=True)
    save(root / "PrivateTest" / "happy" / "e.tiff", pattern(seed=6))
    (root / "train" / "Happy" / "notes.txt").write_text("hello")
    (root / "README.md").write_text("ignored")
    (root / "extras").mkdir()
    return root


def test_read_folder(tmp_path):
    root = make_folder(tmp_path / "ds")
    man, rej = read_folder(root)
    assert list(man.columns) == MANIFEST_COLUMNS and list(rej.columns) == REJECT_COLUMNS
    assert man["id"].tolist() == ["train/angry/c", "train/happy/a", "train/happy/b", "val/sad/d",
                                  "test/happy/e"]
    assert man.set_index("id").loc["train/angry/c", "label_name"] == "angry"
    assert man["split"].tolist() == ["train", "train", "train", "val", "test"]
    assert man["source"].iloc[1] == str(root / "train" / "Happy" / "a.png")
    assert (man["fold"] == -1).all() and (man["frame_index"] == -1).all() and man["valence"].isna().all()
    reasons = dict(zip(rej["source"].map(lambda s: Path(s).name), rej["reason"]))
    assert reasons["notes.txt"] == "not an image extension"
    assert reasons["extras"].startswith("folder 'extras' is not a split")
    assert reasons["a.tif"].startswith("duplicate id 'train/happy/a', first at ") and "a.png" in reasons["a.tif"]
    assert "README.md" not in reasons


def test_read_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        read_folder(tmp_path / "nope")
    (tmp_path / "flat" / "happy").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no split folders.*happy"):
        read_folder(tmp_path / "flat")
    (tmp_path / "empty" / "train" / "happy").mkdir(parents=True)
    (tmp_path / "empty" / "train" / "happy" / "x.txt").write_text("")
    with pytest.raises(DatasetError, match="no images"):
        read_folder(tmp_path / "empty")


def fer_csv(path: Path, rows: list[tuple], header=("emotion", "pixels", "Usage")) -> Path:
    pd.DataFrame(rows, columns=list(header)).to_csv(path, index=False)
    return path


def pix(a: np.ndarray) -> str:
    return " ".join(map(str, a.ravel().tolist()))


def test_read_fer2013_csv(tmp_path):
    a, b = pattern(seed=1), pattern(seed=2)
    p = fer_csv(tmp_path / "fer2013.csv", [
        (3, pix(a), "Training"),                     # line 2
        (0, pix(b), "PublicTest"),                   # line 3
        (6, pix(a)[:-4], "PrivateTest"),             # 2303 values
        (7, pix(a), "Training"),                     # emotion out of range
        ("happy", pix(a), "Training"),               # non-numeric emotion
        (2, pix(a).replace("0 ", "300 ", 1), "Training"),  # value out of range (first 0)
        (2, pix(a), "Holdout"),                      # unknown usage
        (5, pix(b), "PrivateTest"),                  # line 9
    ])
    man, rej = read_dataset("fer2013_csv", p)
    assert man["id"].tolist() == ["fer2013/2", "fer2013/3", "fer2013/9"]
    assert man["source"].tolist() == ["fer2013.csv:2", "fer2013.csv:3", "fer2013.csv:9"]
    assert man["label_name"].tolist() == ["happy", "angry", "surprise"]
    assert man["split"].tolist() == ["train", "val", "test"]
    assert list(man.columns) == MANIFEST_COLUMNS + ["pixels"]
    assert rej["line"].tolist() == [4, 5, 6, 7, 8]
    r = rej["reason"].tolist()
    assert "2303 values" in r[0] and "emotion 7 out of range" in r[1] and "not a number" in r[2]
    assert "out of range 0..255" in r[3] and "Holdout" in r[4]


def test_fer2013_csv_structure_errors(tmp_path):
    good = pix(pattern())
    p = fer_csv(tmp_path / "renamed.csv", [(1, good, "Training")], header=("emotion", "pixel", "Usage"))
    with pytest.raises(DatasetError, match=r"missing column 'pixels'.*emotion, pixel, Usage.*did you mean 'pixel'") as e:
        read_dataset("fer2013_csv", p)
    assert "renamed.csv" in str(e.value)
    (tmp_path / "header.csv").write_text("emotion,pixels,Usage\n")
    with pytest.raises(DatasetError, match="header only"):
        read_dataset("fer2013_csv", tmp_path / "header.csv")
    (tmp_path / "zero.csv").write_text("")
    with pytest.raises(DatasetError, match="empty file"):
        read_dataset("fer2013_csv", tmp_path / "zero.csv")
    with pytest.raises(DatasetError, match="not found"):
        read_dataset("fer2013_csv", tmp_path / "absent.csv")


def test_fer2013_csv_ingest_pixels_exact(tmp_path):
    a, b = pattern(seed=1), pattern(seed=2)
    p = fer_csv(tmp_path / "fer2013.csv", [(3, pix(a), "Training"), (0, pix(b), "PublicTest"),
                                          (1, "1 2 3", "Training")])
    out = outputs(tmp_path)
    m = run_ingest("fer2013_csv", p, "", **out, size=48, workers=1, progress=False)
    h = read_h5(out["out_images"])
    np.testing.assert_array_equal(h["images"], np.stack([a, b]))
    assert h["ids"].tolist() == ["fer2013/2", "fer2013/3"]
    man = pd.read_csv(out["out_manifest"])
    assert "pixels" not in man.columns and man["id"].tolist() == ["fer2013/2", "fer2013/3"]
    rej = pd.read_csv(out["out_rejects"])
    assert rej["line"].tolist() == [4] and "3 values" in rej["reason"].iloc[0]
    assert m["images"] == 2 and m["rejected"] == 1
    attrs = read_attrs(out["out_images"])
    assert attrs["classes"] == ["angry", "happy"] and attrs["stage"] == "ingest" and attrs["size"] == 48


def test_affectnet_box_crop(tmp_path):
    img = np.zeros((80, 100), np.uint8)
    face = pattern(40, 40, seed=9)
    img[10:50, 50:90] = face
    save(tmp_path / "imgs" / "689" / "f1.jpg", img, quality=100)
    save(tmp_path / "imgs" / "689" / "f2.png", img)
    rows = [
        ["689/f2.png", 50, 10, 40, 40, "1;2;3", 1, 0.5, 0.1],
        ["689/f1.jpg", 50, 10, 40, 40, "", 7, -0.4, 0.3],
        ["689/f1.jpg", 50, 10, 40, 40, "", 8, 0.0, 0.0],     # none: not an expression
        ["689/f2.png", 0, 0, 10, 10, "", 10, -2, -2],         # no-face
        ["689/missing.png", 0, 0, 10, 10, "", 0, 0.0, 0.0],  # decode reject at ingest
    ]
    cols = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
            "expression", "valence", "arousal"]
    csv = tmp_path / "validation.csv"
    pd.DataFrame(rows, columns=cols).to_csv(csv, index=False)
    man, rej = read_dataset("affectnet", csv, root=tmp_path / "imgs", split="val")
    assert man["id"].tolist() == ["689/f2.png", "689/f1.jpg", "689/missing.png"]
    assert man["label_name"].tolist() == ["happy", "contempt", "neutral"]
    assert (man["split"] == "val").all()
    assert man[["box_x", "box_y", "box_w", "box_h"]].iloc[0].tolist() == [50, 10, 40, 40]
    assert man["valence"].tolist() == [0.5, -0.4, 0.0]
    assert rej["line"].tolist() == [4, 5]
    assert "8 (none)" in rej["reason"].iloc[0] and "no-face" in rej["reason"].iloc[1]
    out = outputs(tmp_path)
    run_ingest("affectnet", csv, tmp_path / "imgs", **out, size=40, workers=1, options={"split": "val"},
               progress=False)
    h = read_h5(out["out_images"])
    np.testing.assert_array_equal(h["images"][0], face)  # the png: crop is exact
    assert np.abs(h["images"][1].astype(int) - face).mean() < 3  # the jpg: close
    rej = pd.read_csv(out["out_rejects"])
    assert rej["reason"].tolist()[-1] == "file not found"
    bad = tmp_path / "bad.csv"
    pd.DataFrame(rows, columns=cols).drop(columns=["face_width"]).to_csv(bad, index=False)
    with pytest.raises(DatasetError, match="missing column 'face_width'"):
        read_dataset("affectnet", bad)


def test_listfile_sort_and_ignore_missing(tmp_path):
    for name in ["s1_f0", "s1_f1", "s2_f0", "s2_f1"]:
        save(tmp_path / "frames" / f"{name}.png", pattern(seed=len(name)))
    lst = tmp_path / "frames" / "train.txt"
    lst.write_text("\n".join([
        "s2_f1.png 3 0.5 20",
        "s1_f1.png 1.5 0 10",
        "# a comment",
        "",
        "s2_f0.png 3 0.25 20",
        "s1_f0.png 2 1 10",
        "s9_f0.png 1 0 99",        # missing image
        "s1_f2.png 2 x 10",        # non-numeric label
        "onlytwo.png 5",           # too few fields
    ]) + "\n")
    with pytest.raises(DatasetError, match="s9_f0.png.*ignore_missing"):
        read_dataset("listfile", lst)
    # as written, both sequences are interleaved and out of frame order: rejected, every line reported
    man, rej = read_dataset("listfile", lst, ignore_missing=True, per_frame_labels=True)
    assert man.empty
    assert sorted(rej["line"].tolist()) == [1, 2, 5, 6, 7, 8, 9]
    assert rej.set_index("line").loc[1, "reason"].startswith("the lines of sequence 20 are not contiguous (lines 1, 5)")
    man, rej = read_dataset("listfile", lst, sort=True, ignore_missing=True, split="test", per_frame_labels=True)
    assert man["id"].tolist() == ["s1_f0.png", "s1_f1.png", "s2_f0.png", "s2_f1.png"]
    assert man["sequence_id"].tolist() == ["0", "0", "1", "1"]
    assert man["frame_index"].tolist() == [0, 1, 0, 1]
    assert man["label_value"].tolist() == [2.0, 1.5, 3.0, 3.0]
    assert man["label_name"].tolist() == ["2", "", "3", "3"]  # float regression label: no class name
    assert man["labels_extra"].tolist() == ["1", "0", "0.25", "0.5"]
    assert (man["split"] == "test").all()
    assert rej["line"].tolist() == [7, 8, 9]
    assert rej["reason"].tolist()[0] == "file not found" and "not a number" in rej["reason"].iloc[1]
    assert "got 2 fields" in rej["reason"].iloc[2]
    # sorted, but one label set per sequence required (the default): 10's labels 1.5 / 2 differ, 20's label2
    man, rej = read_dataset("listfile", lst, sort=True, ignore_missing=True)
    assert man.empty
    reasons = rej.set_index("line")["reason"]
    assert reasons[2].startswith("labels disagree within sequence 10: 2 1 (line 6), 1.5 0 (line 2)")
    assert reasons[1].startswith("labels disagree within sequence 20: 3 0.25 (line 5), 3 0.5 (line 1)")


def test_guided_st(tmp_path):
    for i in range(4):
        save(tmp_path / "img" / f"{i}.png", pattern(seed=i))
    csv = tmp_path / "img" / "dist.csv"
    csv.write_text("emotion;path;in_set;fold\n0;0.png;train;0\n1;1.png;train;3\n2;2.png;test;\n"
                   "3;3.png;train;1\n1;1.png;val;2\n2;x.png;holdout;1\n")
    man, rej = read_dataset("guided_st", csv)
    assert man["label_name"].tolist() == ["neutral", "positive", "negative"]
    assert man["fold"].tolist() == [0, 3, -1] and man["split"].tolist() == ["train", "train", "test"]
    assert man["source"].iloc[0] == str(tmp_path / "img" / "0.png")
    assert rej["line"].tolist() == [5, 7, 6]
    assert "out of range" in rej["reason"].iloc[0] and "holdout" in rej["reason"].iloc[1]
    assert rej["reason"].iloc[2] == "duplicate id '1.png', first at line 3"
    comma = tmp_path / "comma.csv"
    comma.write_text("emotion,path,in_set,fold\n0,0.png,train,0\n")
    with pytest.raises(DatasetError, match="missing column 'emotion'.*';'"):
        read_dataset("guided_st", comma)


def test_unknown_format_and_option(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset format 'kaggle'.*folder.*fer2013_csv.*guided_st"):
        read_dataset("kaggle", tmp_path)
    with pytest.raises(DatasetError, match="no option sort"):
        read_dataset("folder", tmp_path, sort=True)


# ------------------------------------------------------------------------------------------------
# run_ingest

def test_ingest_bad_files_rejected_good_kept_user_files_untouched(tmp_path):
    root = make_folder(tmp_path / "ds")
    good = pattern(64, 64, seed=11)
    data = save(root / "train" / "sad" / "ok.png", good).read_bytes()
    (root / "train" / "sad" / "trunc.png").write_bytes(data[: len(data) // 2])
    (root / "train" / "sad" / "zero.png").write_bytes(b"")
    (root / "train" / "sad" / "junk.jpg").write_bytes(b"\x00" * 100)
    before = snapshot(root)
    out = outputs(tmp_path)
    m = run_ingest("folder", root, "", **out, size=32, workers=2, progress=False)
    assert snapshot(root) == before
    h = read_h5(out["out_images"])
    man = pd.read_csv(out["out_manifest"], keep_default_na=False)
    assert h["images"].shape == (6, 32, 32) and h["images"].dtype == np.uint8
    assert h["ids"].tolist() == man["id"].tolist()
    assert "train/sad/ok" in man["id"].tolist()
    i = man["id"].tolist().index("train/sad/ok")
    np.testing.assert_array_equal(h["images"][i], cv2.resize(good, (32, 32), interpolation=cv2.INTER_AREA))
    rej = pd.read_csv(out["out_rejects"])
    reasons = dict(zip(rej["source"].map(lambda s: Path(s).name), rej["reason"]))
    assert reasons["zero.png"] == "empty file (0 bytes)"
    assert reasons["trunc.png"].startswith(("truncated", "corrupt"))
    assert reasons["junk.jpg"] == "not a recognised image format"
    assert reasons["notes.txt"] == "not an image extension"
    metrics = json.loads(out["metrics_path"].read_text())
    assert all(m[k] == v for k, v in metrics.items()) and metrics["images"] == 6
    assert metrics["rejected"] == len(rej) == 6
    assert metrics["splits"] == {"test": 1, "train": 4, "val": 1}
    assert metrics["classes"] == {"angry": 1, "happy": 3, "sad": 2}
    sheet = cv2.imread(str(out["sheet_path"]))
    assert sheet.shape[0] == 3 * 64  # one row per class
    # same result in one process
    out1 = outputs(tmp_path / "one")
    run_ingest("folder", root, "", **out1, size=32, workers=1, progress=False)
    np.testing.assert_array_equal(read_h5(out1["out_images"])["images"], h["images"])


def test_ingest_missing_files_in_csv_are_rejects(tmp_path):
    save(tmp_path / "0.png", pattern())
    csv = tmp_path / "d.csv"
    csv.write_text("emotion;path;in_set;fold\n0;0.png;train;0\n1;gone.png;train;1\n")
    out = outputs(tmp_path)
    run_ingest("guided_st", csv, "", **out, size=48, workers=1, progress=False)
    rej = pd.read_csv(out["out_rejects"])
    assert rej["source"].tolist() == [str(tmp_path / "gone.png")] and rej["reason"].tolist() == ["file not found"]
    assert read_h5(out["out_images"])["images"].shape == (1, 48, 48)


def test_ingest_writes_rejects_header_when_none(tmp_path):
    save(tmp_path / "ds" / "test" / "happy" / "a.png", pattern())
    out = outputs(tmp_path)
    run_ingest("folder", tmp_path / "ds", "", **out, workers=1, progress=False)
    assert out["out_rejects"].read_text().strip() == "source,line,reason"


def test_ingest_failure_writes_nothing(tmp_path):
    root = tmp_path / "ds"
    (root / "train" / "happy").mkdir(parents=True)
    (root / "train" / "happy" / "bad.png").write_bytes(b"not a png")
    (root / "train" / "happy" / "zero.png").write_bytes(b"")
    out = outputs(tmp_path)
    with pytest.raises(DatasetError, match="no image could be decoded.*2 failed"):
        run_ingest("folder", root, "", **out, workers=1, progress=False)
    bad_csv = fer_csv(tmp_path / "f.csv", [(1, "1 2", "Training")], header=("emotion", "pixelz", "Usage"))
    with pytest.raises(DatasetError, match="pixels"):
        run_ingest("fer2013_csv", bad_csv, "", **out, workers=1, progress=False)
    only_bad = fer_csv(tmp_path / "g.csv", [(1, "1 2", "Training")])
    with pytest.raises(DatasetError, match="no usable rows"):
        run_ingest("fer2013_csv", only_bad, "", **out, workers=1, progress=False)
    assert not (tmp_path / "out").exists()


def test_stage_cli(tmp_path, capsys):
    stage = load_stage("ingest")
    with pytest.raises(SystemExit):
        stage.main(["--help"])
    text = capsys.readouterr().out
    assert "fer2013_csv" in text and "ignore_missing" in text and "contact sheet" in text
    save(tmp_path / "ds" / "train" / "fear" / "a.png", pattern(96, 96))
    params = tmp_path / "params.yaml"
    params.write_text(f"dataset:\n  format: folder\n  path: {tmp_path / 'ds'}\n  root: ''\n  split: val\n"
                      f"ingest:\n  size: 24\n  workers: 1\n")
    o = tmp_path / "o"
    stage.main(["--params", str(params), "--out", str(o / "i.h5"), "--manifest", str(o / "m.csv"),
                "--rejects", str(o / "r.csv"), "--metrics", str(o / "m.json"), "--sheet", "", "--quiet"])
    assert read_h5(o / "i.h5")["images"].shape == (1, 24, 24)  # size from params; split key ignored
    assert sorted(p.name for p in o.iterdir()) == ["i.h5", "m.csv", "m.json", "r.csv"]  # --sheet '' 
    with pytest.raises(SystemExit):
        stage.main(["--params", str(params), "-S", "dataset.sort=true"])  # folder format takes no sort
    with pytest.raises(SystemExit):
        stage.main(["--params", str(params), "-S", "dataset.min_length=2"])  # nor min_length
    with pytest.raises(SystemExit):
        stage.main(["--params", str(params), "-S", "ingest.sise=32"])  # a misspelt ingest param
    stage.main(["--params", str(params), "-S", "ingest.size=16", "--out", str(o / "i.h5"),
                "--manifest", str(o / "m.csv"), "--rejects", str(o / "r.csv"), "--metrics", str(o / "m.json"),
                "--sheet", "", "--quiet"])
    assert read_h5(o / "i.h5")["images"].shape == (1, 16, 16)  # -S over params.yaml, from the root
    assert params.read_text().count("size: 24") == 1           # for this run only


def _ck_slice(tmp_path, sequences_dir, n: int = 6):
    """The first n real CK+ sequences copied into tmp_path/ck (frames/ + labels.csv): (their labels, the folder)."""
    labels = pd.read_csv(sequences_dir / "labels.csv").iloc[:n]
    ck = tmp_path / "ck"
    (ck / "frames").mkdir(parents=True)
    labels.to_csv(ck / "labels.csv", index=False)
    for seq in labels["sequence_id"]:
        shutil.copytree(sequences_dir / "frames" / seq, ck / "frames" / seq)
    return labels, ck


def test_stage_reads_a_dotted_section_and_reader_options(tmp_path, sequences_dir):
    """The sequence stages' ingest: params section sequence.dataset, its reader options, -S on the CLI."""
    labels, ck = _ck_slice(tmp_path, sequences_dir)
    (ck / "frames" / labels["sequence_id"][0] / sorted(os.listdir(ck / "frames" / labels["sequence_id"][0]))[0]).unlink()
    params = tmp_path / "params.yaml"
    params.write_text(f"dataset:\n  format: folder\n  path: nowhere\n"
                      f"sequence:\n  dataset:\n    format: ck_sequences\n    path: {ck}\n    root: ''\n"
                      f"    min_length: 4\n    every: 3\n"  # every: a video option, ignored for ck_sequences
                      f"ingest:\n  size: 32\n  workers: 1\n")
    o = tmp_path / "o"
    args = ["--params", str(params), "--section", "sequence.dataset", "--out", str(o / "i.h5"), "--manifest",
            str(o / "m.csv"), "--rejects", str(o / "r.csv"), "--metrics", str(o / "m.json"), "--sheet", "", "--quiet"]
    stage = load_stage("ingest")
    stage.main(args)
    rej = pd.read_csv(o / "r.csv")
    assert len(rej) == 1 and "too short: 3 frame(s) < min_length 4" in rej["reason"][0]   # from params
    man = pd.read_csv(o / "m.csv")
    assert man["sequence_id"].nunique() == 5 and read_h5(o / "i.h5")["images"].shape[1:] == (32, 32)
    stage.main(args + ["-S", "sequence.dataset.min_length=1"])                             # the CLI wins
    assert pd.read_csv(o / "m.csv")["sequence_id"].nunique() == 6 and len(pd.read_csv(o / "r.csv")) == 0
    with pytest.raises(SystemExit):
        stage.main(args + ["-S", "sequence.dataset.every=2"])  # ck_sequences takes no `every` (in params: ignored)
    with pytest.raises(SystemExit):
        stage.main(args + ["-S", "dataset.min_length=1"])      # the section this run does not read
    with pytest.raises(KeyError, match="no param sequence.nothing.format"):
        stage.main(args + ["--section", "sequence.nothing"])


# ------------------------------------------------------------------------------------------------
# real data

@needs_real
def test_real_fer2013_folder_walk():
    man, rej = read_folder(REAL_FER)
    assert len(man) == 31865 and len(rej) == 0  # README.md at the top level is not an entry
    assert man["split"].value_counts().to_dict() == {"train": 28322, "test": 3543}
    assert man["label_name"].value_counts()["disgust"] == 411 + 55
    assert man["id"].is_unique


@needs_real
def test_real_fer2013_slice_ingest_exact(tmp_path):
    root = tmp_path / "fer"
    picked = {}
    for split in ("train", "test"):
        for cls in ("disgust", "happy"):
            files = sorted((REAL_FER / split / cls).iterdir())[:20]
            (root / split / cls).mkdir(parents=True)
            for f in files:
                (root / split / cls / f.name).symlink_to(f)
                picked[f"{split}/{cls}/{f.stem}"] = f
    out = outputs(tmp_path)
    m = run_ingest("folder", root, "", **out, size=48, workers=2, progress=False)
    h = read_h5(out["out_images"])
    assert h["images"].shape == (80, 48, 48) and m["rejected"] == 0
    assert sorted(h["ids"].tolist()) == sorted(picked)
    man = pd.read_csv(out["out_manifest"])
    assert man["label_name"].value_counts().to_dict() == {"disgust": 40, "happy": 40}
    assert man["split"].value_counts().to_dict() == {"train": 40, "test": 40}
    assert m["classes"] == {"disgust": 40, "happy": 40}
    for i, id_ in enumerate(h["ids"]):
        with Image.open(picked[id_]) as im:
            np.testing.assert_array_equal(h["images"][i], np.asarray(im))
    assert read_attrs(out["out_images"])["classes"] == ["disgust", "happy"]


@needs_real
def test_worker_count_changes_no_output(tmp_path):
    """ingest.workers is left out of dvc.yaml (it changes no result): 1 and 2 workers write the same bytes of
    images, manifest and rejects, on real FER-2013 faces plus one file that does not decode."""
    root = tmp_path / "fer"
    for cls in ("angry", "happy", "surprise"):
        (root / "train" / cls).mkdir(parents=True)
        for f in sorted((REAL_FER / "train" / cls).iterdir())[:30]:
            (root / "train" / cls / f.name).symlink_to(f)
    (root / "train" / "happy" / "broken.png").write_bytes(b"not a png")
    written = []
    for workers in (1, 2):
        out = outputs(tmp_path / f"w{workers}")
        run_ingest("folder", root, "", **out, size=48, workers=workers, progress=False)
        written.append([read_h5(out["out_images"])["images"].tobytes(), read_h5(out["out_images"])["ids"].tolist(),
                        Path(out["out_manifest"]).read_bytes(), Path(out["out_rejects"]).read_bytes()])
    assert written[0] == written[1] and len(written[0][1]) == 90 and b"broken.png" in written[0][3]


def test_affectnet_folder_reads_training_and_validation_into_one_manifest(fer_dir, tmp_path):
    """A folder with AffectNet's training.csv and validation.csv: one ingest, splits train and val. The
    images are real FER-2013 faces laid out as AffectNet's Manually_Annotated_Images/<dir>/<file>; the
    CSV rows (boxes, valence/arousal) are generated, as no real AffectNet is here."""
    import shutil
    imgs = tmp_path / "Manually_Annotated_Images"
    code = {"neutral": 0, "happy": 1, "sad": 2, "angry": 6}
    lines = {"training.csv": [], "validation.csv": []}
    for name, split in (("training.csv", "train"), ("validation.csv", "test")):
        for cls, c in code.items():
            for f in sorted((fer_dir / split / cls).iterdir())[:3]:
                rel = f"{c}/{split}_{f.name}"
                (imgs / str(c)).mkdir(parents=True, exist_ok=True)
                shutil.copy(f, imgs / rel)
                lines[name].append(f"{rel},2,2,44,44,,{c},{0.1 * c - 0.3:.2f},0.25")
    lines["validation.csv"].append("0/absent.png,2,2,44,44,,9,0,0")                # code 9: uncertain
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,facial_landmarks,expression,valence,arousal\n"
    for name, rows in lines.items():
        (tmp_path / name).write_text(header + "\n".join(rows) + "\n")
    man, rej = read_dataset("affectnet", tmp_path, root=str(imgs))
    assert man["split"].value_counts().to_dict() == {"train": 12, "val": 12}
    assert set(man.loc[man["split"] == "val", "id"]) == {r.split(",")[0] for r in lines["validation.csv"][:-1]}
    assert rej["line"].tolist() == [14] and "uncertain" in rej["reason"].iloc[0]
    out = {k: str(tmp_path / f"out.{k}") for k in ("out", "manifest", "rejects", "metrics")}
    run_ingest("affectnet", str(tmp_path), str(imgs), out["out"], out["manifest"], out["rejects"], out["metrics"],
               None, size=40, workers=1, progress=False)
    packed = pd.read_csv(out["manifest"])
    assert len(packed) == 24 and set(packed["split"]) == {"train", "val"}
    (tmp_path / "validation.csv").unlink()
    with pytest.raises(DatasetError, match="holds training.csv and validation.csv; missing validation.csv"):
        read_dataset("affectnet", tmp_path)


def test_raf_db_list_on_real_faces(fer_dir, tmp_path):
    """RAF-DB's 1-based `name label` list (the Emotion SDK's format) over real FER-2013 faces saved under
    RAF-DB's names (the list is generated: no RAF-DB here): labels mapped, split from the name, aligned
    file names, bad lines as rejects; then ingested."""
    import shutil
    from ferpipe.data.readers import RAF_DB_CLASSES
    aligned = tmp_path / "Image" / "aligned"
    aligned.mkdir(parents=True)
    lines, want = [], {}
    for split in ("train", "test"):
        for k, cls in enumerate(["surprise", "fear", "happy", "sad", "angry", "neutral"]):
            f = sorted((fer_dir / split / cls).iterdir())[0]
            name = f"{split}_{k:05d}.jpg"
            shutil.copy(f, aligned / f"{split}_{k:05d}_aligned.jpg")
            lines.append(f"{name} {RAF_DB_CLASSES.index(cls) + 1}")
            want[name] = (split, cls)
    lst = tmp_path / "list_patition_label.txt"
    lst.write_text("\n".join(lines + ["train_00099.jpg 8", "extra_00001.jpg 1", "", "train_00100.jpg"]) + "\n")
    man, rej = read_dataset("raf_db", lst, root=str(aligned), aligned=True)
    assert {i: (s, c) for i, s, c in zip(man["id"], man["split"], man["label_name"])} == want
    assert man["source"].str.endswith("_aligned.jpg").all()
    assert rej["line"].tolist() == [13, 14, 16]
    assert "not 1..7" in rej["reason"].iloc[0] and "split" in rej["reason"].iloc[1] and "fields" in rej["reason"].iloc[2]
    out = {k: str(tmp_path / f"out.{k}") for k in ("out", "manifest", "rejects", "metrics")}
    run_ingest("raf_db", str(lst), str(aligned), out["out"], out["manifest"], out["rejects"], out["metrics"], None,
               size=48, workers=1, options={"aligned": True}, progress=False)
    assert len(pd.read_csv(out["manifest"])) == 12


def test_rows_rejected_after_decoding_leave_the_streamed_images_file(tmp_path, sequences_dir):
    """ingest appends decoded blocks to images.h5 as they come (ferpipe.store.h5_writer); a sequence found
    too short only after decoding is then cut out of the file (H5Writer.keep): row i of images.h5 is still
    manifest row i and its id. Real CK+ frames, decode blocks of 4 rows (one worker) across the cut."""
    labels, ck = _ck_slice(tmp_path, sequences_dir)
    cut = ck / "frames" / labels["sequence_id"][2]
    bad = sorted(cut.iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:60])  # does not decode: its sequence falls below min_length after decoding
    o = tmp_path / "o"
    metrics = run_ingest("ck_sequences", ck, "", o / "i.h5", o / "m.csv", o / "r.csv", None, None, size=40,
                         workers=1, options={"min_length": int(labels["frame_count"][2])}, progress=False)
    man = pd.read_csv(o / "m.csv", dtype={"id": str, "sequence_id": str})
    got = read_h5(o / "i.h5")
    assert labels["sequence_id"][2] not in set(man["sequence_id"]) and man["sequence_id"].nunique() == 5
    assert metrics["images"] == len(man) == len(got["images"]) and list(got["ids"]) == list(man["id"])
    for row, source in enumerate(man["source"]):
        np.testing.assert_array_equal(got["images"][row], decode_image(source, 40))
