"""The train stage: k-fold cross-validation (one model per fold), an optional final model, metrics.

For each fold k (all folds of the split stage, or the ``train.folds`` list): train on the other
folds, select the epoch by validation accuracy on fold k, write models/fold<k>.pt. With
``train.final: true``, one more model is trained on every training row for round(mean best epoch)
epochs (the epoch count chosen by cross-validation, never by training accuracy) -> models/final.pt.
The test split is not even loaded here.

metrics/train.json: per-fold best validation accuracy/loss and best epoch, mean and std (population,
ddof=0) of the validation accuracy over the folds run, the final model's epoch count. It holds
no timings, so rerunning with the same seed gives an identical file; timings are printed and kept
in each checkpoint's meta.

Valence / arousal (task valence_arousal, a split without class targets): the model has 2 outputs
(valence, arousal), trained on targets standardized with the training rows' mean / std (kept in the
checkpoint's meta as target_mean / target_std, with "task": "valence_arousal") by ``train.loss``:
mse (``auto``) or ccc (1 - the concordance correlation coefficient). The epoch is selected by the
validation loss (``train.select`` must be ``loss``); metrics/train.json has per-fold val_loss and
val_loss_mean / val_loss_std instead of accuracies; class weights and the chance-level check do not apply.
Every ``train.plot_every`` epochs a fold's dvclive folder gets the scatter of its validation predictions vs
targets (plots/images/regression/<epoch>.png).

Snapshots (``train.snapshot_every``): each fold (and the final model) keeps a resumable state in
``.ferpipe/snapshots/train/<run-id>/`` (``ferpipe.train.snapshots.RunSnapshots``); a run with the same run-id
takes finished folds from their snapshots and continues the interrupted one after its last snapshot,
with the weights, history and metrics of an uninterrupted run. The snapshots go once the outputs are written.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ferpipe.data.augment import BatchAugment
from ferpipe.data.tensors import TensorData, artifact_paths, load_data
from ferpipe.models import MODEL_SPECS, STN, build_model, load_weights, replace_head
from ferpipe.models.checkpoint import save_checkpoint
from ferpipe.models.inputs import InputSpec
from ferpipe.live import live_curves
from ferpipe.store import output_set, write_json
from ferpipe.train.data import channel_stats, preprocess_record
from ferpipe.train.loop import (Concordance, FitConfig, MeanSquared, Runtime, TargetScale, class_weights, fit,
                                seed_everything, setup_runtime, teardown_runtime)
from ferpipe.train.snapshots import REPORTING, SNAPSHOTS, RunSnapshots, file_identity

DEFAULTS = {
    "seed": 2020, "folds": "all", "final": False, "max_epochs": 500, "patience": 30, "batch_size": 128,
    "eval_batch_size": 512, "lr": 1e-3, "weight_decay": 0.0, "optimizer": "adam", "lr_schedule": "constant", "plateau_patience": 2, "localization_lr": 1.0, "localization_warmup": 1.0, "stn_bound": 0.0, "select": "balanced_accuracy",
    "class_weights": True, "label_smoothing": 0.0, "standardize": True, "channels_last": True, "compile": False,
    "augment": {"hflip": 0.5, "degrees": 10, "scale": [0.9, 1.1], "translate": 0.1},
    "init_from": "", "model_kwargs": {}, "device": "auto", "amp": True, "threads": 0,
    "deterministic": True, "progress": None, "log_every": 10, "loss": "auto", "snapshot_every": 5, "plot_every": 10,
    "memory_gb": 0,
}
# train.loss: auto = cross-entropy for a classification task, mse for valence/arousal; ccc: valence/arousal only
LOSSES = ("auto", "mse", "ccc")


def resolve_params(prm: dict | None) -> dict:
    """train params over the defaults; unknown keys are an error (a typo must not pass silently)."""
    prm = dict(prm or {})
    unknown = set(prm) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown train params {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    out = {**DEFAULTS, **{k: v for k, v in prm.items() if v is not None or k == "progress"}}
    out["augment"] = dict(out["augment"] or {})
    out["model_kwargs"] = dict(out["model_kwargs"] or {})
    if out["loss"] not in LOSSES:
        raise ValueError(f"train.loss must be one of {', '.join(LOSSES)}, got {out['loss']!r}")
    for key in ("snapshot_every", "plot_every"):
        if not isinstance(out[key], int) or out[key] < 0:
            raise ValueError(f"train.{key} must be a whole number of epochs >= 0 (0 = none), got {out[key]!r}")
    return out


def check_task(prm: dict, regression: bool) -> None:
    """The params that must fit the split's task: a regression (valence/arousal) selects epochs by the
    validation loss and trains with mse or ccc; a classification trains with cross-entropy (loss auto)."""
    if regression and prm["select"] != "loss":
        raise ValueError(f"task valence_arousal is a regression: train.select must be loss, not {prm['select']!r} "
                         "(-S train.select=loss)")
    if not regression and prm["loss"] != "auto":
        raise ValueError(f"train.loss {prm['loss']} is for task valence_arousal; a classification task trains "
                         "with cross-entropy (train.loss: auto)")


def regression_objective(prm: dict):
    """mse (train.loss auto | mse) or ccc on the standardized valence/arousal targets."""
    return Concordance() if prm["loss"] == "ccc" else MeanSquared()


def select_folds(spec, available: list[int]) -> list[int]:
    """`all`, `none` (no cross-validation: only the final model) or a list of fold numbers (a single
    int is a list of one)."""
    if spec in (None, "all", "ALL"):
        return list(available)
    if spec in ("none", "NONE"):
        return []
    folds = [spec] if isinstance(spec, int) else list(spec)
    bad = [f for f in folds if f not in available]
    if bad or not folds:
        raise ValueError(f"train.folds {spec!r}: the split has folds {available} (or: all, none)")
    return [int(f) for f in folds]


def make_model(name: str, num_classes: int, model_kwargs: dict | None = None,
               init_from: str | os.PathLike | None = "") -> tuple[nn.Module, dict]:
    """Build a registry model, optionally initialized from another run (transfer learning).

    ``init_from``: a ferpipe checkpoint (all weights loaded; the head replaced by a fresh one when
    its class count differs; a ``baseline`` checkpoint also initializes an STN's classifier), or a
    plain state_dict file (``load_weights``: matching keys, conv1 adapted, head skipped).
    Returns (model, the kwargs to store in the checkpoint: ``weights_path`` dropped, the weights
    being in the state_dict).
    """
    kw = dict(model_kwargs or {})
    stored = {k: v for k, v in kw.items() if k != "weights_path"}
    if not init_from:
        return build_model(name, num_classes, **kw), stored
    path = Path(init_from)
    if not path.is_file():
        raise FileNotFoundError(f"train.init_from: checkpoint {path} not found")
    kw.pop("weights_path", None)  # the init_from weights supersede it
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(payload, dict) and "state_dict" in payload and "num_classes" in payload):
        model = build_model(name, num_classes, **kw)
        load_weights(model, path)
        return model, stored
    src_classes = int(payload["num_classes"])
    model = build_model(name, src_classes, **kw)
    state = payload["state_dict"]
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        # a Simple-CNN (baseline) checkpoint initializes the classifier of a spatial transformer
        if isinstance(model, STN) and payload.get("model") == "baseline":
            model.classifier.load_state_dict(state)
        else:
            raise ValueError(f"train.init_from {path}: a '{payload.get('model')}' checkpoint does not fit "
                             f"model '{name}' ({str(err).splitlines()[0]})") from None
    if src_classes != num_classes:
        replace_head(model, num_classes)
    return model, stored


def _fold_spec(data: TensorData, rows: torch.Tensor, standardize: bool) -> InputSpec:
    spec = InputSpec(**data.spec.to_dict())
    if standardize:
        spec.mean, spec.std = channel_stats(data.pixels, rows)
    else:
        spec.mean, spec.std = [0.0] * spec.channels, [1.0] * spec.channels
    return spec


def model_kwargs(name: str, prm: dict, image_channels: int = 1) -> dict:
    """train.model_kwargs, plus train.stn_bound as a spatial transformer's theta_bound (unless the
    kwargs set it) and, for RGB images (ingest.color rgb), in_channels 3: stored in the checkpoint, so
    the model loads as it was trained. (Gray runs pass no in_channels: their checkpoints stay as they were.)"""
    kw = dict(prm["model_kwargs"])
    if MODEL_SPECS[name]["stn_mode"] is not None:
        kw.setdefault("theta_bound", float(prm["stn_bound"]))
    if image_channels != 1:
        kw["in_channels"] = int(image_channels)
    return kw


def chance_check(data: TensorData, rows: torch.Tensor, acc: float | None, desc: str,
                 balanced: float | None = None) -> dict:
    """Is a model no better than a constant answer on `rows`: accuracy `acc` at most the share of their
    most common class, and (when given) balanced accuracy at most 1 / the classes present? Returns
    {"chance": that share, "at_chance": bool} and prints a warning when it is.

    A run that never learns ends there: the spatial transformer whose sampling grid left the image
    (README, "Runs that never learn"), or early stopping before the model beats a constant answer.
    """
    counts = data.class_counts(rows).to("cpu", torch.float64)
    if acc is None or counts.sum() == 0:
        return {}
    share = float(counts.max() / counts.sum())
    at_chance = bool(acc <= share + 1e-9)
    if balanced is not None:
        at_chance = at_chance and balanced <= 1 / int((counts > 0).sum()) + 1e-9
    if at_chance:
        cls = data.classes[int(counts.argmax())]
        print(f"WARNING: {desc} ended at chance level: accuracy {acc:.4f} <= {share:.4f}, the share of its "
              f"most common class '{cls}' (a constant answer scores that). It did not learn: see README "
              "'Runs that never learn'.", flush=True)
    return {"chance": round(share, 6), "at_chance": at_chance}


def train_one(name: str, data: TensorData, train_rows: torch.Tensor, val_rows: torch.Tensor | None,
              prm: dict, rt: Runtime, seed: int, max_epochs: int, live_dir: str | None, desc: str,
              snapshot: Path | None = None):
    """Train one model; returns (model with the best state loaded, FitResult, stored model kwargs).
    `snapshot`: its resumable state's file (``fit``)."""
    seed_everything(seed, prm["deterministic"])
    data.spec = _fold_spec(data, train_rows, prm["standardize"])
    objective, weights, targets = None, None, None
    if data.regression:
        # valence/arousal: targets standardized with these training rows' mean/std. Class weights (and label
        # smoothing) belong to the cross-entropy of a classification: with no classes they are ignored here.
        targets = TargetScale(data.classes, *data.standardize_targets(train_rows))
        objective = regression_objective(prm)
    elif prm["class_weights"]:
        weights = class_weights(data.class_counts(train_rows))
    model, stored_kwargs = make_model(name, len(data.classes), model_kwargs(name, prm, data.spec.image_channels),
                                      prm["init_from"])
    model = model.to(rt.device)
    wrapped = model
    if rt.distributed:
        wrapped = DDP(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    augment = BatchAugment.from_params(prm["augment"], seed=seed * 1009 + rt.rank)
    cfg = FitConfig(max_epochs=max_epochs, patience=prm["patience"], batch_size=prm["batch_size"],
                    eval_batch_size=prm["eval_batch_size"], lr=prm["lr"], weight_decay=prm["weight_decay"],
                    optimizer=prm["optimizer"], lr_schedule=prm["lr_schedule"], plateau_patience=int(prm["plateau_patience"]),
                    localization_lr=float(prm["localization_lr"]),
                    localization_warmup=float(prm["localization_warmup"]), select=prm["select"],
                    label_smoothing=float(prm["label_smoothing"]), channels_last=bool(prm["channels_last"]), compile=bool(prm["compile"]), seed=seed,
                    progress=prm["progress"], log_every=prm["log_every"], snapshot_every=int(prm["snapshot_every"]),
                    plot_every=int(prm["plot_every"]))
    with live_curves(live_dir, rt.is_main) as live:
        result = fit(wrapped, data, train_rows, val_rows, cfg, rt, weights, augment, live, desc, objective,
                     snapshot, targets)
    model.load_state_dict(result.best_state)
    model.eval()
    return model, result, stored_kwargs


def run_train(params: dict, split_csv: str = "data/split/split.csv", gray48: str = "data/gray48/images.h5",
              guides_dir: str = "data/guides", models_dir: str = "models", metrics_path: str | None = "metrics/train.json",
              live_root: str | None = "dvclive/train", snapshots: str | os.PathLike | None = SNAPSHOTS / "train") -> dict:
    """Cross-validate (and optionally train the final model) as params say; return the metrics dict.

    ``params``: the whole params.yaml (``model``, ``task``, ``train``). Runs under torchrun too.
    The models folder, the metrics file and the dvclive folder are one output set: the new folder
    is built beside the old one and replaces it whole only when the run succeeds, so a failed or
    killed run leaves the previous models and metrics exactly as they were, and no fold file of an
    earlier run survives into a new set. Under torchrun only rank 0 writes.
    `snapshots`: the folder of this stage's run snapshots (module docstring; None: none), emptied
    once the outputs are written.
    """
    name = params["model"]
    if name not in MODEL_SPECS:
        raise ValueError(f"model {name!r} is not a registry model ({', '.join(MODEL_SPECS)})")
    prm = resolve_params(params.get("train"))
    main = int(os.environ.get("RANK", "0")) == 0
    snaps = None
    if snapshots:
        snaps = RunSnapshots(snapshots, run_identity(name, params.get("task"), prm, split_csv, gray48, guides_dir),
                             prm["snapshot_every"], main)
    with output_set([metrics_path], dirs=[models_dir, live_root]) if main else contextlib.nullcontext():
        metrics = _run_train(name, prm, params.get("task"), split_csv, gray48, guides_dir, models_dir, metrics_path,
                             live_root, snaps)
    if snaps is not None:
        snaps.clear()
    return metrics


def run_identity(name: str, task, prm: dict, split_csv, gray48, guides_dir) -> dict:
    """What determines a train run's results, for its snapshots' run-id: the model, task and train params
    (not the reporting ones: progress, log_every, snapshot_every; threads and eval_batch_size stay, they
    change the last bits), the process count, and the identity (path, size, mtime) of split.csv, the
    arrays the model reads and the init_from / weights_path files."""
    spec = MODEL_SPECS[name]
    files = [split_csv, *artifact_paths(spec["image"], spec["guide"], gray48, guides_dir), prm["init_from"],
             prm["model_kwargs"].get("weights_path")]
    return {"stage": "train", "model": name, "task": task, "world": int(os.environ.get("WORLD_SIZE", "1")),
            "train": {k: v for k, v in prm.items() if k not in REPORTING}, "files": [file_identity(f) for f in files]}


def _run_train(name: str, prm: dict, task: str | None, split_csv: str, gray48: str, guides_dir: str, models_dir: str,
               metrics_path: str | None, live_root: str | None, snaps: RunSnapshots | None) -> dict:
    rt = setup_runtime(prm["device"], prm["threads"], prm["amp"])
    try:
        data = load_data(split_csv, name, prm["model_kwargs"], gray48, guides_dir, rt.device, splits=("train",),
                         memory_gb=prm["memory_gb"])
        regression = data.regression
        check_task(prm, regression)
        folds = select_folds(prm["folds"], data.folds)
        if not folds and not prm["final"]:
            raise ValueError("train.folds is none (no cross-validation) but train.final is false: nothing to train")
        models_dir = Path(models_dir)
        task = "valence_arousal" if regression else task
        if rt.is_main:
            what = (f"targets {data.classes} (regression, loss {'ccc' if prm['loss'] == 'ccc' else 'mse'})"
                    if regression else f"classes {data.classes}")
            print(f"train {name}: {len(data)} training rows, {what}, folds {folds}, "
                  f"on {rt.describe()}", flush=True)
        base_meta = {"task": task, "train_params": prm, "classes": data.classes,
                     "preprocess": preprocess_record(data.spec, gray48, guides_dir)}
        if regression:
            base_meta["loss"] = "ccc" if prm["loss"] == "ccc" else "mse"
        metrics = {"model": name, "task": task, "classes": data.classes, "folds": {}}
        for k in folds:
            train_rows, val_rows = data.train_rows(exclude_fold=k), data.val_rows(k)
            live = f"{live_root}/fold{k}" if live_root else None
            model, res, kw = train_one(name, data, train_rows, val_rows, prm, rt, prm["seed"] + k,
                                       prm["max_epochs"], live, f"fold {k}", snaps and snaps.path(f"fold{k}"))
            if regression:  # no accuracy, no chance level: the validation loss is the figure
                metrics["folds"][str(k)] = {"val_loss": res.best_val_loss, "best_epoch": res.best_epoch,
                                            "epochs": res.epochs, "train_rows": len(train_rows), "val_rows": len(val_rows)}
            else:
                metrics["folds"][str(k)] = {"val_acc": res.best_val_acc, "val_bal_acc": res.best_val_bal_acc,
                                            "val_loss": res.best_val_loss, "best_epoch": res.best_epoch,
                                            "epochs": res.epochs, "train_rows": len(train_rows), "val_rows": len(val_rows),
                                            **chance_check(data, val_rows, res.best_val_acc, f"fold {k}",
                                                           res.best_val_bal_acc)}
            if rt.is_main:
                save_checkpoint(models_dir / f"fold{k}.pt", model, name, data.classes, kw, {
                    **base_meta, "fold": k, "best_epoch": res.best_epoch, "val_acc": res.best_val_acc,
                    "val_loss": res.best_val_loss, "epochs": res.epochs, "history": res.history,
                    "input": data.spec.to_dict(),  # no timings: a rerun writes identical bytes
                    **target_meta(data), "device": rt.describe(), "init_from": str(prm["init_from"] or "")})
                figure = (f"loss {res.best_val_loss:.4f}" if regression else
                          f"acc {res.best_val_acc:.4f}, balanced {res.best_val_bal_acc:.4f}")
                print(f"fold {k}: best epoch {res.best_epoch} by validation {prm['select']}: {figure} "
                      f"({res.epochs} epochs, {res.seconds:.1f} s, {res.images_per_s:.0f} img/s)", flush=True)
        figure = "val_loss" if regression else "val_acc"
        values = np.array([m[figure] for m in metrics["folds"].values()], dtype=float)
        epochs = np.array([m["best_epoch"] for m in metrics["folds"].values()], dtype=float)
        metrics["n_folds"] = len(folds)
        if not regression:
            metrics["folds_at_chance"] = [int(k) for k, m in metrics["folds"].items() if m.get("at_chance")]
        if folds:
            metrics.update({f"{figure}_mean": float(values.mean()), f"{figure}_std": float(values.std()),
                            "best_epoch_mean": float(epochs.mean())})
        if prm["final"]:
            # the epoch count chosen by cross-validation; without folds, the max_epochs budget
            n_epochs = max(1, int(round(epochs.mean()))) if folds else int(prm["max_epochs"])
            rows = data.train_rows()
            live = f"{live_root}/final" if live_root else None
            model, res, kw = train_one(name, data, rows, None, prm, rt, prm["seed"] + 1000, n_epochs, live, "final",
                                       snaps and snaps.path("final"))
            if regression:
                metrics["final"] = {"epochs": n_epochs, "train_rows": len(rows), "train_loss": res.history[-1]["train_loss"]}
            else:
                metrics["final"] = {"epochs": n_epochs, "train_rows": len(rows),
                                    "train_acc": res.history[-1]["train_acc"], "train_loss": res.history[-1]["train_loss"],
                                    **chance_check(data, rows, res.history[-1]["train_acc"], "the final model (training rows)")}
            if rt.is_main:
                save_checkpoint(models_dir / "final.pt", model, name, data.classes, kw, {
                    **base_meta, "fold": None, "best_epoch": n_epochs, "epochs": n_epochs, "history": res.history,
                    "input": data.spec.to_dict(),  # no timings: a rerun writes identical bytes
                    **target_meta(data), "device": rt.describe(), "init_from": str(prm["init_from"] or "")})
                print(f"final: {n_epochs} epochs on {len(rows)} rows ({res.seconds:.1f} s)", flush=True)
        metrics["device"] = rt.describe()  # results depend on the thread count and CPU: say which ran
        if rt.is_main and metrics_path:
            write_json(metrics_path, metrics)
        return metrics
    finally:
        teardown_runtime(rt)


def target_meta(data: TensorData) -> dict:
    """A valence/arousal model's checkpoint meta: the mean / std its targets were standardized with (the
    training rows of its run), so inference returns the original scale: value = output * std + mean."""
    if not data.regression:
        return {}
    return {"target_mean": [float(v) for v in data.target_mean], "target_std": [float(v) for v in data.target_std]}
