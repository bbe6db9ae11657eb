"""Ingest's face crop for in-the-wild photos: find the largest face, align it, frame it like FER-2013."""
from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
from skimage import data as skdata

from conftest import REPO, load_stage
from ferpipe.store import read_attrs, read_h5


def test_photos_become_aligned_face_crops(sequences_dir, tmp_path):
    root = tmp_path / "photos"
    (root / "train" / "happy").mkdir(parents=True)
    (root / "train" / "surprise").mkdir(parents=True)
    astronaut = cv2.cvtColor(skdata.astronaut(), cv2.COLOR_RGB2BGR)
    cv2.imwrite(str(root / "train/happy/astronaut.jpg"), astronaut)
    boxes = {}
    for seq, label, (x, y) in (("S010_006", "happy", (300, 60)), ("S010_002", "surprise", (40, 180))):
        frame = sorted((sequences_dir / "frames" / seq).iterdir())[-1]           # the apex frame
        face = cv2.resize(cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE), (220, 220), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((480, 640), 120, np.uint8)
        canvas[y:y + 220, x:x + 220] = face
        name = f"train/{label}/{seq}.png"
        cv2.imwrite(str(root / name), canvas)
        boxes[name] = (x, y, x + 220, y + 220)
    cv2.imwrite(str(root / "train/surprise/wall.png"), np.full((300, 400), 90, np.uint8))   # no face
    out = tmp_path / "out"
    load_stage("ingest").main(["--params", str(REPO / "params.yaml"), "-S", "dataset.format=folder", "-S",
                               f"dataset.path={root}", "-S", "dataset.face_crop=true", "--out", str(out / "images.h5"),
                               "--manifest", str(out / "manifest.csv"), "--rejects", str(out / "rejects.csv"),
                               "--metrics", str(out / "m.json"), "--sheet", "", "--quiet", "-S", "ingest.workers=1"])
    images = read_h5(out / "images.h5")["images"]
    manifest = pd.read_csv(out / "manifest.csv", keep_default_na=False)
    rejects = pd.read_csv(out / "rejects.csv")
    assert images.shape == (3, 48, 48) and read_attrs(out / "images.h5")["face_crop"]
    assert list(rejects["reason"]) == ["no face found (ingest.face_crop)"]
    assert rejects["source"].iloc[0].endswith("wall.png")
    for _, row in manifest.iterrows():
        name = row["source"][len(str(root)) + 1:]
        x0, y0, x1, y1 = (float(row[c]) for c in ("face_x0", "face_y0", "face_x1", "face_y1"))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        if name in boxes:                       # the face box lies on the placed CK+ face
            bx0, by0, bx1, by1 = boxes[name]
            assert bx0 < cx < bx1 and by0 < cy < by1
        else:
            assert 150 < cx < 300 and 50 < cy < 200   # the astronaut's face
        assert row["face_detector"] in ("hog_fast", "hog", "mtcnn")
    # the crops are faces framed like FER-2013: a face detector finds them again at 96 px
    from ferpipe.faces.landmarks import detect_landmarks
    assert detect_landmarks(images, passes=("dlib", "dlib_equalized", "dlib_padded"), progress=False).found.all()
