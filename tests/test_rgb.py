"""RGB input (ingest.color: rgb, the Emotion SDK's colour faces): ingest -> gray48 -> landmarks/guides ->
train -> evaluate -> recognize -> export, on real FER-2013 faces.

FER-2013 and the CK+ frames here are grayscale (no colour image in ../shared/data), so two kinds of data:
real FER-2013 faces taken as RGB (three equal channels: everything must equal the gray pipeline), and the
same real faces tinted (R, G, B made different per image and per channel) to prove the channel order is
kept RGB end to end and that the models really take three channels.
"""
from __future__ import annotations

import shutil

import h5py
import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import REPO, landmarks_and_soft_guide, load_stage
from ferpipe.data.tensors import load_data
from ferpipe.export import export_model
from ferpipe.imaging import gray_images, resize_batch, rgb_to_gray
from ferpipe.models import MODEL_NAMES, build_model
from ferpipe.models.checkpoint import load_checkpoint
from ferpipe.recognize import Recognizer

PARAMS = str(REPO / "params.yaml")
CLASSES = ("angry", "happy", "neutral", "surprise")


def tint(gray: np.ndarray, k: int) -> np.ndarray:
    """A gray face as an RGB image whose three channels differ (gains change with k): R the face,
    G darker, B a lifted, flattened copy."""
    g = gray.astype(np.float64)
    rgb = np.stack([g, g * (0.5 + 0.04 * (k % 6)), 40 + g * (0.25 + 0.05 * (k % 4))], axis=-1)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def copy_slice(fer_dir, dst, per_split, tinted: bool) -> None:
    """The first images of 4 classes of FER-2013, as they are or tinted (RGB PNG)."""
    k = 0
    for split, n in per_split.items():
        for c in CLASSES:
            (dst / split / c).mkdir(parents=True)
            for f in sorted((fer_dir / split / c).iterdir())[:n]:
                if tinted:
                    Image.fromarray(tint(np.asarray(Image.open(f).convert("L")), k)).save(dst / split / c / f.name)
                    k += 1
                else:
                    shutil.copy(f, dst / split / c / f.name)


def ingest(src, out, *extra):
    load_stage("ingest").main(["--params", PARAMS, "-S", "dataset.format=folder", "-S", f"dataset.path={src}",
                               "--out", f"{out}/ingest/images.h5", "--manifest", f"{out}/ingest/manifest.csv",
                               "--rejects", f"{out}/ingest/rejects.csv", "--metrics", f"{out}/ingest.json",
                               "--sheet", f"{out}/ingest.png", "--quiet", "-S", "ingest.workers=1", *extra])


def gray48(out, size):
    load_stage("gray48").main(["--params", PARAMS, "--images", f"{out}/ingest/images.h5",
                               "--out", f"{out}/gray48/images.h5", "--sheet", f"{out}/gray48.png",
                               "-S", f"gray48.size={size}"])


def read(path, *names):
    with h5py.File(path, "r") as f:
        return [f[n][()] for n in names], dict(f.attrs)


# ----------------------------------------------------------------------------------- the one helper
def test_rgb_to_gray_is_the_gray_decoding_gives(fer_dir):
    """rgb_to_gray is PIL's luma (what ingest's gray decoding uses) bit for bit, and gives an equal-channel
    image its channel back; gray_images leaves a gray array alone."""
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    assert np.array_equal(rgb_to_gray(rgb), np.asarray(Image.fromarray(rgb).convert("L")))
    face = np.asarray(Image.open(sorted((fer_dir / "train" / "happy").iterdir())[0]).convert("L"))
    tinted = tint(face, 3)
    assert np.array_equal(rgb_to_gray(tinted), np.asarray(Image.fromarray(tinted).convert("L")))
    assert np.array_equal(rgb_to_gray(np.repeat(face[..., None], 3, -1)), face)
    assert gray_images(face[None]) is not None and np.array_equal(gray_images(face[None]), face[None])
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_gray(rgb.astype(np.float32))


