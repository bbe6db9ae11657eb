"""Sequences: CK+ / video readers, the features stage, LSTM / context-bridge models, windows and masking,
anticipation, determinism, and a short end-to-end run of the stage scripts on the real CK+ frames.

The real-data tests read ../shared/data/sequences (the `sequences_dir` fixture skips if absent).
"""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from ferpipe.data.decode import ImageError, decode_image
from ferpipe.data.ingest import run_ingest
from ferpipe.data.readers import READERS, DatasetError, read_dataset
from ferpipe.models import build_model, count_params
from ferpipe.models.checkpoint import load_checkpoint, save_checkpoint
from ferpipe.sequences.anticipation import accuracy_per_k, anticipation_loss, prefix_length
from ferpipe.sequences.features import FeatureError, run_features, sequence_order
from ferpipe.models.sequence import CBMCell, CBMNet, LSTMNet, build_sequence_model, init_encoder, load_sequence_model
from ferpipe.sequences.config import SequenceConfig
from ferpipe.sequences.data import SequenceData, load_sequences, make_samples, sequence_folds
from ferpipe.sequences.train import cross_validate
from ferpipe.store import read_h5, write_h5
from conftest import load_stage

REPO = Path(__file__).resolve().parents[1]
CK_CLASSES = {"angry", "contempt", "disgust", "fear", "happy", "sad", "surprise"}


def png(path: Path, value: int, size: int = 48) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(np.clip(value + rng.integers(0, 20, (size, size)), 0, 255).astype(np.uint8)).save(path)
    return path


def ck_layout(root: Path, seqs: dict, labels: list[tuple[str, str]]) -> Path:
    """seqs: {sequence: [frame numbers]}, labels: [(sequence, label)] rows of labels.csv."""
    for seq, numbers in seqs.items():
        (root / "frames" / seq).mkdir(parents=True, exist_ok=True)
        for n in numbers:
            png(root / "frames" / seq / f"{seq}_{n:08d}.png", 10 * n)
    pd.DataFrame(labels, columns=["sequence_id", "label"]).to_csv(root / "labels.csv", index=False)
    return root


def reasons(rejects: pd.DataFrame) -> dict:
    return {Path(s).name: r for s, r in zip(rejects["source"], rejects["reason"])}


# ------------------------------------------------------------------------------------------------
# readers

def test_ck_reader_real(sequences_dir):
    m, rej = read_dataset("ck_sequences", sequences_dir)
    assert {"ck_sequences", "video"} <= set(READERS)
    labels = pd.read_csv(sequences_dir / "labels.csv")
    assert len(rej) == 0
    assert m["sequence_id"].nunique() == 262 == len(labels)
    assert m["subject"].nunique() == 97
    assert len(m) == labels["frame_count"].sum() == 1043
    assert set(m["label_name"]) == CK_CLASSES  # anger -> angry, sadness -> sad, contempt kept
    assert (m["subject"] == m["sequence_id"].str.split("_").str[0]).all()
    assert m["subject"].str.match(r"^S\d{3}$").all()
    per_seq = m.groupby("sequence_id")
    assert (per_seq.size() == labels.set_index("sequence_id")["frame_count"]).all()
    for _, g in per_seq:  # frame order: frame_index 0..n-1 follows the CK+ frame number
        assert list(g["frame_index"]) == list(range(len(g)))
        assert list(g["frame_number"]) == sorted(g["frame_number"])
    first = m[m["sequence_id"] == "S005_001"]
    assert list(first["frame_number"]) == [1, 9, 10, 11] and set(first["label_name"]) == {"disgust"}
    assert (m["split"] == "train").all()
    assert m["id"].is_unique


def test_ck_reader_bad_input(tmp_path):
    root = ck_layout(tmp_path / "ck", {
        "S001_001": [1, 5, 6, 7],        # good
        "S001_002": [3, 1, 2],           # good, files listed out of order
        "S002_001": [],                  # empty folder
        "S002_002": [1, 2],              # shorter than min_length 3
        "S003_001": [1, 2, 3],           # no labels row
        "S004_001": [1, 2, 3],           # labels disagree (two rows)
    }, [("S001_001", "anger"), ("S001_002", "sadness"), ("S002_001", "happy"), ("S002_002", "fear"),
        ("S004_001", "happy"), ("S004_001", "surprise"), ("S009_001", "happy")])  # S009_001: no folder
    (root / "frames" / "S001_001" / "notes.txt").write_text("x")
    m, rej = read_dataset("ck_sequences", root, min_length=3)
    assert sorted(m["sequence_id"].unique()) == ["S001_001", "S001_002"]
    assert list(m[m.sequence_id == "S001_002"]["frame_number"]) == [1, 2, 3]
    assert set(m["label_name"]) == {"angry", "sad"} and set(m["subject"]) == {"S001"}
    r = reasons(rej)
    assert r["S002_001"] == "empty sequence (no frames)"
    assert "too short" in r["S002_002"] and "min_length 3" in r["S002_002"]
    assert "no labels.csv row" in r["S003_001"]
    assert "disagree" in r["S004_001"] and "happy" in r["S004_001"] and "surprise" in r["S004_001"]
    assert "no frame folder" in r["S009_001"]
    assert r["notes.txt"] == "not an image extension"
    # rejects name the labels.csv line of a sequence where there is one
    assert int(rej[rej.source.str.endswith("S009_001")]["line"].iloc[0]) == 8
    # per-frame labels that disagree reject the sequence
    root2 = ck_layout(tmp_path / "ck2", {"S001_001": [1, 2], "S001_002": [1, 2]}, [])
    pd.DataFrame([("S001_001", "S001_001_00000001.png", "happy"), ("S001_001", "S001_001_00000002.png", "sad"),
                  ("S001_002", "S001_002_00000001.png", "fear"), ("S001_002", "S001_002_00000002.png", "fear")],
                 columns=["sequence_id", "file", "label"]).to_csv(root2 / "labels.csv", index=False)
    m2, rej2 = read_dataset("ck_sequences", root2)
    assert list(m2["sequence_id"].unique()) == ["S001_002"]
    assert "disagree" in reasons(rej2)["S001_001"]
    # nothing usable: a clear error naming the reasons
    root3 = ck_layout(tmp_path / "ck3", {"S001_001": []}, [("S001_001", "happy")])
    with pytest.raises(DatasetError, match="empty sequence"):
        read_dataset("ck_sequences", root3)


def test_ck_unreadable_frame_is_an_ingest_reject(tmp_path):
    root = ck_layout(tmp_path / "ck", {"S001_001": [1, 2, 3], "S002_001": [1, 2]},
                     [("S001_001", "happy"), ("S002_001", "sad")])
    bad = root / "frames" / "S001_001" / "S001_001_00000002.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG
    o = tmp_path / "out"
    res = run_ingest("ck_sequences", root, "", o / "images.h5", o / "manifest.csv", o / "rejects.csv", None, None,
                     workers=1, progress=False)
    assert res["images"] == 4 and res["rejected"] == 1
    rej = pd.read_csv(o / "rejects.csv")
    assert rej["source"].iloc[0].endswith("S001_001_00000002.png")
    man = pd.read_csv(o / "manifest.csv", dtype={"sequence_id": str})
    # frame_index counts the frames that decoded (issue 10: no gap); frame_number keeps the original
    assert list(man["frame_number"]) == [1, 3, 1, 2] and list(man["frame_index"]) == [0, 1, 0, 1]


def write_video(path: Path, values: list[int], fourcc: str = "MJPG", size: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), 10, (size, size), False)
    assert w.isOpened()
    for v in values:
        w.write(np.full((size, size), v, np.uint8))
    w.release()
    return path


