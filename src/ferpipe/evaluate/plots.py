"""Evaluation pictures: the confusion matrix (counts + row-normalized) and the worst-errors sheet; for a
valence/arousal model the predicted-vs-true scatter per target and the largest-errors sheet."""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ferpipe.store import atomic_path  # noqa: E402


def _png(fig) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _write_png(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _save(fig, path: str | os.PathLike) -> None:
    _write_png(path, _png(fig))


def confusion_png(path: str | os.PathLike, cm: np.ndarray, classes: list[str], title: str = "") -> None:
    """Two panels: counts, and rows normalized to 1 (recall on the diagonal)."""
    cm = np.asarray(cm)
    rows = cm.sum(1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, float), where=rows > 0)
    k = len(classes)
    side = max(3.5, 0.7 * k + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 1, side), layout="constrained")
    for ax, mat, fmt, name in ((axes[0], cm, "d", "counts"), (axes[1], norm, ".2f", "row-normalized")):
        im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for i in range(k):
            for j in range(k):
                ax.text(j, i, format(mat[i, j], fmt), ha="center", va="center", fontsize=8,
                        color="white" if norm[i, j] > 0.5 else "black")
        ax.set_xticks(range(k), classes, rotation=45, ha="right")
        ax.set_yticks(range(k), classes)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(name)
    fig.colorbar(im, ax=axes, fraction=0.03)
    if title:
        fig.suptitle(title)
    _save(fig, path)