# ------------------------------------------------------------------ real FER-2013 as RGB: equal channels
@pytest.fixture(scope="module")
def gray_and_rgb(fer_dir, tmp_path_factory):
    """One real FER-2013 slice through ingest (size 40), gray48 (48), landmarks and the soft guide, once
    gray and once with ingest.color rgb."""
    root = tmp_path_factory.mktemp("rgbfer")
    copy_slice(fer_dir, root / "fer", {"train": 6}, tinted=False)
    for color in ("gray", "rgb"):
        ingest(root / "fer", root / color, "-S", f"ingest.color={color}", "-S", "ingest.size=40")
        gray48(root / color, 48)
        landmarks_and_soft_guide(PARAMS, root / color)
    return root


def test_gray_faces_under_rgb_are_three_equal_channels_and_the_gray_pipeline(gray_and_rgb):
    (g_img, g_ids), g_attrs = read(gray_and_rgb / "gray/ingest/images.h5", "images", "ids")
    (c_img, c_ids), c_attrs = read(gray_and_rgb / "rgb/ingest/images.h5", "images", "ids")
    assert g_img.shape == (24, 40, 40) and c_img.shape == (24, 40, 40, 3) and c_img.dtype == np.uint8
    assert "color" not in g_attrs and c_attrs["color"] == "rgb"   # gray files are what they always were
    assert np.array_equal(c_ids, g_ids)
    for ch in range(3):   # the FER PNGs are gray: each channel is the gray ingest, resized (area) alike
        assert np.array_equal(c_img[..., ch], g_img)
    (g48,), g48_attrs = read(gray_and_rgb / "gray/gray48/images.h5", "images")
    (c48,), c48_attrs = read(gray_and_rgb / "rgb/gray48/images.h5", "images")
    assert c48.shape == (24, 48, 48, 3) and c48_attrs["color"] == "rgb" and c48_attrs["ingest_size"] == 40
    for ch in range(3):   # and resized (cubic) alike by gray48
        assert np.array_equal(c48[..., ch], g48)


def test_landmarks_and_guides_on_rgb_equal_those_on_its_gray(gray_and_rgb):
    """The landmarks and guide stages see the gray of RGB images: on these faces exactly the gray run's."""
    names = ("landmarks", "found", "method", "ids")
    gray, _ = read(gray_and_rgb / "gray/landmarks/landmarks.h5", *names)
    rgb, _ = read(gray_and_rgb / "rgb/landmarks/landmarks.h5", *names)
    assert gray[1].sum() >= 12   # most of these faces are found: the equality is not of fallbacks
    for a, b in zip(gray, rgb):
        assert np.array_equal(a, b)
    (g_soft,), _ = read(gray_and_rgb / "gray/guides/soft.h5", "images")
    (c_soft,), _ = read(gray_and_rgb / "rgb/guides/soft.h5", "images")
    assert c_soft.shape == (24, 48, 48) and np.array_equal(g_soft, c_soft)


def test_face_crop_cuts_colour_faces_where_it_cuts_gray_ones(tmp_path):
    """dataset.face_crop under rgb: the same face found (on the gray) and the same alignment, cut from the
    colour photo: its gray is the gray crop but for the rounding of the warp."""
    from skimage import data as skdata

    root = tmp_path / "photos"
    (root / "train" / "happy").mkdir(parents=True)
    Image.fromarray(skdata.astronaut()).save(root / "train/happy/astronaut.png")
    for color in ("gray", "rgb"):
        ingest(root, tmp_path / color, "-S", "dataset.face_crop=true", "-S", f"ingest.color={color}")
    (gray,), _ = read(tmp_path / "gray/ingest/images.h5", "images")
    (rgb,), attrs = read(tmp_path / "rgb/ingest/images.h5", "images")
    boxes = [pd.read_csv(tmp_path / c / "ingest/manifest.csv")[["face_x0", "face_y0", "face_x1", "face_y1"]].to_numpy()
             for c in ("gray", "rgb")]
    assert gray.shape == (1, 48, 48) and rgb.shape == (1, 48, 48, 3) and attrs["face_crop"] and attrs["color"] == "rgb"
    assert np.array_equal(boxes[0], boxes[1])
    assert not np.array_equal(rgb[..., 0], rgb[..., 2])          # colour, not a stacked gray
    assert np.abs(rgb_to_gray(rgb).astype(int) - gray).max() <= 2