def test_video_reader_and_ingest(tmp_path):
    vids = tmp_path / "videos"
    write_video(vids / "a.avi", [10 * i for i in range(10)])
    write_video(vids / "sub" / "b.mp4", [200 - 10 * i for i in range(6)], "mp4v")
    (vids / "broken.mp4").write_bytes(b"this is not a video" * 20)   # written by the test: does not decode
    write_video(vids / "unlabelled.avi", [1, 2, 3])
    pd.DataFrame([("a.avi", "Happiness", "P1"), ("sub/b.mp4", "anger", "P2"), ("broken.mp4", "sad", "P3"),
                  ("missing.avi", "fear", "P4")], columns=["file", "label", "subject"]).to_csv(vids / "labels.csv", index=False)
    m, rej = read_dataset("video", vids, every=2, max_frames=4)
    a = m[m.sequence_id == "a"]
    assert list(a["frame_number"]) == [0, 2, 4, 6] and list(a["frame_index"]) == [0, 1, 2, 3]
    assert list(m[m.sequence_id == "sub/b"]["frame_number"]) == [0, 2, 4]
    assert set(m["label_name"]) == {"happy", "angry"} and list(a["subject"].unique()) == ["P1"]
    assert a["source"].iloc[1].endswith("a.avi#frame=2")
    r = reasons(rej)
    assert "does not decode" in r["broken.mp4"]
    assert r["missing.avi"] == "file not found"
    assert "no labels.csv row" in r["unlabelled.avi"]
    # the frames go through the ordinary ingest (decode_image understands '#frame=')
    o = tmp_path / "out"
    res = run_ingest("video", vids, "", o / "images.h5", o / "manifest.csv", o / "rejects.csv", None, None,
                     size=48, workers=1, options={"every": 2, "max_frames": 4}, progress=False)
    assert res["images"] == 7
    imgs = read_h5(o / "images.h5")["images"]
    assert np.allclose(imgs[:4].mean(axis=(1, 2)), [0, 20, 40, 60], atol=3)
    assert np.allclose(imgs[4:].mean(axis=(1, 2)), [200, 180, 160], atol=3)
    assert np.allclose(decode_image(f"{vids / 'a.avi'}#frame=9", 48).mean(), 90, atol=3)
    with pytest.raises(ImageError, match="no frame 50"):
        decode_image(f"{vids / 'a.avi'}#frame=50", 48)
    with pytest.raises(ImageError, match="does not open"):
        decode_image(f"{vids / 'broken.mp4'}#frame=0", 48)
    with pytest.raises(DatasetError, match="every"):
        read_dataset("video", vids, every=0)


# ------------------------------------------------------------------------------------------------
# features

@pytest.fixture(scope="module")
def ck_frames(sequences_dir, tmp_path_factory):
    """The real CK+ frames ingested by the real stage scripts (ingest -S dataset.format=ck_sequences, gray48)."""
    out = tmp_path_factory.mktemp("ck")
    load_stage("ingest").main(["--params", str(REPO / "params.yaml"), "-S", "dataset.format=ck_sequences", "-S",
                               f"dataset.path={sequences_dir}", "-S", "ingest.workers=1", "--out", str(out / "ingest/images.h5"),
                               "--manifest", str(out / "ingest/manifest.csv"), "--rejects",
                               str(out / "ingest/rejects.csv"), "--metrics", str(out / "ingest.json"),
                               "--sheet", "", "--quiet"])
    return out


@pytest.fixture(scope="module")
def tiny_cnn(tmp_path_factory):
    path = tmp_path_factory.mktemp("cnn") / "cnn.pt"
    torch.manual_seed(0)
    model = build_model("baseline", 7)
    save_checkpoint(path, model, "baseline", ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"])
    return path


def test_features_layout_and_stats_reuse(ck_frames, tiny_cnn, tmp_path):
    images, manifest = ck_frames / "ingest/images.h5", ck_frames / "ingest/manifest.csv"
    res = run_features(images, manifest, tmp_path / "f.h5", checkpoint=tiny_cnn, layer="fc1", batch_size=300)
    assert res["frames"] == 1043 and res["sequences"] == 262 and res["shape"] == [50, 1, 1]
    with h5py.File(tmp_path / "f.h5") as f:
        out, seq, lab = f["outputs"][()], f["seq_number"][()], f["label"][()]
        assert out.dtype == np.float32 and out.shape == (1043, 50, 1, 1)
        assert seq.dtype == np.int32 and seq.shape == (1043,) and lab.shape == (1043, 1)
        assert f["mean"].shape == (50, 1, 1) and len(f["paths"]) == 1043
        assert json.loads(f.attrs["classes"]) == ["angry", "disgust", "fear", "happy", "sad", "surprise", "contempt"]
        sids = f["sequence_id"].asstr()[()]
        fidx = f["frame_index"][()]
    # frames of a sequence contiguous, numbered 0.. in order, frames in order
    assert seq[0] == 0 and set(np.diff(seq)) <= {0, 1} and seq[-1] == 261
    for s in range(262):
        rows = np.flatnonzero(seq == s)
        assert len(set(sids[rows])) == 1 and list(fidx[rows]) == list(range(len(rows)))
    # standardized: each dimension has mean 0, std 1 over the frames
    assert np.allclose(out.mean(0), 0, atol=1e-4) and np.allclose(out.std(0), 1, atol=1e-3)
    # the raw features equal the model's fc1 on x/255
    model = build_model("baseline", 7)
    model.load_state_dict(torch.load(tiny_cnn, weights_only=True)["state_dict"])
    model.eval()
    img = read_h5(images)["images"][:4]
    acts = {}
    model.fc1.register_forward_hook(lambda m, i, o: acts.update(fc1=o))
    model(torch.from_numpy(img).float()[:, None] / 255)
    m_, s_ = read_h5(tmp_path / "f.h5", ["mean", "std"]).values()
    assert np.allclose(out[:4, :, 0, 0] * s_[:, 0, 0] + m_[:, 0, 0], acts["fc1"].detach().numpy(), atol=1e-4)
    # a test file reuses the training statistics: same frames -> identical outputs
    sub = tmp_path / "sub"
    man = pd.read_csv(manifest, keep_default_na=False, dtype=str)
    keep = man["subject"].isin(["S005", "S010"]).to_numpy()
    write_h5(sub / "images.h5", {"images": read_h5(images)["images"][keep], "ids": man["id"].to_numpy()[keep]})
    man[keep].to_csv(sub / "manifest.csv", index=False)
    run_features(sub / "images.h5", sub / "manifest.csv", tmp_path / "t.h5", checkpoint=tiny_cnn, layer="fc1",
                 stats_from=tmp_path / "f.h5")
    t = read_h5(tmp_path / "t.h5")
    assert np.array_equal(t["mean"], m_) and np.array_equal(t["std"], s_)
    rows = np.isin(sids, t["sequence_id"])
    assert np.allclose(t["outputs"], out[rows], atol=1e-5)
    assert np.array_equal(t["label"], lab[rows])
    # other layers: feature maps, flatten, logits; a bad name lists the layers
    for layer, shape in (("dropout", (10, 9, 9)), ("flatten", (810, 1, 1)), ("logits", (7, 1, 1))):
        r = run_features(sub / "images.h5", sub / "manifest.csv", tmp_path / f"{layer}.h5", checkpoint=tiny_cnn,
                         layer=layer, standardize=False)
        assert tuple(r["shape"]) == shape
    assert "mean" not in read_h5(tmp_path / "logits.h5")
    with pytest.raises(FeatureError, match="no layer 'fc9'.*conv1"):
        run_features(sub / "images.h5", sub / "manifest.csv", tmp_path / "x.h5", checkpoint=tiny_cnn, layer="fc9")
    # images mode: resized, mean-subtracted frames
    run_features(sub / "images.h5", sub / "manifest.csv", tmp_path / "img.h5", mode="images", size=32)
    im = read_h5(tmp_path / "img.h5")
    assert im["outputs"].shape == (keep.sum(), 1, 32, 32) and np.allclose(im["outputs"].mean(0), 0, atol=1e-5)


def test_features_use_the_training_input_spec_and_guides(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (6, 48, 48), dtype=np.uint8)
    guides = rng.integers(0, 255, (6, 48, 48), dtype=np.uint8)
    ids = np.array([f"s{i // 3}/{i % 3}" for i in range(6)])
    write_h5(tmp_path / "images.h5", {"images": imgs, "ids": ids})
    write_h5(tmp_path / "guide.h5", {"images": guides, "ids": ids})
    pd.DataFrame({"id": ids, "source": ids, "split": "train", "label_name": "happy", "sequence_id": [i[:2] for i in ids],
                  "frame_index": [int(i[-1]) for i in ids], "subject": ""}).to_csv(tmp_path / "m.csv", index=False)
    torch.manual_seed(0)
    cnn = build_model("baseline", 3).eval()
    spec = {"image": "gray48", "guide": None, "size": 48, "mean": [0.5], "std": [0.25]}
    save_checkpoint(tmp_path / "cnn.pt", cnn, "baseline", ["a", "b", "c"], meta={"input": spec})
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "f.h5", checkpoint=tmp_path / "cnn.pt",
                 layer="logits", standardize=False)
    with torch.no_grad():
        expect = cnn((torch.from_numpy(imgs).float()[:, None] / 255 - 0.5) / 0.25).numpy()
    assert np.allclose(read_h5(tmp_path / "f.h5")["outputs"][:, :, 0, 0], expect, atol=1e-5)
    # a guided STN needs its guide map (same ids), and uses it
    stn = build_model("soft", 3).eval()
    gspec = {**spec, "guide": "soft", "mean": [0.5, 0.5], "std": [0.25, 0.25]}
    save_checkpoint(tmp_path / "stn.pt", stn, "soft", ["a", "b", "c"], meta={"input": gspec})
    with pytest.raises(FeatureError, match="guide"):
        run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "g.h5", checkpoint=tmp_path / "stn.pt")
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "g.h5", checkpoint=tmp_path / "stn.pt",
                 guide_h5=tmp_path / "guide.h5", layer="classifier.fc1", standardize=False)
    assert read_h5(tmp_path / "g.h5")["outputs"].shape == (6, 50, 1, 1)
    # a torchvision backbone from a weights file (no checkpoint of ours)
    torch.save(build_model("resnet18", 5).state_dict(), tmp_path / "r18.pth")
    r = run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "r.h5", backbone="resnet18",
                     weights=tmp_path / "r18.pth", layer="avgpool")
    assert r["shape"] == [512, 1, 1]
    # "flatten" of an STN is its classifier's flattened maps (810), not the localization net's (640)
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "g.h5", checkpoint=tmp_path / "stn.pt",
                 guide_h5=tmp_path / "guide.h5", layer="flatten", standardize=False)
    assert read_h5(tmp_path / "g.h5")["outputs"].shape == (6, 810, 1, 1)


