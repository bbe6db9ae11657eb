"""The evaluate stage: test-split metrics of the trained model(s), predictions, confusion, worst errors.

Only rows with split == test are read (FER-2013 PublicTest for ../shared/data/fer2013); they took
no part in training or model selection. The model evaluated (``evaluate.members``):

* ``auto``: models/final.pt when it exists, else the fold models together;
* ``final``: models/final.pt (an error when absent);
* ``folds``: every models/fold<k>.pt, their softmax probabilities averaged (a k-model ensemble).

``eval.json`` says which (``members``, ``checkpoints``). Test-time augmentation
(``evaluate.tta: N``): N augmented copies of each image (flip / small affine from
``evaluate.tta_augment``, seeded) whose softmax is averaged with the plain prediction's; or, with
``evaluate.tta_mode: tencrop``, the classic deterministic ten crops (the four corners and the centre
at 90% of the side, and their mirror images, each resized to the model's input) averaged.

A valence/arousal model (checkpoint meta "task": "valence_arousal"): its outputs, each member's
mapped back to the original scale with its own target_mean / target_std, are averaged over members
and TTA copies alike. eval.json then has AffectNet's figures per target (``regression_metrics``:
rmse, pearson, ccc, mse, and sagr for valence) and their means, the predictions CSV is
id, actual_<target>, predicted_<target>, the confusion path gets the predicted-vs-true scatter per
target, the errors path the largest errors, and the summary test_rmse / test_ccc.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from ferpipe.data.augment import BatchAugment
from ferpipe.data.tensors import TensorData, load_data
from ferpipe.evaluate.metrics import (classification_metrics, confusion, headline, predictions_table,
                                     regression_metrics, regression_table)
from ferpipe.evaluate.plots import confusion_png, errors_png, regression_errors_png, scatter_png
from ferpipe.models.checkpoint import load_checkpoint, regression_scale
from ferpipe.models.inference import inference_model
from ferpipe.models.inputs import InputSpec, normalize, split_channels
from ferpipe.store import settle, write_csv, write_json, write_text, writes

DEFAULTS = {
    "members": "auto", "tta": 0, "tta_mode": "random", "tta_augment": {"hflip": 0.5, "degrees": 5, "scale": [0.95, 1.05], "translate": 0.05},
    "seed": 2020, "batch_size": 128, "errors": 36, "device": "auto", "threads": 0,
}


def resolve_params(prm: dict | None) -> dict:
    prm = dict(prm or {})
    unknown = set(prm) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown evaluate params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in prm.items() if v is not None}}
    if out["members"] not in ("auto", "final", "folds"):
        raise ValueError(f"evaluate.members must be auto, final or folds, got {out['members']!r}")
    if int(out["tta"]) < 0:
        raise ValueError("evaluate.tta must be >= 0")
    if out["tta_mode"] not in TTA_MODES:
        raise ValueError(f"evaluate.tta_mode must be one of {', '.join(TTA_MODES)}, got {out['tta_mode']!r}")
    return out


TTA_MODES = ("random", "tencrop")


def ten_crops(x: torch.Tensor, share: float = 0.9) -> list[torch.Tensor]:
    """The ten-crop views of a batch [B, C, S, S]: corners and centre at `share` of the side, and mirrors."""
    s = x.shape[-1]
    c = max(1, int(round(share * s)))
    m = (s - c) // 2
    crops = [x[..., :c, :c], x[..., :c, s - c:], x[..., s - c:, :c], x[..., s - c:, s - c:], x[..., m:m + c, m:m + c]]
    return crops + [v.flip(-1) for v in crops]


_FOLD_FILE = re.compile(r"^fold(\d+)\.pt$")


def select_checkpoints(models_dir: str | os.PathLike, members: str = "auto") -> tuple[str, list[Path]]:
    """('final' | 'folds', the checkpoint paths) for an evaluate.members setting.

    Only the train stage's names count: final.pt and fold<k>.pt (k a number). Any other .pt file in
    the folder (a user's fold_old.pt) is left out with a warning, never averaged in. A train run
    killed while swapping its folder in is completed first (ferpipe.store.settle).
    """
    models_dir = Path(models_dir)
    settle(models_dir)
    final = models_dir / "final.pt"
    found = sorted(models_dir.glob("*.pt"))
    folds = sorted((p for p in found if _FOLD_FILE.match(p.name)), key=lambda p: int(_FOLD_FILE.match(p.name)[1]))
    for p in found:
        if p != final and p not in folds:
            print(f"warning: {p} is not a train stage checkpoint name (fold<k>.pt, final.pt): not evaluated")
    if members in ("auto", "final") and final.is_file():
        return "final", [final]
    if members == "final":
        raise FileNotFoundError(f"evaluate.members is final but {final} does not exist (train.final: true?)")
    if not folds:
        raise FileNotFoundError(f"no checkpoints in {models_dir} (fold<k>.pt or final.pt); run the train stage")
    return "folds", folds


@torch.inference_mode()
def predict_pixels(model: torch.nn.Module, pixels: torch.Tensor, spec: InputSpec, tta: int = 0,
                   tta_augment: dict | None = None, seed: int = 0, batch_size: int = 128,
                   scale: tuple[np.ndarray, np.ndarray] | None = None, tta_mode: str = "random") -> np.ndarray:
    """Softmax probabilities [N, C] of uint8 pixels [N, C, S, S] (on the model's device), in batches of
    `batch_size`; with tta > 0 averaged over the plain + tta augmented copies (one seeded stream, so the
    same pixels in the same order and batches give the same numbers: evaluate and ferpipe.recognize);
    tta_mode tencrop: averaged over the ten crops (``ten_crops``; `tta` is not used).
    With `scale` (a valence/arousal model's ``regression_scale``: mean, std) the raw outputs instead,
    averaged the same way and mapped back to the original scale (output * std + mean)."""
    model.eval()
    act = (lambda z: z) if scale is not None else (lambda z: torch.softmax(z, 1))
    aug = BatchAugment.from_params(tta_augment, seed=seed) if tta and tta_mode == "random" else None
    out = []
    for chunk in pixels.split(batch_size):
        x = chunk.float().div_(255.0)
        if tta_mode == "tencrop":
            views = ten_crops(x)
            p = sum(act(model(*split_channels(normalize(v, spec), spec.image_channels)).float()) for v in views)
            out.append((p / len(views)).cpu())
            continue
        p = act(model(*split_channels(normalize(x, spec), spec.image_channels)).float())
        for _ in range(int(tta)):
            p += act(model(*split_channels(normalize(aug(x), spec), spec.image_channels)).float())
        out.append((p / (1 + int(tta))).cpu())
    result = torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))
    if scale is not None and len(result):
        result = result * scale[1] + scale[0]
    return result


def predict(model: torch.nn.Module, data: TensorData, rows: torch.Tensor, spec: InputSpec, tta: int = 0,
            tta_augment: dict | None = None, seed: int = 0, batch_size: int = 128,
            scale: tuple[np.ndarray, np.ndarray] | None = None, tta_mode: str = "random") -> np.ndarray:
    """Softmax probabilities [len(rows), C] of the rows of `data` (``predict_pixels``), or with `scale` a
    valence/arousal model's predictions on the original scale."""
    if len(rows) == 0:
        return np.zeros((0, len(data.classes)))
    return predict_pixels(model, data.pixels[rows], spec, tta, tta_augment, seed, batch_size, scale, tta_mode)


def display_images(pixels: torch.Tensor, image_channels: int) -> np.ndarray:
    """Test pixels [N, C, S, S] as matplotlib shows images (the errors sheets): gray [N, S, S], or RGB [N, S, S, 3]."""
    if image_channels == 3:
        return pixels[:, :3].permute(0, 2, 3, 1).cpu().numpy()
    return pixels[:, 0].cpu().numpy()


@writes("metrics_path", "predictions_path", "confusion_path", "errors_path", "results_path")
def run_evaluate(params: dict, models_dir: str = "models", split_csv: str = "data/split/split.csv",
                 gray48: str = "data/gray48/images.h5", guides_dir: str = "data/guides",
                 metrics_path: str | None = "metrics/eval.json", predictions_path: str | None = "plots/eval/predictions.csv",
                 confusion_path: str | None = "plots/eval/confusion.png", errors_path: str | None = "plots/eval/errors.png",
                 results_path: str | None = None, train_metrics: str | None = None) -> dict:
    """The evaluate stage on the test split; `results_path`: the one-screen summary (metrics.headline, with the
    validation figures of `train_metrics` when that file exists), written with the other outputs as one set."""
    prm = resolve_params(params.get("evaluate"))
    device = torch.device("cuda" if prm["device"] == "auto" and torch.cuda.is_available() else
                          ("cpu" if prm["device"] == "auto" else prm["device"]))
    if device.type == "cpu":
        torch.set_num_threads(int(prm["threads"]) or (os.cpu_count() or 1))
    kind, paths = select_checkpoints(models_dir, prm["members"])
    loaded = [load_checkpoint(p, map_location=device) for p in paths]
    loaded = [(inference_model(model), info) for model, info in loaded]  # as ferpipe.recognize applies them
    names = {info["model"] for _, info in loaded}
    if len(names) != 1:
        raise ValueError(f"checkpoints in {models_dir} are of different models {sorted(names)}")
    name = names.pop()
    first = loaded[0][1]
    if params.get("model") and params["model"] != name:
        print(f"warning: params model is {params['model']!r} but {models_dir} holds {name!r} checkpoints; "
              "evaluating the checkpoints (dvc repro retrains)")
    data = load_data(split_csv, name, first.get("model_kwargs"), gray48, guides_dir, device, splits=("test",))
    classes = list(first["classes"])
    if data.classes != classes:
        raise ValueError(f"the split's classes {data.classes} differ from the checkpoints' {classes} "
                         "(task changed since training? dvc repro)")
    data.classes = classes
    rows = data.test_rows()
    if len(rows) == 0:
        raise ValueError(f"{split_csv}: no test rows (split.test in params.yaml)")
    scales = [regression_scale(info) for _, info in loaded]
    regression = scales[0] is not None
    if any((s is not None) != regression for s in scales) or regression != data.regression:
        raise ValueError(f"the checkpoints in {models_dir} and the split {split_csv} do not agree on the task "
                         "(valence/arousal regression or classes; task changed since training? dvc repro)")
    probs = np.zeros((len(rows), len(classes)))
    pixels = data.pixels[rows]  # read once (from disk when streamed) for every member and the errors sheet
    for (model, info), scale in zip(loaded, scales):
        spec = InputSpec.from_dict(info["meta"].get("input"))
        if spec.image_channels != data.spec.image_channels:
            raise ValueError(f"the checkpoints in {models_dir} take {spec.image_channels}-channel images, {gray48} "
                             f"holds {data.spec.image_channels}-channel ones (ingest.color changed since training? "
                             "dvc repro)")
        probs += predict_pixels(model.to(device), pixels, spec, prm["tta"], prm["tta_augment"], prm["seed"],
                                prm["batch_size"], scale, prm["tta_mode"])
    probs /= len(loaded)
    y = data.targets[rows].cpu().numpy()
    header = {"model": name, "members": kind, "checkpoints": [p.name for p in paths],
              "tta": "tencrop" if prm["tta_mode"] == "tencrop" else int(prm["tta"]),
              "classes": classes, "split": "test"}
    table = data.table.iloc[rows.cpu().numpy()]
    if regression:
        return _evaluate_regression(params, prm, header, table, data, pixels, y, probs, metrics_path, predictions_path,
                                    confusion_path, errors_path, results_path, train_metrics)
    metrics = classification_metrics(y, probs, classes)
    metrics = {**header, **metrics}
    if predictions_path:
        write_csv(predictions_path, predictions_table(table["id"], y, probs, classes))
    title = f"{name} ({kind}{', tta ' + str(header['tta']) if header['tta'] else ''}) test acc {metrics['accuracy']:.4f}"
    if confusion_path:
        confusion_png(confusion_path, confusion(y, probs.argmax(1), len(classes)), classes, title)
    if errors_path:
        images = display_images(pixels, data.spec.image_channels)
        errors_png(errors_path, images, y, probs, classes, int(prm["errors"]), title=f"{name}: most confident errors")
    _write_metrics(metrics, metrics_path, results_path, train_metrics, params.get("recipe"))
    return metrics


def _write_metrics(metrics: dict, metrics_path, results_path, train_metrics, recipe: str | None) -> None:
    """eval.json and the one-screen summary (``headline``, with the train stage's figures when given)."""
    if metrics_path:
        write_json(metrics_path, metrics)
    if results_path:
        train = json.loads(Path(train_metrics).read_text()) if train_metrics and Path(train_metrics).is_file() else None
        write_text(results_path, json.dumps(headline(metrics, train, recipe), indent=2) + "\n")


def _evaluate_regression(params: dict, prm: dict, header: dict, table, data: TensorData, pixels: torch.Tensor,
                         y: np.ndarray, pred: np.ndarray, metrics_path, predictions_path, confusion_path,
                         errors_path, results_path, train_metrics) -> dict:
    """run_evaluate's outputs for a valence/arousal model (y, pred [n, targets] on the original scale)."""
    names = header["classes"]
    metrics = {**header, "n": int(len(y)), **regression_metrics(y, pred, names)}
    if predictions_path:
        write_csv(predictions_path, regression_table(table["id"], y, pred, names))
    title = (f"{header['model']} ({header['members']}{', tta ' + str(header['tta']) if header['tta'] else ''}) "
             f"test RMSE {metrics['rmse']:.4f}, CCC {metrics['ccc']:.4f}")
    if confusion_path:  # the stage's confusion output path holds the scatter plot (a regression has no confusion)
        scatter_png(confusion_path, y, pred, names, title, metrics)
    if errors_path:
        images = display_images(pixels, data.spec.image_channels)
        regression_errors_png(errors_path, images, y, pred, names, int(prm["errors"]),
                              title=f"{header['model']}: largest errors")
    _write_metrics(metrics, metrics_path, results_path, train_metrics, params.get("recipe"))
    return metrics