# --------------------------------------------------------- tinted real faces: channel order, train, API
@pytest.fixture(scope="module")
def rgb_run(fer_dir, tmp_path_factory):
    """Tinted FER-2013 faces (train 12, test 5 of 4 classes) with ingest.color rgb at ingest size 40 ->
    gray48 48 -> landmarks, soft guide -> split (2 folds) -> vgg and soft trained one epoch -> evaluate."""
    root = tmp_path_factory.mktemp("rgbrun")
    copy_slice(fer_dir, root / "fer", {"train": 12, "test": 5}, tinted=True)
    d = root / "data"
    ingest(root / "fer", d, "-S", "ingest.color=rgb", "-S", "ingest.size=40")
    gray48(d, 48)
    landmarks_and_soft_guide(PARAMS, d)
    load_stage("split").main(["--params", PARAMS, "--manifest", f"{d}/ingest/manifest.csv",
                              "--out", f"{d}/split/split.csv", "--summary", f"{d}/split.json", "-S", "task=classes",
                              "-S", "split.folds=2"])
    for model in ("vgg", "soft"):
        out = root / model
        extra = ["-S", "train.model_kwargs={width: 4}"] if model == "vgg" else []
        load_stage("train").main(["--params", PARAMS, "-S", f"model={model}", "--split", f"{d}/split/split.csv",
                                  "--gray48", f"{d}/gray48/images.h5", "--guides", f"{d}/guides",
                                  "--models", str(out / "models"), "--metrics", str(out / "train.json"), "--live", "",
                                  "--curves", "", "-S", "train.folds=[0]", "-S", "train.max_epochs=1",
                                  "-S", "train.threads=1", "-S", "train.log_every=0", "-S", "train.progress=false",
                                  *extra])
        load_stage("evaluate").main(["--params", PARAMS, "--models", str(out / "models"),
                                     "--split", f"{d}/split/split.csv", "--gray48", f"{d}/gray48/images.h5",
                                     "--guides", f"{d}/guides", "--metrics", str(out / "eval.json"),
                                     "--predictions", str(out / "pred.csv"), "--confusion", "",
                                     "--errors", str(out / "errors.png"), "--results", "", "-S", "evaluate.threads=1"])
    split = pd.read_csv(f"{d}/split/split.csv", keep_default_na=False)
    manifest = pd.read_csv(f"{d}/ingest/manifest.csv", keep_default_na=False)
    source = dict(zip(manifest["id"], manifest["source"]))
    return root, [source[i] for i in split.loc[split["split"] == "test", "id"]]