def test_features_make_guides_and_collages_from_the_frames_landmarks(tmp_path):
    from ferpipe.guides.maps import make_guide
    from ferpipe.sequences.features import resolve_checkpoint
    rng = np.random.default_rng(1)
    imgs = rng.integers(0, 255, (4, 48, 48), dtype=np.uint8)
    lm = (0.3 + 0.4 * rng.random((4, 68, 2))).astype(np.float32)
    ids = np.array([f"s{i // 2}/{i % 2}" for i in range(4)])
    write_h5(tmp_path / "images.h5", {"images": imgs, "ids": ids})
    write_h5(tmp_path / "lm.h5", {"landmarks": lm, "found": np.ones(4, bool), "ids": ids})
    soft = {"mode": "threshold", "threshold": 50, "low": 100, "sigma": 1.0}
    write_h5(tmp_path / "soft.h5", {"images": make_guide("soft", imgs, lm, **soft), "ids": ids})
    pd.DataFrame({"id": ids, "source": ids, "split": "train", "label_name": "happy", "sequence_id": [i[:2] for i in ids],
                  "frame_index": [int(i[-1]) for i in ids], "subject": ""}).to_csv(tmp_path / "m.csv", index=False)
    torch.manual_seed(0)
    models = tmp_path / "models"
    models.mkdir()
    for name, fname, acc in (("soft", "fold0.pt", 0.8), ("patches", "fold1.pt", 0.7)):
        save_checkpoint(models / fname, build_model(name, 3).eval(), name, ["a", "b", "c"], meta={"val_acc": acc})
    assert resolve_checkpoint(models) == models / "fold0.pt"       # no final.pt: the best validation fold
    kw = dict(layer="logits", standardize=False)
    # guided STN: its soft map made from the landmarks with the guides params = the guide file's map
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "a.h5", checkpoint=models,
                 landmarks_h5=tmp_path / "lm.h5", guide_params={"soft": soft}, **kw)
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "b.h5", checkpoint=models / "fold0.pt",
                 guide_h5=tmp_path / "soft.h5", **kw)
    assert np.array_equal(read_h5(tmp_path / "a.h5")["outputs"], read_h5(tmp_path / "b.h5")["outputs"])
    # collage model (patches): the network sees the collage, not the frame
    run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "c.h5", checkpoint=models / "fold1.pt",
                 landmarks_h5=tmp_path / "lm.h5", **kw)
    net, _ = load_checkpoint(models / "fold1.pt")
    collage = torch.from_numpy(make_guide("patches", imgs, lm)).float()[:, None] / 255
    guide = torch.from_numpy(make_guide("landmarks", imgs, lm)).float()[:, None] / 255
    with torch.no_grad():
        expect = net.eval()(collage, guide).numpy()
    assert np.allclose(read_h5(tmp_path / "c.h5")["outputs"][:, :, 0, 0], expect, atol=1e-5)
    write_h5(tmp_path / "lm_other.h5", {"landmarks": lm, "found": np.ones(4, bool), "ids": ids[::-1].copy()})
    with pytest.raises(FeatureError, match="ids differ"):
        run_features(tmp_path / "images.h5", tmp_path / "m.csv", tmp_path / "d.h5", checkpoint=models,
                     landmarks_h5=tmp_path / "lm_other.h5", **kw)
    save_checkpoint(models / "fold2.pt", build_model("soft", 3), "soft", ["a", "b", "c"], meta={"val_acc": 0.9})
    assert resolve_checkpoint(models) == models / "fold2.pt"
    save_checkpoint(models / "final.pt", build_model("soft", 3), "soft", ["a", "b", "c"])
    assert resolve_checkpoint(models) == models / "final.pt"       # the model trained on every row wins
    for f in models.iterdir():
        f.unlink()
    with pytest.raises(FeatureError, match="no final.pt"):
        resolve_checkpoint(models)


def test_features_order_and_regression_labels(tmp_path, tiny_cnn):
    # manifest rows shuffled relative to the images, frames out of order, valence/arousal present
    ids = [f"v{s}/{f}" for s in range(3) for f in range(4)]
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 255, (12, 48, 48), dtype=np.uint8)
    write_h5(tmp_path / "images.h5", {"images": imgs, "ids": np.array(ids)})
    man = pd.DataFrame({"id": ids, "source": ids, "split": "train", "label_name": "", "valence": np.linspace(-1, 1, 12),
                        "arousal": np.linspace(0, 1, 12), "sequence_id": [i.split("/")[0] for i in ids],
                        "frame_index": [3 - int(i[-1]) for i in ids], "subject": "", "fold": -1})
    man.sample(frac=1, random_state=1).to_csv(tmp_path / "manifest.csv", index=False)
    run_features(tmp_path / "images.h5", tmp_path / "manifest.csv", tmp_path / "f.h5", checkpoint=tiny_cnn)
    f = read_h5(tmp_path / "f.h5")
    assert list(f["ids"][:4]) == ["v0/3", "v0/2", "v0/1", "v0/0"]  # frame_index order
    assert f["valence"].shape == (12, 1) and np.allclose(f["valence"][0, 0], man.set_index("id").loc["v0/3", "valence"])
    assert np.allclose(f["label_mean"], [0, 0.5], atol=1e-6) and f["label_std"].shape == (2,)
    order, seq = sequence_order(pd.DataFrame({"sequence_id": ["b", "a", "b", "", "a"], "frame_index": [1, 0, 0, 0, 1]}))
    assert list(order) == [2, 0, 1, 4, 3] and list(seq) == [0, 0, 1, 1, 2]


