"""The front door: ferpipe.recognize (photos, crops, videos), the ferpipe command, export.

Real faces throughout: scikit-image's astronaut photo, FER-2013 images from ../shared/data, and a
video assembled from CK+ frames of ../shared/data/sequences placed on a larger canvas.
"""
from __future__ import annotations

import io
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from skimage import data as skdata

from conftest import REPO, landmarks_and_soft_guide, load_stage
from ferpipe.export import ExportError, export_model, run_exported
from ferpipe.models import MODEL_NAMES, MODEL_SPECS, build_model
from ferpipe.models.checkpoint import save_checkpoint
from ferpipe.models.inputs import InputSpec
from ferpipe.recognize import BUNDLED, IoUTracker, Recognizer, RecognizeError, TrackLabeler, draw, results_table

FER7 = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
ASTRONAUT_FACE = (150, 50, 300, 200)  # a box around the astronaut's face in the 512x512 photo (x0, y0, x1, y1)


@pytest.fixture(scope="module")
def fer() -> Recognizer:
    return Recognizer()


@pytest.fixture(scope="module")
def astronaut_bgr() -> np.ndarray:
    return cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)


def inside(box, outer) -> bool:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return outer[0] < cx < outer[2] and outer[1] < cy < outer[3]


# ------------------------------------------------------------------------------------ photos

