"""Where the pretrained face models live: files shipped inside installed packages, never downloaded.

face_recognition_models' __init__ imports pkg_resources (deprecated); we locate its files without
importing it.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {name} is not installed (see requirements.txt)")
    return Path(list(spec.submodule_search_locations)[0])


def dlib_model(filename: str = "shape_predictor_68_face_landmarks.dat") -> str:
    """Path of a dlib model file from face_recognition_models (68-point predictor, mmod detector, ...)."""
    path = _package_dir("face_recognition_models") / "models" / filename
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: reinstall face_recognition_models==0.3.0")
    return str(path)