def test_listfile_sequences_through_ingest_and_features(tmp_path):
    """LSTM-on-CNN list file (path label seq_number, unsorted) -> ingest -> features: order and labels kept."""
    lines = []
    for seq in (7, 3):
        for f in range(3):
            png(tmp_path / "img" / f"s{seq}_{f}.png", 20 * seq + f)
            lines.append(f"img/s{seq}_{f}.png {seq % 2 + 0.5 * f} {seq}")
    (tmp_path / "list.txt").write_text("\n".join(reversed(lines)) + "\n")
    o = tmp_path / "out"
    run_ingest("listfile", tmp_path / "list.txt", "", o / "images.h5", o / "manifest.csv", o / "rejects.csv", None, None,
               workers=1, options={"sort": True, "per_frame_labels": True}, progress=False)
    run_features(o / "images.h5", o / "manifest.csv", tmp_path / "f.h5", mode="images")
    f = read_h5(tmp_path / "f.h5")
    assert list(f["seq_number"]) == [0, 0, 0, 1, 1, 1]
    assert list(f["paths"]) == [str(tmp_path / "img" / f"s{s}_{i}.png") for s in (3, 7) for i in range(3)]
    assert np.allclose(f["label_value"][:, 0], [1, 1.5, 2, 1, 1.5, 2])
    d = load_sequences(tmp_path / "f.h5", "regress")
    assert d.regression == ["label_value"] and list(d.lengths) == [3, 3]