def test_channel_order_stays_rgb_from_the_file_to_the_batch(rgb_run):
    root, _ = rgb_run
    d = root / "data"
    (images, ids), _ = read(d / "ingest/images.h5", "images", "ids")
    manifest = pd.read_csv(d / "ingest/manifest.csv", keep_default_na=False)
    assert list(manifest["id"]) == [i.decode() if isinstance(i, bytes) else i for i in ids]
    # ingest size 40 < 48: an area resize, per channel, of the file's R, G and B planes in that order
    files = np.stack([np.asarray(Image.open(s)) for s in manifest["source"]])
    assert files.shape[-1] == 3 and not np.array_equal(files[..., 0], files[..., 1])
    for ch in range(3):
        assert np.array_equal(images[..., ch], resize_batch(files[..., ch], 40))
    (g48,), _ = read(d / "gray48/images.h5", "images")
    for ch in range(3):
        assert np.array_equal(g48[..., ch], resize_batch(images[..., ch], 48))
    # the batch: the image's R, G, B planes, then the guide
    data = load_data(d / "split/split.csv", "soft", None, d / "gray48/images.h5", d / "guides",
                     splits=("train", "test"))
    assert data.spec.image_channels == 3 and data.spec.channels == 4 and data.pixels.shape[1:] == (4, 48, 48)
    (soft, soft_ids), _ = read(d / "guides/soft.h5", "images", "ids")
    rows = data.table["index"].to_numpy()
    pixels = data.pixels.numpy()
    assert np.array_equal(pixels[:, :3], g48[rows].transpose(0, 3, 1, 2)) and np.array_equal(pixels[:, 3], soft[rows])
    image, guide, _ = data.batch(torch.arange(5))
    assert image.shape == (5, 3, 48, 48) and guide.shape == (5, 1, 48, 48)
    assert torch.allclose(image[:, 0] * 255, torch.from_numpy(g48[rows[:5], ..., 0]).float())


def test_rgb_runs_train_three_channel_models_and_record_it(rgb_run):
    root, _ = rgb_run
    for model, channels in (("vgg", 3), ("soft", 4)):
        net, info = load_checkpoint(root / model / "models/fold0.pt")
        spec = info["meta"]["input"]
        assert spec["image_channels"] == 3 and len(spec["mean"]) == len(spec["std"]) == channels
        assert len(set(np.round(spec["mean"][:3], 6))) == 3   # per-channel statistics of the tinted faces
        assert info["model_kwargs"]["in_channels"] == 3
        first = net.features[0] if model == "vgg" else net.classifier.conv1
        assert first.in_channels == 3
        if model == "soft":
            assert net.localization.features[0].in_channels == 1   # the guided STN's net sees the guide map
        assert (root / model / "eval.json").is_file()
        sheet = cv2.imread(str(root / model / "errors.png"))            # the errors sheet shows the faces in colour
        assert sheet is not None and np.abs(sheet[..., 2].astype(int) - sheet[..., 1]).max() > 60


@pytest.mark.parametrize("model", ["vgg", "soft"])
def test_recognize_on_rgb_equals_the_evaluate_stage(rgb_run, model):
    """An RGB checkpoint gets colour crops: on the same test images the API gives the evaluate stage's
    probabilities (a guided model's map made from the landmark cascade on the crops' gray)."""
    root, test_paths = rgb_run
    want = pd.read_csv(root / model / "pred.csv")
    classes = [c[5:] for c in want.columns if c.startswith("prob_")]
    rec = Recognizer(root / model / "models", batch_size=512)
    assert rec.color == "rgb" and rec.crop_shape() == (40, 40, 3)
    got = rec.recognize_batch(test_paths, crops=True)
    assert len(got) == len(want) == len(test_paths) == 20
    assert np.abs(got[classes].to_numpy() - want[[f"prob_{c}" for c in classes]].to_numpy()).max() < 1e-5


def test_rgb_model_finds_faces_on_gray_and_cuts_them_in_colour(rgb_run, tmp_path):
    """In a colour photo an RGB model's faces are found on the gray (the one gray decoding gives) and
    aligned as a gray model's, and cut from the colour image."""
    from skimage import data as skdata

    from ferpipe.faces.detect import align_face

    root, _ = rgb_run
    photo = tmp_path / "astronaut.png"
    Image.fromarray(skdata.astronaut()).save(photo)
    rec = Recognizer(root / "vgg" / "models")
    result = rec.recognize(photo)
    on_gray = rec.detector.detect(np.asarray(Image.open(photo).convert("L")))
    assert len(result.faces) == len(on_gray) >= 1 and np.allclose(result.faces[0].box, on_gray[0].box)
    cut = align_face(skdata.astronaut(), on_gray[0].landmarks, 40, rec.margin)
    assert cut.shape == (40, 40, 3)
    assert np.allclose(rec.predict(cut[None])[0], [result.faces[0].probs[c] for c in rec.classes], atol=1e-6)
    # an array in OpenCV's BGR order is the same photo: the same faces and probabilities
    from_array = rec.recognize(skdata.astronaut()[..., ::-1].copy())
    assert [f.probs for f in from_array.faces] == [f.probs for f in result.faces]


