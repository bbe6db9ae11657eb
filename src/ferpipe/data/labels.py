"""Canonical class names, the datasets' label codes, and the Guided-ST 3-class polarity mapping.

Every reader turns its dataset's labels into one vocabulary (lower-case FER-2013 names, plus
`contempt` for AffectNet and `neutral/positive/negative` for Guided-ST polarity files), so later
stages never need to know which dataset a manifest came from.
"""
from __future__ import annotations

import math
from typing import Iterable

# fer2013.csv `emotion` codes 0..6, in this order; also the order of the class list
FER2013_CLASSES = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")

# AffectNet `expression` codes 0..7 are expressions; 8..10 mark rows without an expression label
AFFECTNET_CLASSES = ("neutral", "happy", "sad", "surprise", "fear", "disgust", "angry", "contempt")
AFFECTNET_NON_EXPRESSION = {8: "none", 9: "uncertain", 10: "no-face"}

# Guided-ST polarity codes (their CSV `emotion` column and the output of `polarity`)
POLARITY_CLASSES = ("neutral", "positive", "negative")

ALIASES = {
    "anger": "angry",
    "sadness": "sad",
    "happiness": "happy",
    "surprised": "surprise",
    "fearful": "fear",
    "disgusted": "disgust",
}

_POLARITY_OF_NAME = {
    "neutral": 0,
    "happy": 1,
    "positive": 1,
    "angry": 2,
    "disgust": 2,
    "fear": 2,
    "sad": 2,
    "contempt": 2,
    "negative": 2,
    "surprise": None,  # ambiguous polarity: Guided-ST drops it
}


class LabelError(ValueError):
    """A label value that is not a usable class (the message is a short human reason)."""


def canonical(name: str) -> str:
    """Lower-case, stripped, aliases resolved (`Anger` -> `angry`). Unknown names stay as they are
    (lower-cased), so a dataset with its own classes still works; "" stays ""."""
    key = str(name).strip().lower()
    return ALIASES.get(key, key)


def _code(value, what: str) -> int:
    """Parse an integer label code ("3", 3, 3.0); LabelError if it is not an integer."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise LabelError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(f) or f != int(f):
        raise LabelError(f"{what} {value!r} is not an integer code")
    return int(f)


def fer2013_name(code) -> str:
    """fer2013.csv emotion code (0..6) -> canonical name."""
    c = _code(code, "emotion")
    if not 0 <= c < len(FER2013_CLASSES):
        raise LabelError(f"emotion {c} out of range 0..{len(FER2013_CLASSES) - 1}")
    return FER2013_CLASSES[c]


def affectnet_name(code) -> str:
    """AffectNet expression code (0..7) -> canonical name; codes 8..10 are not expressions."""
    c = _code(code, "expression")
    if c in AFFECTNET_NON_EXPRESSION:
        raise LabelError(f"expression {c} ({AFFECTNET_NON_EXPRESSION[c]}) is not an expression label")
    if not 0 <= c < len(AFFECTNET_CLASSES):
        raise LabelError(f"expression {c} out of range 0..10")
    return AFFECTNET_CLASSES[c]


def polarity_name(code) -> str:
    """Guided-ST polarity code (0 neutral, 1 positive, 2 negative) -> name."""
    c = _code(code, "emotion")
    if not 0 <= c < len(POLARITY_CLASSES):
        raise LabelError(f"polarity {c} out of range 0..2")
    return POLARITY_CLASSES[c]


def polarity(name: str, valence: float | None = None) -> int | None:
    """Guided-ST 3-class polarity: 0 neutral, 1 positive, 2 negative, None = dropped.

    With a valence (AffectNet), the valence decides: [-0.2, 0.2] -> 0, > 0.2 -> 1, < -0.2 -> 2.
    Otherwise the class name does: neutral -> 0, happy -> 1, angry/disgust/fear/sad/contempt -> 2,
    surprise -> None (it can be either, so Guided-ST drops it). Unknown names -> None.
    """
    if valence is not None and not (isinstance(valence, float) and math.isnan(valence)):
        v = float(valence)
        return 1 if v > 0.2 else 2 if v < -0.2 else 0
    return _POLARITY_OF_NAME.get(canonical(name))


def class_list(names: Iterable[str]) -> list[str]:
    """The classes present in `names`: FER-2013 order first, then any others (e.g. contempt) sorted
    (numeric names as numbers).

    Empty names (unlabelled rows) are ignored. A Guided-ST polarity dataset (only neutral/positive/
    negative) gets the polarity order, so a class index equals its Guided-ST code.
    """
    present = {canonical(n) for n in names} - {""}
    if present - {"neutral"} and present <= set(POLARITY_CLASSES):
        return [c for c in POLARITY_CLASSES if c in present]
    ordered = [c for c in FER2013_CLASSES if c in present]
    # numeric class names (list files) sort as numbers: 2 before 10
    return ordered + sorted(present - set(FER2013_CLASSES), key=_natural)


def _natural(name: str):
    return (0, int(name), "") if name.isdigit() else (1, 0, name)