def test_list_file_with_several_labels_per_frame_regresses_them_jointly(ck_frames, tmp_path):
    """LSTM-on-CNN list files carry N labels per frame (`path l1 l2 seq`): every label reaches the features
    file (label_value, label_value_2) and train_sequence regresses them jointly. Real CK+ frames; the two
    labels are generated from the frame's position (a rising and a falling intensity)."""
    man = pd.read_csv(ck_frames / "ingest/manifest.csv", keep_default_na=False)
    man = man[man["sequence_id"].isin(sorted(man["sequence_id"].unique())[:24])]
    lines = []
    for seq_no, (_, group) in enumerate(man.groupby("sequence_id", sort=True)):
        n = len(group)
        for _, row in group.sort_values("frame_index").iterrows():
            rise = (row["frame_index"] + 1) / n
            lines.append(f"{row['source']} {rise:.3f} {1 - rise:.3f} {seq_no}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    o = tmp_path / "out"
    run_ingest("listfile", tmp_path / "list.txt", "", o / "images.h5", o / "manifest.csv", o / "rejects.csv", None, None,
               size=24, workers=1, options={"per_frame_labels": True, "outside_root": True}, progress=False)
    run_features(o / "images.h5", o / "manifest.csv", tmp_path / "f.h5", mode="images", size=16)
    f = read_h5(tmp_path / "f.h5")
    assert np.allclose(f["label_value"][:, 0] + f["label_value_2"][:, 0], 1, atol=1e-3)
    d = load_sequences(tmp_path / "f.h5", "regress")
    assert d.regression == ["label_value", "label_value_2"] and d.frame_y.shape[1] == 2
    cfg = SequenceConfig(model="lstm", task="regress", folds=3, epochs=2, lstm={"hidden": 8, "depth": 1, "dropout": 0.0},
                         rho=2)
    r = cross_validate(d, cfg, progress=None)
    assert {"mse_label_value", "mse_label_value_2", "ccc_label_value_2"} <= set(r["mean"])
    assert {"actual_label_value_2", "predicted_label_value_2"} <= set(r["predictions"].columns)


def test_train_and_val_list_files_instead_of_folds(ck_frames, tmp_path):
    """LSTM-on-CNN's workflow: a train list, a validation list and a test list (real CK+ frames, split by
    subject) -> one ingest (a listfile folder) -> features -> train_sequence -S sequence.folds=0: trained on train,
    selected on val, scored on test only; the saved model is that one."""
    man = pd.read_csv(ck_frames / "ingest/manifest.csv", keep_default_na=False)
    subjects = sorted(man["subject"].unique())
    part = {s: ("test" if i % 5 == 0 else "val" if i % 5 == 1 else "train") for i, s in enumerate(subjects)}
    classes = sorted(man["label_name"].unique())
    lines = {"train": [], "val": [], "test": []}
    for seq_no, (_, group) in enumerate(man.groupby("sequence_id", sort=True)):
        split = part[group["subject"].iloc[0]]
        for _, row in group.sort_values("frame_index").iterrows():
            lines[split].append(f"{row['source']} {classes.index(row['label_name'])} {seq_no}")
    lists = tmp_path / "lists"
    lists.mkdir()
    for split, rows in lines.items():
        (lists / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (lists / "val.txt").write_text((lists / "val.txt").read_text() + lines["train"][0] + "\n")  # also in train
    o = tmp_path / "out"
    res = run_ingest("listfile", lists, "", o / "images.h5", o / "manifest.csv", o / "rejects.csv", None, None,
                     size=24, workers=1, options={"outside_root": True}, progress=False)
    rej = pd.read_csv(o / "rejects.csv")
    assert rej["reason"].str.contains("also in an earlier list").sum() == 1
    run_features(o / "images.h5", o / "manifest.csv", tmp_path / "f.h5", mode="images", size=16)
    w = tmp_path / "run"
    load_stage("train_sequence").main(["--params", str(tmp_path / "none.yaml"), "--features", str(tmp_path / "f.h5"),
                                       "--model-out", str(w / "m.pt"), "--metrics", str(w / "m.json"), "--plots", "",
                                       "--predictions", str(w / "p.csv"), "--live", "", "--results", "",
                                       "-S", "sequence.folds=0", "-S", "sequence.train.epochs=2", "-S",
                                       "sequence.model=frame", "-S", "sequence.frame.hidden=8", "-S",
                                       "sequence.encoder=none"])
    m = json.loads((w / "m.json").read_text())
    pred = pd.read_csv(w / "p.csv", dtype={"id": str})
    n_test = sum(1 for seq in man.groupby("sequence_id") if part[seq[1]["subject"].iloc[0]] == "test")
    assert m["folds"] == 0 and len(m["per_fold"]) == 1 and m["per_fold"][0]["n_test"] == n_test == len(pred)
    assert pred["id"].str.startswith("test/").all() and m["final"]["n_train"] == m["per_fold"][0]["n_train"]
    model, info = load_sequence_model(w / "m.pt")
    assert info["model"] == "frame"


# ------------------------------------------------------------------------------------------------
# models

def padded(B=3, T=4, shape=(50, 1, 1), lengths=(4, 2, 1), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, *shape, generator=g)
    mask = torch.arange(T)[None, :] >= (T - torch.tensor(lengths))[:, None]
    return x * mask[:, :, None, None, None], mask


@pytest.mark.parametrize("shape", [(50, 1, 1), (10, 9, 9)])
@pytest.mark.parametrize("kind", ["lstm", "cbm", "convlstm", "frame"])
def test_model_shapes_and_masking(kind, shape):
    torch.manual_seed(0)
    kw = {"depth": 6, "hidden": 16} if kind in ("cbm", "convlstm") else {"encoder": "none"} if kind == "frame" else {}
    model = build_sequence_model(kind, shape, 7, **kw).eval()
    x, mask = padded(shape=shape)
    steps = model.steps(x, mask)
    assert steps.shape == (3, 4, 7) and model(x, mask).shape == (3, 7)
    assert (steps[~mask] == 0).all()
    # padding is invisible: the 2-frame sequence alone (no padding) gives the same outputs
    alone = model.steps(x[1:2, 2:], mask[1:2, 2:])
    assert torch.allclose(alone[0], steps[1, 2:], atol=1e-5)
    # causal: the output after k frames only depends on the first k frames
    x2 = x.clone()
    x2[0, 3] += 5.0
    assert torch.allclose(model.steps(x2, mask)[0, :3], steps[0, :3], atol=1e-5)
    assert not torch.allclose(model.steps(x2, mask)[0, 3], steps[0, 3], atol=1e-3)
    with pytest.raises(ValueError, match="left-padded"):
        model.steps(x, mask.flip(1))


def test_lstm_defaults_and_cbm_structure():
    lstm = build_sequence_model("lstm", (50, 1, 1), 7)
    assert lstm.lstm.hidden_size == 256 and lstm.lstm.num_layers == 1
    cbm = CBMNet((50, 1, 1), 7, hidden=8, depth=15, shortcut=5)
    assert len(cbm.cells) == 15 and cbm.shortcut_layers == [5, 10, 15] and cbm.kernel == 1
    assert cbm.cells[0].conv_data.kernel_size == (1, 1) and cbm.cells[0].conv_ctrl.in_channels == 50 + 8
    maps = CBMNet((10, 9, 9), 7, hidden=8, depth=3)
    assert maps.kernel == 3 and maps.cells[0].conv_data.kernel_size == (3, 3) and maps.shortcut_layers == []
    # the shortcut really adds the block input: removing it changes the output
    torch.manual_seed(0)
    x, mask = padded(shape=(50, 1, 1))
    cbm.eval()
    y = cbm(x, mask)
    cbm.shortcut_layers = []
    assert not torch.allclose(cbm(x, mask), y)
    # the frame baseline with the simple encoder is the Deep-Emotion Simple-CNN, parameter for parameter
    assert count_params(build_sequence_model("frame", (1, 48, 48), 7)) == count_params(build_model("baseline", 7))


def test_cbm_cell_equations_and_temporal_dropout():
    torch.manual_seed(0)
    cell = CBMCell(4, 3, kernel=1, temporal_dropout=1.0).eval()
    x, mask = padded(B=2, T=3, shape=(4, 1, 1), lengths=(3, 3))
    h = cell(x, mask)
    # by hand: data = tanh(BN(Wd x)), ctrl_t = sigmoid(BN(Wc [x_t, c_{t-1}])), h = data * ctrl, c = ctrl
    bn = lambda m, v: (v - m.running_mean[None, :, None, None]) / torch.sqrt(m.running_var[None, :, None, None] + m.eps) \
        * m.weight[None, :, None, None] + m.bias[None, :, None, None]
    c = torch.zeros(2, 3, 1, 1)
    for t in range(3):
        data = torch.tanh(bn(cell.bn_data, cell.conv_data(x[:, t])))
        ctrl = torch.sigmoid(bn(cell.bn_ctrl, cell.conv_ctrl(torch.cat([x[:, t], c], 1))))
        assert torch.allclose(h[:, t], data * ctrl, atol=1e-6)
        c = ctrl
    # temporal dropout: in training, with p=1, every control input is detached (gradient only via data)
    def grad(train: bool, detach=None):
        cell.train(train)
        xx = x.clone().requires_grad_(True)
        cell(xx, mask, detach).sum().backward()
        return xx.grad
    g_train = grad(True)
    assert cell.detached == 6
    assert torch.allclose(g_train, grad(True, torch.ones(2, 3, dtype=torch.bool)))
    assert not torch.allclose(g_train, grad(True, torch.zeros(2, 3, dtype=torch.bool)))
    grad(False)
    assert cell.detached == 0  # off in eval
    # forward values do not change with detaching
    cell.eval()
    assert torch.equal(cell(x, mask, torch.ones(2, 3, dtype=torch.bool)), cell(x, mask))


def test_init_encoder_from_cnn_checkpoint(tiny_cnn):
    model = build_sequence_model("lstm", (1, 48, 48), 7, encoder="simple")
    loaded = init_encoder(model, tiny_cnn)
    assert "conv1.weight" in loaded and "norm.running_mean" in loaded
    cnn = build_model("baseline", 7)
    cnn.load_state_dict(torch.load(tiny_cnn, weights_only=True)["state_dict"])
    assert torch.equal(model.encoder.conv4.weight, cnn.conv4.weight)
    with pytest.raises(ValueError, match="encoder='simple'"):
        init_encoder(build_sequence_model("lstm", (50, 1, 1), 7), tiny_cnn)


# ------------------------------------------------------------------------------------------------
# samples: windows, padding, anticipation

def toy_data(lengths=(5, 2, 3), classes=3, shape=(4, 1, 1), subjects=None, seed=0) -> SequenceData:
    rng = np.random.default_rng(seed)
    n = sum(lengths)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    frame_y = np.arange(n) % classes
    S = len(lengths)
    return SequenceData(torch.from_numpy(rng.normal(size=(n, *shape)).astype(np.float32)), frame_y.astype(np.int64),
                        starts, np.array(lengths), np.arange(S), np.array([f"s{i}" for i in range(S)]),
                        np.array(subjects or [""] * S), "classify", [f"c{i}" for i in range(classes)], [])


def test_windows_and_whole_sequences():
    d = toy_data()
    w = make_samples(d, [0, 1, 2], rho=3)
    # seq 0 (frames 0..4): windows 0-2, 1-3, 2-4; seq 1 (2 frames) is shorter than the window; seq 2: 7-9
    assert w.idx.tolist() == [[0, 1, 2], [1, 2, 3], [2, 3, 4], [7, 8, 9]]
    assert w.y.tolist() == [d.frame_y[2], d.frame_y[3], d.frame_y[4], d.frame_y[9]]  # label of the last frame
    assert list(w.seq) == [0, 0, 0, 2] and "shorter than the window" in w.skipped["s1"]
    whole = make_samples(d, [0, 1, 2])
    assert whole.idx.tolist() == [[0, 1, 2, 3, 4], [-1, -1, -1, 5, 6], [-1, -1, 7, 8, 9]]  # left padding
    assert whole.mask.sum(1).tolist() == [5, 2, 3]
    assert whole.y.tolist() == [d.frame_y[4], d.frame_y[6], d.frame_y[9]]
    assert make_samples(d, [0], max_len=2).idx.tolist() == [[3, 4]]
    first2 = make_samples(d, [0, 1, 2], first=2)
    assert first2.idx.tolist() == [[0, 1], [5, 6], [7, 8]] and first2.y.tolist() == whole.y.tolist()
    assert [prefix_length(n, 0.5) for n in (1, 2, 3, 4)] == [1, 1, 2, 2] and prefix_length(3, 9) == 3


def test_fold_view_standardizes_with_the_training_frames_only():
    d = toy_data(lengths=(3, 2, 4), shape=(2, 1, 1))
    raw = d.X.clone() * 5 + 2
    d.file_mean, d.file_std = raw.mean(0), raw.std(0, unbiased=False)    # the features stage: every frame
    d.X = (raw - d.file_mean) / d.file_std
    torch.testing.assert_close(d.raw(), raw)
    v = d.fold_view([0, 2])                                             # frames 0-2 and 5-8 train
    train = raw[[0, 1, 2, 5, 6, 7, 8]]
    torch.testing.assert_close(v.norm_mean, train.mean(0))
    torch.testing.assert_close(v.norm_std, train.std(0, unbiased=False))
    torch.testing.assert_close(v.X, (raw - train.mean(0)) / train.std(0, unbiased=False))
    torch.testing.assert_close(d.X, (raw - d.file_mean) / d.file_std)  # the original is untouched
    # the held-out sequence's values do not move the training frames' inputs
    d2 = toy_data(lengths=(3, 2, 4), shape=(2, 1, 1))
    raw2 = raw.clone()
    raw2[3:5] += 100.0
    d2.file_mean, d2.file_std = raw2.mean(0), raw2.std(0, unbiased=False)
    d2.X = (raw2 - d2.file_mean) / d2.file_std
    torch.testing.assert_close(d2.fold_view([0, 2]).X[[0, 1, 2, 5, 6, 7, 8]], v.X[[0, 1, 2, 5, 6, 7, 8]])
    # images mode (file std = 1): mean subtraction only; a raw file stays raw
    d.file_std = torch.ones_like(d.file_std)
    assert bool((d.fold_view([0]).norm_std == 1).all())
    assert toy_data().fold_view([0]).norm_mean is None


def test_sequence_folds_subject_independent(sequences_dir):
    m, _ = read_dataset("ck_sequences", sequences_dir)
    seqs = m.drop_duplicates("sequence_id")
    d = toy_data(lengths=[1] * len(seqs), classes=7, subjects=list(seqs["subject"]))
    d.frame_y = seqs["label_name"].astype("category").cat.codes.to_numpy().astype(np.int64)
    fold, grouped = sequence_folds(d, 10, 2020)
    assert grouped and set(fold) == set(range(10))
    subj_folds = pd.DataFrame({"s": seqs["subject"].to_numpy(), "f": fold}).groupby("s")["f"].nunique()
    assert (subj_folds == 1).all()  # no subject in two folds


def test_anticipation_loss():
    target = torch.tensor([0])
    mask = torch.ones(1, 3, dtype=torch.bool)
    rising = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]])
    falling = rising.flip(1)
    loss_r, parts_r = anticipation_loss(rising, mask, target)
    loss_f, parts_f = anticipation_loss(falling, mask, target)
    assert parts_r["hinge"] == 0 and parts_f["hinge"] > 0
    assert abs(parts_r["ce"] - parts_f["ce"]) < 1e-6  # same steps, other order: same mean CE
    p = torch.softmax(falling, -1)[0, :, 0]
    assert abs(parts_f["hinge"] - float(((p[0] - p[1]) + (p[1] - p[2])) / 2)) < 1e-6
    assert abs(float(loss_f) - (parts_f["ce"] + parts_f["hinge"])) < 1e-6
    assert abs(float(anticipation_loss(falling, mask, target, weight=0)[0]) - parts_f["ce"]) < 1e-6
    # padded steps are ignored
    padded_logits = torch.cat([torch.tensor([[[0.0, 9.0]]]), rising], 1)
    loss_p, parts_p = anticipation_loss(padded_logits, torch.tensor([[False, True, True, True]]), target)
    assert abs(float(loss_p) - float(loss_r)) < 1e-6
    # the hinge's gradient raises the later step's true-class score
    z = falling.clone().requires_grad_(True)
    anticipation_loss(z, mask, target, weight=10)[0].backward()
    assert z.grad[0, 2, 0] < 0
    probs = np.array([[[0.1, 0.9], [0.6, 0.4], [0.9, 0.1]], [[0, 0], [0.2, 0.8], [0.7, 0.3]]])
    acc = accuracy_per_k(probs, np.array([3, 2]), np.array([0, 0]))
    assert acc == {"k1": 0.0, "k2": 1.0, "k3": 1.0}