def test_export_of_an_rgb_model_takes_three_channel_pixels(rgb_run, tmp_path):
    root, test_paths = rgb_run
    rec = Recognizer(root / "vgg" / "models")
    crops = np.stack([np.asarray(Image.open(p).resize((40, 40), Image.BOX)) for p in test_paths[:8]])
    pixels = rec.model_inputs(crops)[0]
    assert pixels.shape == (8, 3, 48, 48)
    result = export_model(root / "vgg/models/fold0.pt", "onnx", tmp_path / "m.onnx", check=pixels)
    assert result["max_abs_diff"] < 1e-4


def test_evaluate_refuses_an_rgb_model_on_gray_images(rgb_run, tmp_path):
    root, _ = rgb_run
    d = root / "data"
    with h5py.File(d / "gray48/images.h5", "r") as f, h5py.File(tmp_path / "gray.h5", "w") as g:
        g["images"] = gray_images(f["images"][()])
        g["ids"] = f["ids"][()]
    with pytest.raises(ValueError, match="3-channel images.*1-channel"):
        load_stage("evaluate").main(["--params", PARAMS, "--models", str(root / "vgg/models"),
                                     "--split", f"{d}/split/split.csv", "--gray48", str(tmp_path / "gray.h5"),
                                     "--guides", f"{d}/guides", "--metrics", "", "--predictions", "",
                                     "--confusion", "", "--errors", "", "--results", ""])


# ----------------------------------------------------------------------------------- models, params
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ("vgg19", "vgg19_bn", "resnet152", "rmn")])
def test_every_registry_model_takes_three_channels(name):
    torch.manual_seed(0)
    net = build_model(name, 7, in_channels=3).eval()
    side = 75 if name == "inception_v3" else 48
    x, guide = torch.rand(2, 3, side, side), torch.rand(2, 1, side, side)
    with torch.no_grad():
        out = net(x, guide)
    assert out.shape == (2, 7)
    if name in ("baseline", "resnet18", "vgg"):   # a gray batch is not silently taken by an RGB model
        with pytest.raises((ValueError, RuntimeError)):
            net(x[:, :2], guide)


def test_bad_color_is_a_one_line_error(fer_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        ingest(fer_dir, tmp_path, "-S", "ingest.color=cmyk")
    assert e.value.code == 2 and "ingest.color must be one of gray, rgb, got 'cmyk'" in capsys.readouterr().err


def test_emotion_sdk_recipe_is_rgb_at_100_px():
    """The recipe composes to RGB at 100 px end to end and a ResNet-18 that takes it."""
    import yaml

    from ferpipe.params import compose_params

    p = yaml.safe_load(compose_params(REPO / "conf", ["recipe=emotion_sdk"]))
    assert p["recipe"] == "emotion_sdk" and p["ingest"]["color"] == "rgb"
    assert p["ingest"]["size"] == p["gray48"]["size"] == p["train"]["model_kwargs"]["in_size"] == 100
    assert p["model"] == "resnet18" and p["landmarks"]["passes"] == []
    net = build_model(p["model"], 7, in_channels=3, **p["train"]["model_kwargs"]).eval()
    with torch.no_grad():
        assert net(torch.rand(1, 3, 100, 100)).shape == (1, 7)
    assert yaml.safe_load(compose_params(REPO / "conf"))["ingest"]["color"] == "gray"   # the default stays gray
