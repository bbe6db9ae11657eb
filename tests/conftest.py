"""Shared fixtures: the real data beside the checkout (../shared/data), skipped with a reason if absent."""
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def fer_dir() -> Path:
    path = SHARED_DATA / "fer2013"
    if not (path / "train").is_dir():
        pytest.skip(f"real FER-2013 not found at {path}")
    return path


@pytest.fixture(scope="session")
def sequences_dir() -> Path:
    path = SHARED_DATA / "sequences"
    if not (path / "labels.csv").is_file():
        pytest.skip(f"real CK+ sequences not found at {path}")
    return path


def fer_slice(fer_dir: Path, split: str = "train", per_class: int = 8, classes=None) -> tuple[np.ndarray, list[str]]:
    """The first `per_class` images (sorted names) of each class folder: uint8 [N,48,48] and labels."""
    images, labels = [], []
    for cls_dir in sorted((fer_dir / split).iterdir()):
        if classes and cls_dir.name not in classes:
            continue
        for f in sorted(cls_dir.iterdir())[:per_class]:
            images.append(cv2.imread(str(f), cv2.IMREAD_GRAYSCALE))
            labels.append(cls_dir.name)
    return np.stack(images), labels