# ------------------------------------------------------------------------------------------------
# training

def test_training_deterministic_and_learns(tmp_path):
    # a learnable toy: the class is written in the last frame's features; 40 sequences, 8 subjects
    rng = np.random.default_rng(0)
    d = toy_data(lengths=list(rng.integers(2, 5, 40)), classes=3, shape=(6, 1, 1),
                 subjects=[f"p{i % 8}" for i in range(40)])
    d.frame_y = np.repeat(np.arange(40) % 3, d.lengths).astype(np.int64)
    last = d.starts + d.lengths - 1
    d.X[last, :3, 0, 0] += 3 * torch.nn.functional.one_hot(torch.from_numpy(d.frame_y[last]), 3).float()
    cfg = SequenceConfig(model="lstm", folds=4, epochs=12, patience=5, lstm={"hidden": 16, "depth": 1, "dropout": 0.0},
                         lr=0.01, batch_size=8, seed=7)
    a = cross_validate(d, cfg, progress=None)
    b = cross_validate(d, cfg, progress=None)
    assert a["mean"] == b["mean"] and a["predictions"].equals(b["predictions"])
    assert a["mean"]["accuracy"] > 0.8 and a["subject_independent"]
    assert len(a["folds"]) == 4 and len(a["predictions"]) == 40
    cfg.seed = 8
    assert cross_validate(d, cfg, progress=None)["predictions"]["prob_c0"].tolist() != a["predictions"]["prob_c0"].tolist()
    # windows and CBM and anticipation run through the same loop
    for over in (dict(rho=2), dict(model="cbm", cbm={"hidden": 8, "depth": 5, "shortcut": 5}),
                 dict(model="convlstm", convlstm={"hidden": 8, "depth": 5, "shortcut": 5}), dict(anticipation_first=2)):
        c = SequenceConfig(**{**cfg.__dict__, "epochs": 2, **over})
        r = cross_validate(d, c, progress=None)
        assert 0 <= r["mean"]["accuracy"] <= 1
    assert "k2" in r["by_first_k"]


def test_clip_positions_uniform_random_and_short_sequences():
    from ferpipe.sequences.data import clip_positions
    assert clip_positions(16, 4).tolist() == [2, 6, 10, 14]          # the centre of each quarter
    assert clip_positions(3, 5).tolist() == [0, 0, 1, 2, 2]          # shorter than the clip: frames repeat
    rng = np.random.default_rng(0)
    r = clip_positions(20, 16, rng)
    assert len(set(r.tolist())) == 16 and (np.diff(r) > 0).all() and r.max() < 20   # in order, no repeats
    with pytest.raises(ValueError, match="clip_frames samples whole sequences"):
        SequenceConfig(clip_frames=4, rho=2).validate()


def test_ucf_layout_reads_real_ck_frames_as_ck_sequences_does(sequences_dir, tmp_path):
    """The Deep RNN Framework's class/video/frame folders (UCF-101 style): real CK+ frames laid out as
    <class>/<video>/<frame>.png give the ck_sequences reader's frames, order, labels and subjects."""
    ck, _ = read_dataset("ck_sequences", sequences_dir)
    picked = sorted(ck["sequence_id"].unique())[:12]
    ck = ck[ck["sequence_id"].isin(picked)].reset_index(drop=True)
    for seq, group in ck.groupby("sequence_id"):
        folder = tmp_path / "ucf" / group["label_name"].iloc[0].capitalize() / seq
        folder.mkdir(parents=True)
        for src in group["source"]:
            (folder / Path(src).name).symlink_to(src)
    (tmp_path / "ucf" / "stray.txt").write_text("not a class folder")
    dup = tmp_path / "ucf" / "Zzz" / picked[0]           # the same video name under another class
    dup.mkdir(parents=True)
    (dup / "x_001.png").symlink_to(ck["source"].iloc[0])
    manifest, rejects = read_dataset("ucf", tmp_path / "ucf")
    manifest = manifest.sort_values(["sequence_id", "frame_index"]).reset_index(drop=True)
    ck = ck.sort_values(["sequence_id", "frame_index"]).reset_index(drop=True)
    for col in ("sequence_id", "frame_index", "label_name", "subject", "frame_number"):
        assert manifest[col].tolist() == ck[col].tolist(), col
    assert [Path(p).name for p in manifest["source"]] == [Path(p).name for p in ck["source"]]
    reasons = sorted(rejects["reason"])
    assert any("file outside a class folder" in r for r in reasons)
    assert any("video name repeated in another class" in r for r in reasons)
    with pytest.raises(DatasetError, match="not a folder"):
        read_dataset("ucf", tmp_path / "missing")