def worst_errors(y: np.ndarray, probs: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k most confident wrong predictions (highest probability on a wrong class)."""
    pred = probs.argmax(1)
    wrong = np.flatnonzero(pred != np.asarray(y))
    order = np.argsort(-probs[wrong, pred[wrong]], kind="stable")
    return wrong[order[:k]]


def _error_sheet(path: str | os.PathLike, images: np.ndarray, idx: np.ndarray, titles: list[str], title: str,
                 cols: int, cell: tuple[float, float], fontsize: float) -> int:
    """A contact sheet of images[idx] titled one by one (a 'no errors' sheet when idx is empty)."""
    n = len(idx)
    cols = max(1, min(cols, n)) if n else 1
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = plt.subplots(rows, cols, figsize=(cell[0] * cols, cell[1] * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, i, text in zip(axes.ravel(), idx, titles):
        ax.imshow(images[i], cmap="gray", vmin=0, vmax=255)
        ax.set_title(text, fontsize=fontsize)
    if n == 0:
        axes[0, 0].text(0.5, 0.5, "no errors", ha="center", va="center")
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return n


def errors_png(path: str | os.PathLike, images: np.ndarray, y: np.ndarray, probs: np.ndarray,
               classes: list[str], k: int = 36, cols: int = 6, title: str = "") -> int:
    """Contact sheet of the k most confident errors, each titled true / predicted (probability).

    Returns how many errors are shown (a sheet saying 'no errors' when there are none)."""
    idx = worst_errors(y, probs, k)
    pred = probs.argmax(1)
    titles = [f"true {classes[y[i]]}\npred {classes[pred[i]]} {probs[i, pred[i]]:.2f}" for i in idx]
    return _error_sheet(path, images, idx, titles, title or f"{len(idx)} most confident errors", cols, (1.7, 2.0), 7)


def scatter_png(path: str | os.PathLike, y: np.ndarray, pred: np.ndarray, names: list[str], title: str = "",
                metrics: dict | None = None, lims: tuple[float, float] = (-1.0, 1.0)) -> None:
    """``scatter_png_bytes`` written to `path`."""
    _write_png(path, scatter_png_bytes(y, pred, names, title, metrics, lims))


def scatter_png_bytes(y: np.ndarray, pred: np.ndarray, names: list[str], title: str = "",
                      metrics: dict | None = None, lims: tuple[float, float] = (-1.0, 1.0)) -> bytes:
    """One panel per target: predicted against true value per row and the diagonal (perfect answers);
    with `metrics` (``regression_metrics``'s dict) the target's RMSE and CCC in the panel title. The
    axes span `lims` (AffectNet's [-1, 1]) or more. The evaluate stage's scatter, and the training
    loop's per-epoch regression plot (``ferpipe.train.loop``), as PNG bytes."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.2), squeeze=False, layout="constrained")
    lo = min(lims[0], float(np.nanmin(y, initial=lims[0])), float(np.nanmin(pred, initial=lims[0])))
    hi = max(lims[1], float(np.nanmax(y, initial=lims[1])), float(np.nanmax(pred, initial=lims[1])))
    for j, (ax, name) in enumerate(zip(axes[0], names)):
        ax.plot([lo, hi], [lo, hi], "-", color="0.6", lw=1)
        ax.scatter(y[:, j], pred[:, j], s=8, alpha=0.5, edgecolors="none")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xlabel(f"true {name}")
        ax.set_ylabel(f"predicted {name}")
        ax.set_title(f"{name}: RMSE {metrics[f'rmse_{name}']:.3f}, CCC {metrics[f'ccc_{name}']:.3f}"
                     if metrics else name, fontsize=9)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _png(fig)


def regression_errors_png(path: str | os.PathLike, images: np.ndarray, y: np.ndarray, pred: np.ndarray,
                          names: list[str], k: int = 36, cols: int = 6, title: str = "") -> int:
    """Contact sheet of the k rows whose prediction is farthest from the truth (Euclidean distance over
    the targets), each titled with the true and predicted values. Returns how many are shown."""
    y, pred = np.asarray(y, float), np.asarray(pred, float)
    dist = np.sqrt(((y - pred) ** 2).sum(1))
    idx = np.argsort(-dist, kind="stable")[:k]
    short = [name[0] for name in names]
    titles = [f"true {' '.join(f'{s} {v:+.2f}' for s, v in zip(short, y[i]))}\n"
              f"pred {' '.join(f'{s} {v:+.2f}' for s, v in zip(short, pred[i]))}" for i in idx]
    return _error_sheet(path, images, idx, titles, title or f"{len(idx)} largest errors", cols, (1.9, 2.1), 6)


def curves_png(path: str | os.PathLike, histories: dict[str, list[dict]], title: str = "") -> None:
    """Learning curves, one color per run (fold or final): loss and accuracy per epoch (a valence/arousal
    run has none: NaN), training dashed, validation solid, a dot on each run's best validation epoch. ``histories``: run name -> rows
    {epoch, train_loss, train_acc[, val_loss, val_acc]} (a checkpoint's meta["history"])."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), layout="constrained")
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, rows) in enumerate(histories.items()):
        if not rows:
            continue
        c = colors[i % len(colors)]
        epoch = [r["epoch"] for r in rows]
        for ax, key in ((axes[0], "loss"), (axes[1], "acc")):
            ax.plot(epoch, [r[f"train_{key}"] for r in rows], "--", color=c, lw=1, alpha=0.8)
            if "val_" + key in rows[0]:
                val = [r[f"val_{key}"] for r in rows]
                ax.plot(epoch, val, "-", color=c, lw=1.5, label=name)
                accs = np.array([r["val_acc"] for r in rows], float)
                # the best validation epoch; a valence/arousal run has no accuracy: its lowest loss
                best = int(np.argmax(accs)) if np.isfinite(accs).any() else int(np.nanargmin([r["val_loss"] for r in rows]))
                ax.plot(epoch[best], val[best], "o", color=c, ms=4)
            else:
                ax.lines[-1].set_label(f"{name} (training only)")
    for ax, name in ((axes[0], "loss"), (axes[1], "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8, title="solid: validation, dashed: training", title_fontsize=8)
    accs = [r["train_acc"] for rows in histories.values() for r in rows]
    if accs and not np.isfinite(accs).any():
        axes[1].text(0.5, 0.5, "no accuracy: a valence/arousal regression", ha="center", va="center",
                     transform=axes[1].transAxes, color="0.4")
    if title:
        fig.suptitle(title)
    _save(fig, path)