def test_bundled_model_finds_and_reads_the_astronaut(fer, astronaut_bgr, tmp_path):
    assert BUNDLED.is_file() and BUNDLED.stat().st_size < 5_000_000
    assert fer.classes == FER7
    res = fer.recognize(astronaut_bgr)
    assert not res.failed and len(res.faces) == 1
    face = res.faces[0]
    assert inside(face.box, ASTRONAUT_FACE) and face.confidence > 0
    assert face.landmarks.shape == (68, 2)
    assert ((face.landmarks >= [140, 40]) & (face.landmarks <= [310, 230])).all()
    assert face.label == "happy" and face.probability > 0.5           # she smiles
    assert sum(face.probs.values()) == pytest.approx(1.0, abs=1e-6)
    # the same photo as a file, as bytes, and rotated 90 degrees by its EXIF tag
    path = tmp_path / "astronaut.jpg"
    cv2.imwrite(str(path), astronaut_bgr)
    for source in (path, path.read_bytes()):
        again = fer.recognize(source)
        assert len(again.faces) == 1 and again.faces[0].label == "happy"
    rotated = Image.fromarray(skdata.astronaut()).rotate(90, expand=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: the viewer rotates it 90 degrees clockwise (undoing the CCW rotate)
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    r = fer.recognize(tmp_path / "exif.jpg")
    assert len(r.faces) == 1 and inside(r.faces[0].box, ASTRONAUT_FACE)


def test_a_photo_without_a_face_is_an_explicit_empty_result(fer, astronaut_bgr):
    res = fer.recognize(astronaut_bgr[350:, 350:])    # a corner of the photo: no face
    assert res.faces == [] and res.reason == "no face found" and not res.failed
    table = results_table([res], fer.classes)
    assert len(table) == 1 and table.loc[0, "success"] == 0 and table.loc[0, "reason"] == "no face found"


def test_every_image_kind_decodes(fer, astronaut_bgr, tmp_path):
    rgb = skdata.astronaut()
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    Image.fromarray(gray).save(tmp_path / "gray.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray((gray.astype(np.uint16) * 257)).save(tmp_path / "16bit.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    results = fer.recognize_many(sorted(tmp_path.iterdir()))
    assert [len(r.faces) for r in results] == [1, 1, 1, 1], [r.reason for r in results]
    assert all(r.faces[0].label == "happy" for r in results)


def test_bad_inputs_give_reasons_not_tracebacks(fer, astronaut_bgr, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    ok, jpg = cv2.imencode(".jpg", astronaut_bgr)
    (tmp_path / "truncated.jpg").write_bytes(jpg.tobytes()[:3000])
    Image.new("L", (20000, 20000)).save(tmp_path / "bomb.png")     # 400 MP: PIL's bomb guard refuses it
    results = {Path(r.input).name: r for r in fer.recognize_many(sorted(tmp_path.iterdir()))}
    assert all(r.failed and not r.faces for r in results.values())
    assert results["empty.png"].reason == "empty file (0 bytes)"
    assert results["text.jpg"].reason == "not a recognised image format"
    assert results["truncated.jpg"].reason.startswith(("truncated", "corrupt"))
    assert "too large" in results["bomb.png"].reason
    wrong = fer.recognize(np.zeros((10, 10), np.float32))
    assert wrong.failed and "uint8" in wrong.reason and wrong.input == "<array>"


def test_draw_marks_the_face(fer, astronaut_bgr):
    res = fer.recognize(astronaut_bgr)
    out = draw(astronaut_bgr, res)
    assert out.shape == astronaut_bgr.shape and (out != astronaut_bgr).any()
    x0, y0, x1, y1 = (int(v) for v in res.faces[0].box)
    assert (out[y0:y1, x0:x1] != astronaut_bgr[y0:y1, x0:x1]).any()      # box and landmarks drawn
    assert (out[400:, 400:] == astronaut_bgr[400:, 400:]).all()           # far from the face: untouched


# ------------------------------------------------------------------------- crops, batch, models

def test_crops_on_real_fer_test_images(fer, fer_dir):
    files = [sorted((fer_dir / "test" / c).iterdir())[:6] for c in ("happy", "surprise", "neutral")]
    files = [f for group in files for f in group]
    table = fer.recognize_batch(files, crops=True)
    assert list(table["input"]) == [str(f) for f in files] and (table["success"] == 1).all()
    assert list(table.columns[:4]) == ["input", "frame", "face_id", "timestamp"]
    assert {"x_0", "y_67", "FaceRectWidth", "label", "probability", *FER7} <= set(table.columns)
    assert np.allclose(table[FER7].sum(axis=1), 1.0)
    assert (table["FaceRectWidth"] == 48).all()
    truth = [f.parent.name for f in files]
    assert (table["label"] == truth).mean() >= 0.6    # the bundled model reads 66% of PublicTest


@pytest.fixture(scope="module")
def fer_run(fer_dir, tmp_path_factory):
    """A tiny real pipeline by hand: FER-2013 slice -> ingest, gray48, landmarks, soft guide, split
    (7 classes) -> vgg and soft trained one epoch -> evaluate (predictions CSV, tta 0 and 2)."""
    root = tmp_path_factory.mktemp("ferrun")
    for split, n in (("train", 12), ("test", 5)):
        for c in ("angry", "happy", "neutral", "surprise"):
            dst = root / "fer" / split / c
            dst.mkdir(parents=True)
            for f in sorted((fer_dir / split / c).iterdir())[:n]:
                shutil.copy(f, dst / f.name)
    d = root / "data"
    params = str(REPO / "params.yaml")
    load_stage("ingest").main(["--params", params, "-S", "dataset.format=folder", "-S", f"dataset.path={root / 'fer'}",
                               "--out", f"{d}/ingest/images.h5", "--manifest", f"{d}/ingest/manifest.csv",
                               "--rejects", f"{d}/ingest/rejects.csv", "--metrics", f"{d}/ingest.json",
                               "--sheet", "", "--quiet", "-S", "ingest.workers=1"])
    load_stage("gray48").main(["--params", params, "--images", f"{d}/ingest/images.h5",
                               "--out", f"{d}/gray48/images.h5", "--sheet", ""])
    landmarks_and_soft_guide(params, d)
    load_stage("split").main(["--params", params, "--manifest", f"{d}/ingest/manifest.csv",
                              "--out", f"{d}/split/split.csv", "--summary", f"{d}/split.json", "-S", "task=classes",
                              "-S", "split.folds=2"])
    runs = {}
    for model in ("vgg", "soft"):
        out = root / model
        extra = ["-S", "train.model_kwargs={width: 4}"] if model == "vgg" else []
        load_stage("train").main(["--params", params, "-S", f"model={model}", "--split", f"{d}/split/split.csv",
                                  "--gray48", f"{d}/gray48/images.h5", "--guides", f"{d}/guides",
                                  "--models", str(out / "models"), "--metrics", "", "--live", "", "--curves", "",
                                  "-S", "train.folds=[0]", "-S", "train.max_epochs=1", "-S", "train.threads=1",
                                  "-S", "train.log_every=0", "-S", "train.progress=false", *extra])
        for tta in (0, 2, "tencrop"):
            setting = ["-S", "evaluate.tta_mode=tencrop"] if tta == "tencrop" else ["-S", f"evaluate.tta={tta}"]
            load_stage("evaluate").main(["--params", params, "--models", str(out / "models"),
                                         "--split", f"{d}/split/split.csv", "--gray48", f"{d}/gray48/images.h5",
                                         "--guides", f"{d}/guides", "--metrics", "",
                                         "--predictions", str(out / f"pred{tta}.csv"), "--confusion", "",
                                         "--errors", "", "--results", "", *setting, "-S", "evaluate.threads=1"])
        runs[model] = out
    split = pd.read_csv(f"{d}/split/split.csv", keep_default_na=False)
    manifest = pd.read_csv(f"{d}/ingest/manifest.csv", keep_default_na=False)
    test_ids = split.loc[split["split"] == "test", "id"].tolist()
    source = dict(zip(manifest["id"], manifest["source"]))
    return runs, [source[i] for i in test_ids]


@pytest.mark.parametrize("model", ["vgg", "soft"])
@pytest.mark.parametrize("tta", [0, 2, "tencrop"])
def test_probabilities_equal_the_evaluate_stage(fer_run, model, tta):
    """The checkpoint's meta decides every preprocessing step: on the same PublicTest images the API
    gives the evaluate stage's probabilities (a guided model's map made from the landmark cascade)."""
    runs, test_paths = fer_run
    want = pd.read_csv(runs[model] / f"pred{tta}.csv")
    classes = [c[5:] for c in want.columns if c.startswith("prob_")]
    rec = (Recognizer(runs[model] / "models", tta_mode="tencrop", batch_size=512) if tta == "tencrop" else
           Recognizer(runs[model] / "models", tta=tta, batch_size=512))
    assert rec.classes == classes
    if model == "soft":
        assert rec.members[0].preprocess["landmarks"]["size"] == 96
        assert rec.members[0].preprocess["guides"]["soft"]["threshold"] == 38
    got = rec.recognize_batch(test_paths, crops=True)
    assert len(got) == len(want)
    assert np.abs(got[classes].to_numpy() - want[[f"prob_{c}" for c in classes]].to_numpy()).max() < 1e-5
    if tta == "tencrop":  # another prediction than the plain one
        plain = pd.read_csv(runs[model] / "pred0.csv")
        assert np.abs(plain[[f"prob_{c}" for c in classes]].to_numpy() - want[[f"prob_{c}" for c in classes]].to_numpy()).max() > 1e-4


def test_loading_models_and_their_errors(fer_run, tmp_path):
    runs, _ = fer_run
    folder = Recognizer(runs["vgg"] / "models")
    single = Recognizer(runs["vgg"] / "models" / "fold0.pt")
    assert len(folder.members) == 1 and folder.classes == single.classes
    both = Recognizer([runs["vgg"] / "models", runs["soft"] / "models"])
    assert len(both.members) == 2
    with pytest.raises(RecognizeError, match="classes .* differ"):
        Recognizer([runs["vgg"] / "models", "bundled"])            # 4 classes vs FER's 7
    with pytest.raises(RecognizeError, match="not found"):
        Recognizer(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"definitely not a checkpoint")
    with pytest.raises(RecognizeError, match="not a ferpipe checkpoint"):
        Recognizer(tmp_path / "junk.pt")
    torch.save(build_model("vgg", 3).state_dict(), tmp_path / "plain.pt")
    with pytest.raises(RecognizeError, match="plain state_dict"):
        Recognizer(tmp_path / "plain.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": "vgg", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(RecognizeError, match="would run code"):
        Recognizer(tmp_path / "evil.pt")
    payload = torch.load(runs["vgg"] / "models" / "fold0.pt", weights_only=True)
    payload["model"] = "baseline"                                  # a checkpoint of another model
    torch.save(payload, tmp_path / "other.pt")
    with pytest.raises(RecognizeError, match="do not fit a 'baseline' model"):
        Recognizer(tmp_path / "other.pt")
    empty = tmp_path / "empty_models"
    empty.mkdir()
    with pytest.raises(RecognizeError, match="no checkpoints"):
        Recognizer(empty)


# ------------------------------------------------------------------------------------------ video

def ck_video(path: Path, sequences_dir: Path, seqs=("S010_006", "S010_002"), repeat: int = 5) -> list[str]:
    """CK+ frames (48 px) upscaled to 200 px on a 640x480 canvas, drifting right; 25 fps.
    Returns each written frame's expression: the sequence's label, "neutral" for its first CK+ frame."""
    labels = dict(pd.read_csv(sequences_dir / "labels.csv")[["sequence_id", "label"]].values)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 25, (640, 480))
    out, k = [], 0
    for s in seqs:
        for f in sorted((sequences_dir / "frames" / s).iterdir()):
            label = "neutral" if f.stem.endswith("_00000001") else labels[s]
            face = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (200, 200), interpolation=cv2.INTER_CUBIC)
            for _ in range(repeat):
                canvas = np.full((480, 640), 110, np.uint8)
                x, y = 150 + 3 * k, 120 + k % 7
                canvas[y:y + 200, x:x + 200] = face
                writer.write(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
                out.append(label)
                k += 1
    writer.release()
    return out


def test_video_tracks_one_face_through_ck_frames(fer, sequences_dir, tmp_path):
    labels = ck_video(tmp_path / "ck.mp4", sequences_dir)
    table = fer.recognize_video(tmp_path / "ck.mp4")
    assert list(table["frame"]) == list(range(len(labels)))
    assert table["timestamp"].to_numpy() == pytest.approx(np.arange(len(labels)) / 25.0)
    assert table["success"].mean() >= 0.9
    assert table.loc[table["success"] == 1, "face_id"].nunique() == 1       # one identity throughout
    found = table[table["success"] == 1]
    happy = found[np.array(labels)[found["frame"]] == "happy"]
    assert (happy["label"] == "happy").mean() >= 0.8
    every = fer.recognize_video(tmp_path / "ck.mp4", every=3, max_frames=4)
    assert list(every["frame"]) == [0, 3, 6, 9]


def test_broken_videos_are_one_line_errors(fer, tmp_path):
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.avi").write_bytes(b"RIFF" + bytes(1000))
    writer = cv2.VideoWriter(str(tmp_path / "zero.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 25, (64, 64))
    writer.release()                                            # no frame written
    for name in ("empty.mp4", "junk.avi", "zero.mp4", "missing.mp4"):
        with pytest.raises(RecognizeError, match=name):
            fer.recognize_video(tmp_path / name)


def test_track_labels_repeat_train_sequence(demo_project, fer, tmp_path):
    """A sequence model on a face track gives train_sequence --test-only's probabilities for the same
    frames (the CNN, layer and standardization of its features file), and one label per track."""
    from ferpipe.sequences.train import run_test_only
    from ferpipe.store import read_h5

    root = demo_project.root
    model = root / "data/sequences/model.pt"
    labeler = TrackLabeler(model, root=root)
    run_test_only(model, root / "data/sequences/features.h5", tmp_path / "test_only.h5")
    want = read_h5(tmp_path / "test_only.h5")
    frames = read_h5(root / "data/sequences/ingest/images.h5", ["images", "ids"])
    manifest = pd.read_csv(root / "data/sequences/ingest/manifest.csv", keep_default_na=False)
    row = {i: k for k, i in enumerate(frames["ids"])}
    for k, sid in enumerate(want["sequence_id"]):
        ids = manifest[manifest["sequence_id"] == sid].sort_values("frame_index")["id"]
        got = labeler.probabilities(frames["images"][[row[i] for i in ids]])
        assert np.abs(got - want["outputs"][k]).max() < 1e-5
    # on a video: the demo sequence's frames on a canvas
    seq = sorted((root / "data/demo_sequences/frames").iterdir())[0]
    writer = cv2.VideoWriter(str(tmp_path / "demo.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (640, 480))
    for f in sorted(seq.iterdir()):
        canvas = np.full((480, 640), 100, np.uint8)
        canvas[100:340, 200:440] = cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (240, 240))
        writer.write(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR))
    writer.release()
    table = fer.recognize_video(tmp_path / "demo.mp4", sequence_model=labeler)
    tracked = table[table["success"] == 1]
    assert len(tracked) >= 1 and set(tracked["track_label"]) <= set(labeler.classes)
    assert tracked.groupby("face_id")["track_label"].nunique().max() == 1
    with pytest.raises(RecognizeError, match="sequence model not found"):
        TrackLabeler(tmp_path / "missing.pt")


def test_iou_tracker_keeps_and_starts_ids():
    t = IoUTracker(min_iou=0.3, max_missed=1)
    a, b = np.array([0, 0, 10, 10.0]), np.array([50, 50, 60, 60.0])
    assert t.update([a, b]) == [0, 1]
    assert t.update([b + 1, a + 1]) == [1, 0]           # order swapped, ids follow the boxes
    assert t.update([a + 2]) == [0]                      # b missed once: kept
    assert t.update([a + 3]) == [0]                      # b missed twice: ended
    assert t.update([b]) == [2]                          # comes back as a new id


# -------------------------------------------------------------------------------------------- CLI

def ferpipe(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ferpipe.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def test_cli_help_version_and_usage_errors():
    out = ferpipe("--help")
    assert out.returncode == 0 and "recognize" in out.stdout and "export" in out.stdout
    assert ferpipe("--version").stdout.startswith("ferpipe ")
    bad = ferpipe("recognize", "x.png", "--model", "nope.pt")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "nope.pt: model not found" in bad.stderr


def test_cli_recognize_folder_with_bad_files(astronaut_bgr, fer_dir, tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    cv2.imwrite(str(folder / "astronaut.png"), astronaut_bgr)
    shutil.copy(sorted((fer_dir / "test" / "happy").iterdir())[0], folder / "sub" / "fer.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = ferpipe("recognize", folder, tmp_path / "nothing_here", "--out", tmp_path / "r.csv",
                  "--annotate", tmp_path / "ann", "--quiet")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "broken.jpg: not a recognised image format" in out.stderr and "nothing_here: not found" in out.stderr
    table = pd.read_csv(tmp_path / "r.csv")
    assert len(table) == 3
    row = table[table["input"].str.endswith("astronaut.png")].iloc[0]
    assert row["success"] == 1 and row["label"] == "happy"
    assert len(list((tmp_path / "ann").glob("*.png"))) == 2     # the two readable images
    crops = ferpipe("recognize", folder / "sub", "--crops", "--out", tmp_path / "r.json", "--quiet")
    assert crops.returncode == 0
    rows = json.loads((tmp_path / "r.json").read_text())
    assert rows[0]["label"] == "happy" and rows[0]["success"] == 1
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    assert "folder has no images" in ferpipe("recognize", empty, "--quiet").stderr


def test_cli_video_and_annotated_video(sequences_dir, tmp_path):
    ck_video(tmp_path / "ck.mp4", sequences_dir, seqs=("S010_006",), repeat=2)
    out = ferpipe("recognize", tmp_path / "ck.mp4", "--every", "2", "--out", tmp_path / "v.csv",
                  "--annotate", tmp_path / "ann", "--quiet")
    assert out.returncode == 0, out.stderr
    table = pd.read_csv(tmp_path / "v.csv")
    assert list(table["frame"]) == [0, 2, 4, 6]
    cap = cv2.VideoCapture(str(next((tmp_path / "ann").glob("*.mp4"))))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 4


# ----------------------------------------------------------------------------------------- export

def real_pixels(fer_dir: Path, spec: InputSpec, n: int = 8) -> np.ndarray:
    """Real FER-2013 test faces as a model's input pixels [n, C, S, S] (guide maps from real landmarks)."""
    from ferpipe.faces.landmarks import detect_landmarks
    from ferpipe.guides.maps import make_guide

    files = sorted((fer_dir / "test" / "happy").iterdir())[:n // 2] + sorted((fer_dir / "test" / "sad").iterdir())[:n // 2]
    gray = np.stack([cv2.resize(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE), (spec.size, spec.size),
                                interpolation=cv2.INTER_CUBIC) for f in files])
    maps = {"gray48": gray}
    kinds = {spec.image, spec.guide} - {"gray48", None}
    if kinds:
        lm = detect_landmarks(gray, passes=("dlib", "haar"), progress=False).points
        maps.update({k: make_guide(k, gray, lm) for k in kinds})
    return np.stack([maps[spec.image]] + ([maps[spec.guide]] if spec.guide else []), axis=1)


@torch.no_grad()
def calibrate(model: torch.nn.Module, pixels: np.ndarray, spec: InputSpec) -> None:
    """BatchNorm statistics from real faces (one train-mode pass), so that a seeded untrained deep net
    gives graded probabilities rather than saturated ones: an export check on 0/1 outputs proves little."""
    from ferpipe.models.inputs import normalize, split_channels

    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None          # a cumulative average over the pass
    model.train()
    model(*split_channels(normalize(torch.from_numpy(pixels).float() / 255.0, spec)))
    model.eval()


# vgg19, vgg19_bn and resnet152 (58-140 M parameters: 0.2-0.6 GB per file) are checked by
# bench/export_all.py, whose table is in the README; every other registry model here
GIANTS = ("vgg19", "vgg19_bn", "resnet152")


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in GIANTS])
def test_every_registry_model_exports_to_onnx(name, fer_dir, tmp_path):
    """ONNX (opset 20: the spatial transformers' AffineGrid) vs PyTorch with onnxruntime, real faces."""
    kw = {"in_size": 48, "mask_depths": (1, 1, 1, 1)} if name == "rmn" else {}
    torch.manual_seed(0)
    model = build_model(name, 7, **kw).eval()
    spec = MODEL_SPECS[name]
    channels = 1 + (spec["guide"] is not None)
    input_spec = InputSpec(image=spec["image"], guide=spec["guide"], size=spec["in_size"] if name != "rmn" else 48,
                           mean=[0.5] * channels, std=[0.25] * channels)
    pixels = real_pixels(fer_dir, input_spec)
    calibrate(model, pixels, input_spec)
    save_checkpoint(tmp_path / "m.pt", model, name, FER7, kw, {"input": input_spec.to_dict()})
    # inception_v3: onnxruntime's and oneDNN's float32 kernels differ after its 94 convolutions (seeded weights,
    # logits up to 9): 2.6e-4 with NCHW weights, 4.8e-4 (2 threads) / 5.7e-4 (1 thread) with the channels_last
    # inference form (models/inference.py), i.e. 6e-5 of the logits' scale; every other model stays under 1e-4
    tolerance = 1e-3 if name == "inception_v3" else 1e-4
    result = export_model(tmp_path / "m.pt", "onnx", tmp_path / "m.onnx", check=pixels, tolerance=tolerance)
    assert result["max_abs_diff"] < tolerance
    import onnx
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["ferpipe.classes"]) == FER7 and meta["ferpipe.model"] == name
    probs = run_exported(tmp_path / "m.onnx", "onnx", pixels[:3].astype(np.float32))   # another batch size
    assert probs.shape == (3, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_cli_export_bundled_to_onnx_and_torchscript(fer_dir, tmp_path):
    for fmt, out in (("onnx", "fer.onnx"), ("torchscript", "fer.ts")):
        res = ferpipe("export", "--format", fmt, "--out", tmp_path / out, "--check", fer_dir / "test" / "fear")
        assert res.returncode == 0, res.stderr
        assert "max |probability difference| vs PyTorch" in res.stdout
    extra = {"ferpipe.json": ""}
    torch.jit.load(str(tmp_path / "fer.ts"), _extra_files=extra)
    assert json.loads(extra["ferpipe.json"])["ferpipe.model"] == "vgg"
    bad = ferpipe("export", "--format", "tflite", "--out", tmp_path / "x")
    assert bad.returncode == 2


def test_export_refuses_an_ensemble(fer_run, tmp_path):
    runs, _ = fer_run
    with pytest.raises(ExportError, match="one checkpoint"):
        export_model([runs["vgg"] / "models", runs["soft"] / "models"], "onnx", tmp_path / "x.onnx")