def test_out_of_fold_predictions_are_the_evaluate_table_and_ensemble(tmp_path):
    """One predictions format: the sequence stage's out-of-fold CSV is the evaluate stage's table, so
    ensemble.py averages sequence models (and read_predictions gives back the pooled metrics)."""
    from ferpipe.evaluate.ensemble import ensemble
    from ferpipe.evaluate.metrics import read_predictions
    rng = np.random.default_rng(1)
    d = toy_data(lengths=list(rng.integers(2, 5, 24)), classes=3, shape=(6, 1, 1),
                 subjects=[f"p{i % 6}" for i in range(24)])
    cfg = SequenceConfig(model="lstm", folds=3, epochs=2, lstm={"hidden": 8, "depth": 1, "dropout": 0.0}, seed=3)
    r = cross_validate(d, cfg, progress=None)
    table = r["predictions"]
    ids, y, probs, classes = read_predictions(table)
    assert classes == d.classes and len(ids) == 24 and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert abs((probs.argmax(1) == y).mean() - r["pooled"]["accuracy"]) < 1e-9
    assert {"fold", "subject", "frames", "predicted", "confidence"} <= set(table.columns)
    path = tmp_path / "pred.csv"
    table.to_csv(path, index=False)
    averaged, m = ensemble([pd.read_csv(path, dtype={"id": str}), pd.read_csv(path, dtype={"id": str})])
    assert m["accuracy"] == r["pooled"]["accuracy"]


def test_regression_task(tmp_path, tiny_cnn):
    ids = [f"v{s}/{f}" for s in range(12) for f in range(3)]
    rng = np.random.default_rng(0)
    val = np.repeat(np.linspace(-0.9, 0.9, 12), 3)
    imgs = np.clip(128 + 100 * val[:, None, None] + rng.normal(0, 5, (36, 48, 48)), 0, 255).astype(np.uint8)
    write_h5(tmp_path / "images.h5", {"images": imgs, "ids": np.array(ids)})
    pd.DataFrame({"id": ids, "source": ids, "split": "train", "label_name": "", "valence": val, "arousal": -val,
                  "sequence_id": [i.split("/")[0] for i in ids], "frame_index": [int(i[-1]) for i in ids],
                  "subject": "", "fold": -1}).to_csv(tmp_path / "manifest.csv", index=False)
    run_features(tmp_path / "images.h5", tmp_path / "manifest.csv", tmp_path / "f.h5", mode="images", size=8)
    d = load_sequences(tmp_path / "f.h5", "regress")
    assert d.regression == ["valence", "arousal"] and np.allclose(d.frame_y.mean(0), 0, atol=1e-5)
    cfg = SequenceConfig(model="lstm", task="regress", folds=3, epochs=30, patience=30, lr=0.01,
                         lstm={"hidden": 8, "depth": 1, "dropout": 0.0}, batch_size=4)
    r = cross_validate(d, cfg, progress=None)
    assert {"mse", "pearson", "mse_valence", "pearson_arousal"} <= set(r["mean"])
    pred = r["predictions"]
    assert np.allclose(sorted(pred["actual_valence"]), sorted(np.linspace(-0.9, 0.9, 12)), atol=1e-5)  # original scale
    assert r["pooled"]["pearson_valence"] > 0.5


def test_stage_scripts_end_to_end_on_real_ck(ck_frames, sequences_dir, tmp_path, capsys):
    """ingest (ck_sequences) -> gray48 -> features (a tiny CNN checkpoint) -> train_sequence -> --test-only."""
    w = tmp_path
    torch.manual_seed(1)
    cnn = build_model("baseline", 7)
    save_checkpoint(w / "cnn.pt", cnn, "baseline", ["angry", "disgust", "fear", "happy", "sad", "surprise", "contempt"])
    load_stage("gray48").main(["--images", str(ck_frames / "ingest/images.h5"), "--out", str(w / "gray48.h5"),
                               "--sheet", "", "--params", str(REPO / "params.yaml")])
    load_stage("features").main(["--params", str(w / "absent.yaml"), "--images", str(w / "gray48.h5"),
                                 "--manifest", str(ck_frames / "ingest/manifest.csv"), "--out", str(w / "f.h5"),
                                 "--metrics", str(w / "features.json"), "-S", f"sequence.features.checkpoint={w / 'cnn.pt'}",
                                 "-S", "sequence.features.layer=fc1"])
    # params.yaml `sequence:` section is read when present; the command line overrides it
    (w / "params.yaml").write_text("sequence:\n  model: lstm\n  folds: 3\n  lstm: {hidden: 32}\n"
                                   "  train: {epochs: 4, patience: 5, seed: 3, lr: 0.003}\n")
    args = ["--params", str(w / "params.yaml"), "--features", str(w / "f.h5"), "--model-out", str(w / "seq.pt"),
            "--metrics", str(w / "seq.json"), "--plots", str(w / "plots"), "--predictions", str(w / "pred.csv"),
            "--live", str(w / "live"), "-S", "sequence.train.epochs=15", "--results", str(w / "results.json")]
    capsys.readouterr()
    load_stage("train_sequence").main(args)
    m = json.loads((w / "seq.json").read_text())
    out = capsys.readouterr().out.splitlines()     # progress: what runs, a line per fold, the final model
    assert out[0].startswith("train_sequence: lstm on 262 sequences") and "3-fold" in out[0]
    assert [ln.split(":")[0] for ln in out[1:5]] == ["fold 0", "fold 1", "fold 2", "final model"], out
    headline = json.loads((w / "results.json").read_text())  # the one-screen summary (a DVC metric)
    assert list(headline) == ["seq_accuracy_mean", "seq_accuracy_std", "seq_macro_f1", "seq_model", "sequences"]
    assert headline["seq_accuracy_mean"] == m["mean"]["accuracy"] and headline["sequences"] == 262
    assert m["model"] == "lstm" and m["sequences"] == 262 and m["subject_independent"] is True
    assert len(m["per_fold"]) == 3 and all(f["epochs"] <= 15 for f in m["per_fold"])
    assert set(m["mean"]) >= {"accuracy", "macro_f1", "auc"} and set(m["std"]) >= {"accuracy"}
    assert set(m["by_first_k"]) == {"k1", "k2", "k3", "k4"}
    assert m["mean"]["accuracy"] > 0.3  # above the majority class (65/262 = 0.25) even from random-CNN features
    assert (w / "plots/confusion.png").stat().st_size > 1000
    # the image stage's dvclive layout: a folder per fold and the final model
    assert (w / "live/fold0/plots/metrics/val/loss.tsv").exists() and (w / "live/final/plots/metrics/val/acc.tsv").exists()
    assert not list(w.glob("live/**/metrics.json"))
    pred = pd.read_csv(w / "pred.csv")
    assert len(pred) == 262 and pred.groupby("subject")["fold"].nunique().max() == 1
    model, info = load_sequence_model(w / "seq.pt")
    assert isinstance(model, LSTMNet) and model.lstm.hidden_size == 32 and info["meta"]["config"]["seed"] == 3
    # one checkpoint format: the image checkpoints' keys; image code (recognize, features) refuses it by name
    from ferpipe.models.checkpoint import CheckpointError, read_checkpoint_info
    meta = read_checkpoint_info(w / "seq.pt")
    assert meta["model"] == "lstm" and meta["num_classes"] == 7 and len(meta["classes"]) == 7
    assert meta["model_kwargs"]["in_shape"] == list(model.in_shape) and meta["model_kwargs"]["hidden"] == 32
    with pytest.raises(CheckpointError, match=r"a sequence model \('lstm', from train_sequence\)"):
        load_checkpoint(w / "seq.pt")
    # train.init_from (LSTM-on-CNN --load): a fold starts from the saved weights (at lr 0 it keeps them)
    from ferpipe.sequences.train import train_one
    from ferpipe.train.loop import Runtime
    data = load_sequences(w / "f.h5")
    resume = {"lstm": {"hidden": 32}, "folds": 3, "train": {"epochs": 1, "lr": 0.0, "init_from": str(w / "seq.pt")}}
    again, _ = train_one(data, np.arange(200), np.arange(200, 262), SequenceConfig.from_params(resume), 0,
                         Runtime(torch.device("cpu")))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    with pytest.raises(ValueError, match="do not fit this lstm model"):
        train_one(data, np.arange(200), np.arange(200, 262),
                  SequenceConfig.from_params({**resume, "lstm": {"hidden": 16}}), 0, Runtime(torch.device("cpu")))
    load_stage("train_sequence").main(["--test-only", "--model-in", str(w / "seq.pt"), "--features", str(w / "f.h5"),
                                       "--outputs", str(w / "test.h5"), "--metrics", str(w / "test.json")])
    t = read_h5(w / "test.h5")
    assert t["outputs"].shape == (262, 7) and t["steps"].shape == (262, 4, 7) and t["seq_number"].dtype == np.int32
    assert np.allclose(t["outputs"].sum(1), 1, atol=1e-5) and t["label"].shape == (262, 1)
    # clips of 3 frames per real CK+ sequence (the Emotion SDK's clip sampling), random in training
    load_stage("train_sequence").main(args + ["-S", "sequence.clip_frames=3", "-S", "sequence.clip_sampling=random",
                                              "-S", "sequence.train.epochs=2", "-S", "sequence.train.final=false"])
    clipped = json.loads((w / "seq.json").read_text())
    assert set(clipped["by_first_k"]) == {"k1", "k2", "k3"} and clipped["sequences"] == 262
    # a short window longer than every sequence is a clear error
    with pytest.raises(ValueError, match="no test sample|empty training"):
        load_stage("train_sequence").main(args + ["-S", "sequence.rho=5", "-S", "sequence.train.final=false"])


# ------------------------------------------------------------------------------------------------
# snapshots and resume, evaluation batch size, regression plots (real CK+ frames)

@pytest.fixture(scope="module")
def ck_images(ck_frames, tmp_path_factory):
    """The real CK+ frames as a features file (images mode, 16 px), with valence/arousal GENERATED per frame
    for task regress: the class's value (test_valence's VA where it has the class) times the frame's
    position in its sequence (the expression rising from neutral to apex)."""
    out = tmp_path_factory.mktemp("ck_images")
    man = pd.read_csv(ck_frames / "ingest/manifest.csv", keep_default_na=False)
    va = {"happy": (0.7, 0.4), "sad": (-0.6, -0.3), "angry": (-0.5, 0.6), "surprise": (0.3, 0.8),
          "disgust": (-0.6, 0.3), "fear": (-0.4, 0.7), "contempt": (-0.3, 0.1)}
    rise = (man["frame_index"] + 1) / man.groupby("sequence_id")["frame_index"].transform("size")
    man["valence"] = rise * man["label_name"].map(lambda c: va[c][0])
    man["arousal"] = rise * man["label_name"].map(lambda c: va[c][1])
    man.to_csv(out / "manifest.csv", index=False)
    run_features(ck_frames / "ingest/images.h5", out / "manifest.csv", out / "f.h5", mode="images", size=16)
    return out / "f.h5"


def test_a_killed_sequence_run_resumes_bitwise_on_real_ck(ck_images, tmp_path, monkeypatch, capsys):
    """train_sequence (3 folds + the final model, 6 epochs each, a snapshot every 2, clip augmentation and
    dropout on), killed in fold 1's 5th epoch and run again: fold 0 is not retrained, fold 1 continues after
    epoch 4, and the metrics, predictions, saved model and dvclive curves are byte for byte those of an
    uninterrupted run; the snapshots are gone afterwards."""
    from ferpipe.sequences.train import run_train_sequence
    from test_resume import Killed, count_epochs, files
    cfg = SequenceConfig(model="lstm", folds=3, epochs=6, patience=0, batch_size=16, augment=True, seed=3,
                         lstm={"hidden": 8, "depth": 1, "dropout": 0.5}, snapshot_every=2)

    def run(out: Path, snaps: Path) -> dict:
        return run_train_sequence(ck_images, out / "m.pt", out / "m.json", None, out / "p.csv", out / "live", cfg,
                                  progress=None, snapshots=snaps)

    count_epochs(monkeypatch, kill_at=6 + 5)
    with pytest.raises(Killed):
        run(tmp_path / "a", tmp_path / "snaps")
    [folder] = list((tmp_path / "snaps").iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["fold0.pt", "fold1.pt"] and not (tmp_path / "a/m.json").exists()
    state = torch.load(folder / "fold1.pt", weights_only=True)
    assert state["epoch"] == 4 and state["rng"][0]["augment"] is not None   # ClipAugment's generator
    capsys.readouterr()
    epochs = count_epochs(monkeypatch)
    run(tmp_path / "a", tmp_path / "snaps")
    err = capsys.readouterr().err
    assert len(epochs) == 2 + 6 + 6 and "fold 0: finished in an earlier run" in err
    assert "fold 1: resumed from its snapshot after epoch 4" in err and not (tmp_path / "snaps").exists()
    run(tmp_path / "b", tmp_path / "snaps_b")
    for name in ("m.json", "p.csv", "m.pt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert files(tmp_path / "a/live") == files(tmp_path / "b/live")
    assert len((tmp_path / "a/live/fold1/plots/metrics/val/loss.tsv").read_text().splitlines()) == 1 + 6


def test_sequence_eval_batch_size_and_regression_plots_on_real_ck(ck_images, tmp_path, monkeypatch):
    """sequence.train.eval_batch_size is the batch of every validation pass inside training and of the test
    passes (a batch size, not a result: the figures agree with 256's); task regress draws validation
    predictions vs targets every plot_every epochs into each fold's dvclive folder."""
    import ferpipe.sequences.train as seq_train
    from ferpipe.train import loop
    data = load_sequences(ck_images, "regress")
    assert data.regression == ["valence", "arousal"]
    sizes = []
    real_eval, real_predict = loop.evaluate_rows, seq_train.predict
    monkeypatch.setattr(loop, "evaluate_rows", lambda *a, **k: sizes.append(("val", a[5])) or real_eval(*a, **k))
    monkeypatch.setattr(seq_train, "predict", lambda *a, **k: sizes.append(("test", a[4])) or real_predict(*a, **k))
    cfg = SequenceConfig.from_params({"task": "regress", "folds": 3, "lstm": {"hidden": 8, "dropout": 0.0},
                                      "train": {"epochs": 4, "batch_size": 16, "eval_batch_size": 7,
                                                "plot_every": 2, "snapshot_every": 0}})
    small = cross_validate(data, cfg, live_dir=str(tmp_path / "live"), progress=None)
    assert {s for _, s in sizes} == {7} and [w for w, _ in sizes].count("test") == 3 and len(sizes) == 3 * 4 + 3
    for k in range(3):
        plots = tmp_path / f"live/fold{k}/plots/images/regression"
        assert sorted(p.name for p in plots.iterdir()) == ["2.png", "4.png"]
        assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 10_000 for p in plots.iterdir())
    cfg.eval_batch_size = 256
    whole = cross_validate(data, cfg, progress=None)
    for key in ("mse", "pearson", "ccc_valence"):
        assert small["mean"][key] == pytest.approx(whole["mean"][key], rel=1e-4, abs=1e-6), key
    with pytest.raises(ValueError, match="sequence.train.eval_batch_size must be a whole number >= 1"):
        SequenceConfig.from_params({"train": {"eval_batch_size": 0}})
