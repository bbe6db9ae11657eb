"""The train_sequence stage: LSTM / Deep RNN (context bridge) / per-frame models on a features file.

Data (ferpipe.sequences.data): samples per sequence of a features HDF5:
  rho > 0    sliding windows of rho frames inside each sequence, target = the label of the window's
             last frame; sequences shorter than rho are skipped and reported
  rho = 0    whole sequences, many-to-one, left zero padding with a mask (the model never sees the
             padding), target = the label of the last frame; max_len > 0 keeps the last max_len frames
  anticipation.first = k (or a fraction): the first k frames only, trained with the per-step loss of
             ferpipe.sequences.anticipation; target = the sequence's label (its last frame's)

Training is the image models' loop (ferpipe.train.loop.fit) with a sequence objective: cross-entropy
(class weights min/count when ``balanced``), mean squared error on standardized targets (task
regress; metrics on the original scale) or the anticipation loss; Adam, gradient-norm clipping
(``clip``), early stopping on the validation figure ``select`` (the loss by default, as LSTM-on-CNN):
stop after ``patience`` epochs without a gain, keep the best state. CUDA with mixed precision when
present (``device``), seeded per fold: runs are identical on CPU for the same seed and thread count.

Evaluation is subject-independent k-fold at the sequence level (StratifiedGroupKFold on the frames'
subjects when every sequence has one, else stratified k-fold): for test fold i, fold i+1 is the
validation fold used for early stopping and the rest trains, so the test fold never takes part in
selection. Metrics per fold and mean +- std are ferpipe.evaluate.metrics' (accuracy, macro-F1,
balanced accuracy, AUC; MSE and Pearson r for regression) plus the accuracy after the first k frames;
out-of-fold predictions in the evaluate stage's table format (id, actual, predicted, prob_<class>).
Validation, test and --test-only passes run ``eval_batch_size`` samples at a time; task regress draws
its validation predictions vs targets every ``plot_every`` epochs into the fold's dvclive folder.

Snapshots (``snapshot_every``): as the image train stage's (``ferpipe.train.run``), in
``.ferpipe/snapshots/train_sequence/<run-id>/`` (run-id: every setting but snapshot_every, the features
file's and the init_from / encoder_init files' path, size and mtime, the ferpipe sources): a stopped run
resumes, finished folds are not retrained; the snapshots go once the outputs are written.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn

from ferpipe.evaluate.metrics import classification_metrics, confusion, predictions_table, regression_metrics
from ferpipe.evaluate.plots import confusion_png
from ferpipe.live import live_curves
from ferpipe.sequences.anticipation import accuracy_per_k, anticipation_loss, true_class_curve
from ferpipe.sequences.config import SequenceConfig
from ferpipe.sequences.data import (ClipAugment, SequenceBatches, SequenceData, Samples, fold_plan, load_sequences,
                                    make_samples, sequence_folds)
from ferpipe.models.checkpoint import save_checkpoint
from ferpipe.models.sequence import build_sequence_model, init_encoder, load_sequence_model
from ferpipe.store import write_csv, write_h5, write_json, write_text, writes
from ferpipe.train.loop import (CrossEntropy, MeanSquared, Runtime, TargetScale, class_weights, fit, seed_everything,
                                setup_runtime, teardown_runtime)
from ferpipe.train.snapshots import SNAPSHOTS, RunSnapshots, file_identity


def _say(msg: str) -> None:
    print(msg, flush=True)  # a line per fold as it ends, also when stdout is a log file


# ---------------------------------------------------------------------------------------------
# training: the objective and one model

class Anticipation:
    """The anticipation objective (per-step cross-entropy + monotone true-class hinge) for train.loop.fit;
    the metrics read the output after the last (real) frame."""
    classify = True

    def __init__(self, hinge_weight: float = 1.0, weight: torch.Tensor | None = None):
        self.hinge_weight, self.weight = float(hinge_weight), weight

    def to(self, device) -> "Anticipation":
        if self.weight is not None:
            self.weight = self.weight.to(device)
        return self

    def __call__(self, model, inputs, y, training: bool = False):
        x, mask = inputs
        steps = model.steps(x, mask).float()
        return anticipation_loss(steps, mask, y, self.hinge_weight, self.weight)[0], steps[:, -1]


def sequence_objective(cfg: SequenceConfig, counts: torch.Tensor):
    """What a sequence model minimizes: by task, anticipation and class balancing."""
    if cfg.task == "regress":
        return MeanSquared()
    weight = class_weights(counts) if cfg.balanced else None
    return Anticipation(cfg.anticipation_weight, weight) if cfg.anticipation_first else CrossEntropy(weight)


def train_one(data: SequenceData, train_seqs, val_seqs, cfg: SequenceConfig, seed: int, rt: Runtime,
              live_dir: str | None = None, desc: str = "train", snapshot: Path | None = None) -> tuple[nn.Module, dict]:
    """Train one model on the training sequences, selecting on the validation ones; the best state loaded.
    `snapshot`: its resumable state's file (``ferpipe.train.loop.fit``)."""
    seed_everything(seed)
    draw = np.random.default_rng(seed) if cfg.clip_sampling == "random" else None
    tr = make_samples(data, train_seqs, cfg.rho, cfg.max_len, cfg.anticipation_first, cfg.clip_frames, draw)
    va = make_samples(data, val_seqs, cfg.rho, cfg.max_len, cfg.anticipation_first, cfg.clip_frames)
    if len(tr) == 0 or len(va) == 0:
        raise ValueError(f"{desc}: empty training ({len(tr)}) or validation ({len(va)}) set")
    batches = SequenceBatches(data, [tr, va], rt.device)
    model = build_sequence_model(cfg.model, data.in_shape, data.num_outputs, **cfg.model_kwargs())
    if cfg.encoder_init:
        init_encoder(model, cfg.encoder_init)
    if cfg.init_from:  # continue from a saved model (LSTM-on-CNN --load): same kind, sizes and outputs
        saved, _ = load_sequence_model(cfg.init_from)
        try:
            model.load_state_dict(saved.state_dict())
        except RuntimeError as e:
            raise ValueError(f"{cfg.init_from}: its weights do not fit this {cfg.model} model "
                             f"({str(e).splitlines()[0][:160]})") from None
    model.to(rt.device)
    objective = sequence_objective(cfg, batches.class_counts(batches.part(0)) if batches.classes else None)
    augment = ClipAugment(cfg.shift, seed) if cfg.augment and data.in_shape[1] > 1 else None
    targets = None
    if data.task == "regress":
        targets = TargetScale(data.regression, data.label_mean.tolist(),
                              np.where(data.label_std < 1e-6, 1.0, data.label_std).tolist())
    with live_curves(live_dir) as live:
        res = fit(model, batches, batches.part(0), batches.part(1), cfg.fit_config(seed), rt, augment=augment,
                  live=live, desc=desc, objective=objective, snapshot=snapshot, targets=targets)
    model.load_state_dict(res.best_state)
    model.eval()
    return model, {"best_epoch": res.best_epoch, "epochs": res.epochs, "best_val_loss": res.best_val_loss,
                   "n_train": len(tr), "n_val": len(va), "skipped": {**tr.skipped, **va.skipped}}


@torch.no_grad()
def predict(model: nn.Module, data: SequenceData, samples: Samples, rt: Runtime | None = None,
            batch_size: int = 256) -> np.ndarray:
    """Per-step outputs [S, T, K] (left-padded as the samples; zero at the padding): class probabilities,
    or predictions on the original scale."""
    device = rt.device if rt is not None else torch.device("cpu")
    model.eval()
    batches = SequenceBatches(data, [samples], device)
    T = batches.idx.shape[1]
    steps = np.zeros((len(samples), T, data.num_outputs), np.float32)
    rows = batches.part(0)
    for start in range(0, len(rows), batch_size):
        x, mask, _ = batches.batch(rows[start:start + batch_size])
        with torch.autocast(device.type, dtype=rt.amp_dtype if rt else None, enabled=bool(rt and rt.amp_dtype)):
            out = model.steps(x, mask).float()
        out = torch.softmax(out, -1) if data.task == "classify" else out
        steps[start:start + len(x), T - out.shape[1]:] = out.cpu().numpy()
    if data.task == "regress":
        steps = steps * np.where(data.label_std < 1e-6, 1.0, data.label_std) + data.label_mean
    return steps


def evaluate_samples(model, data: SequenceData, samples: Samples, cfg: SequenceConfig,
                     rt: Runtime | None = None) -> tuple[dict, np.ndarray]:
    """(metrics, per-step outputs) of a model on samples."""
    steps = predict(model, data, samples, rt, cfg.eval_batch_size)
    last = steps[:, -1]
    y = samples.y.numpy()
    if data.task == "classify":
        m = classification_metrics(y, last, data.classes)
        m.pop("per_class")  # per class: in the pooled metrics
        if not cfg.rho:
            lengths = samples.mask.sum(1).numpy()
            m["by_first_k"] = accuracy_per_k(steps, lengths, y)
            if cfg.anticipation_first:
                m["true_class_prob"] = true_class_curve(steps, lengths, y)
    else:
        m = regression_metrics(y * data.label_std + data.label_mean, last, data.regression)
    return m, steps


# ---------------------------------------------------------------------------------------------
# cross-validation

def _prediction_rows(data: SequenceData, samples: Samples, last: np.ndarray, fold: int) -> pd.DataFrame:
    """Out-of-fold predictions: the evaluate stage's table (id = sequence_id), plus fold, subject, frames."""
    y = samples.y.numpy()
    ids = data.sequence_ids[samples.seq]
    if data.task == "classify":
        table = predictions_table(ids, y, last, data.classes)
    else:
        table = pd.DataFrame({"id": ids.astype(str)})
        for j, n in enumerate(data.regression):
            table[f"actual_{n}"] = y[:, j] * data.label_std[j] + data.label_mean[j]
            table[f"predicted_{n}"] = last[:, j]
    table.insert(1, "fold", fold)
    table.insert(2, "subject", data.subjects[samples.seq])
    table.insert(3, "seq_number", data.seq_number[samples.seq].astype(int))
    table.insert(4, "frames", samples.mask.sum(1).numpy().astype(int))
    return table


def cross_validate(data: SequenceData, cfg: SequenceConfig, rt: Runtime | None = None, live_dir: str | None = None,
                   progress=_say, snapshots: RunSnapshots | None = None) -> dict:
    """k-fold CV (test fold i, validation fold i+1, the rest trains), or with folds 0 the dataset's own
    train / val / test splits (``fold_plan``): per-fold metrics, mean, std, pooled out-of-fold predictions
    and confusion; with folds 0 also the trained model (``model``, ``model_data``), the one to save.
    `rt`: the device (default: CPU as it is set up). `snapshots`: the run's (fold<k>.pt each)."""
    rt = rt or Runtime(torch.device("cpu"))
    plan, grouped = fold_plan(data, cfg.folds, cfg.seed)
    per_fold, tables, pooled_y, pooled_p, skipped = [], [], [], [], {}
    for k, train, val, test in plan:
        t0 = time.perf_counter()
        fold_data = data.fold_view(train)  # statistics of this fold's training frames only
        seed = cfg.seed * 1000 + (k if isinstance(k, int) else 0)
        model, info = train_one(fold_data, train, val, cfg, seed, rt, live_dir and f"{live_dir}/fold{k}",
                                f"fold {k}", snapshots and snapshots.path(f"fold{k}"))
        te = make_samples(fold_data, test, cfg.rho, cfg.max_len, cfg.anticipation_first, cfg.clip_frames)
        if len(te) == 0:
            raise ValueError(f"fold {k}: no test sample (every sequence shorter than rho={cfg.rho}?)")
        skipped.update({**info["skipped"], **te.skipped})
        m, steps = evaluate_samples(model, fold_data, te, cfg, rt)
        last = steps[:, -1]
        m.update(fold=k, n_train=info["n_train"], n_val=info["n_val"], n_test=len(te), best_epoch=info["best_epoch"],
                 epochs=info["epochs"], best_val_loss=info["best_val_loss"])
        seconds = round(time.perf_counter() - t0, 2)  # printed, not stored: `dvc metrics diff` would show noise
        per_fold.append(m)
        pooled_y.append(te.y.numpy())
        pooled_p.append(last)
        tables.append(_prediction_rows(data, te, last, k))
        if progress:
            key = "accuracy" if data.task == "classify" else "mse"
            progress(f"fold {k}: {key} {m[key]:.4f} (train {info['n_train']}, val {info['n_val']}, test {len(te)}, "
                     f"best epoch {info['best_epoch']}/{info['epochs']}, {seconds} s)")
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float) and k != "best_val_loss"]
    mean = {k: float(np.nanmean([f[k] for f in per_fold])) for k in keys}
    std = {k: float(np.nanstd([f[k] for f in per_fold])) for k in keys}
    out = {"folds": per_fold, "mean": mean, "std": std, "subject_independent": grouped,
           "predictions": pd.concat(tables, ignore_index=True), "skipped": skipped}
    if cfg.folds == 0:
        out["model"], out["model_data"], out["model_info"] = model, fold_data, info
    y, p = np.concatenate(pooled_y), np.concatenate(pooled_p)
    if data.task == "classify":
        out["pooled"] = classification_metrics(y, p, data.classes)
        out["confusion"] = confusion(y, p.argmax(1), len(data.classes))
        if "by_first_k" in per_fold[0]:
            ks = sorted({k for f in per_fold for k in f["by_first_k"]}, key=lambda s: int(s[1:]))
            out["by_first_k"] = {k: {"mean": float(np.nanmean([f["by_first_k"].get(k, np.nan) for f in per_fold])),
                                     "std": float(np.nanstd([f["by_first_k"].get(k, np.nan) for f in per_fold]))}
                                 for k in ks}
    else:
        out["pooled"] = regression_metrics(y * data.label_std + data.label_mean, p, data.regression)
    return out


# ---------------------------------------------------------------------------------------------
# the stage

def _round(obj):
    if isinstance(obj, float):
        return round(obj, 5) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _round(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_round(v) for v in obj]
    return obj


def sequence_headline(m: dict) -> dict:
    """metrics/sequence_results.json: the mean and std over the test folds of the main figure."""
    key = "accuracy" if m["task"] == "classify" else "mse"
    out = {f"seq_{key}_mean": m["mean"][key], f"seq_{key}_std": m["std"][key]}
    if "macro_f1" in m["mean"]:
        out["seq_macro_f1"] = m["mean"]["macro_f1"]
    out.update(seq_model=m["model"], sequences=m["sequences"])
    return out


def run_train_sequence(features_h5, model_out, metrics_path, plots_dir=None, predictions_csv=None,
                       live_dir=None, cfg: SequenceConfig | None = None, progress=_say, results_path=None,
                       snapshots=SNAPSHOTS / "train_sequence") -> dict:
    """Cross-validate, then train and save the final model; write metrics, confusion PNG, predictions and
    the one-screen summary (`results_path`, sequence_headline), as one output set. `snapshots`: the
    folder of this stage's run snapshots (module docstring; None: none), emptied once the outputs are written."""
    cfg = cfg or SequenceConfig()
    cfg.validate()
    snaps = None
    if snapshots:
        identity = {"stage": "train_sequence", "config": {k: v for k, v in asdict(cfg).items() if k != "snapshot_every"},
                    "files": [file_identity(f) for f in (features_h5, cfg.init_from, cfg.encoder_init)]}
        snaps = RunSnapshots(snapshots, identity, cfg.snapshot_every)
    result = _run_train_sequence(features_h5, model_out, metrics_path, plots_dir, predictions_csv, live_dir, cfg,
                                 progress, results_path, snaps)
    if snaps is not None:
        snaps.clear()
    return result


@writes("model_out", "metrics_path", "predictions_csv", "results_path",
        lambda a: a["plots_dir"] and Path(a["plots_dir"]) / "confusion.png", dirs=["live_dir"])
def _run_train_sequence(features_h5, model_out, metrics_path, plots_dir, predictions_csv, live_dir,
                        cfg: SequenceConfig, progress, results_path, snaps: RunSnapshots | None) -> dict:
    t0 = time.perf_counter()
    data = load_sequences(features_h5, cfg.task)
    rt = setup_runtime(cfg.device, cfg.threads)
    try:
        if progress:
            progress(f"train_sequence: {cfg.model} on {len(data.starts)} sequences ({len(data.X)} frames), "
                     + (f"{cfg.folds}-fold cross-validation{' + the final model' if cfg.final else ''}, " if cfg.folds
                        else "the dataset's train / val / test splits, ")
                     + f"up to {cfg.epochs} epochs each, {rt.describe()}")
        cv = cross_validate(data, cfg, rt, live_dir, progress, snaps)
        final_info = {}
        if cfg.final and cfg.folds == 0:  # the dataset's splits: the model trained on train is the final one
            model, final_data, final_info = cv["model"], cv["model_data"], cv["model_info"]
            model.cpu()
        elif cfg.final:
            fold, _ = sequence_folds(data, cfg.folds, cfg.seed)
            final_data = data.fold_view(np.flatnonzero(fold != 0))
            model, final_info = train_one(final_data, np.flatnonzero(fold != 0), np.flatnonzero(fold == 0), cfg,
                                          cfg.seed * 1000 + cfg.folds, rt, live_dir and f"{live_dir}/final", "final",
                                          snaps and snaps.path("final"))
            model.cpu()
            if progress:
                progress(f"final model: best epoch {final_info['best_epoch']}/{final_info['epochs']} "
                         f"(train {final_info['n_train']}, val {final_info['n_val']})")
    finally:
        teardown_runtime(rt)
    seconds = time.perf_counter() - t0
    metrics = {"model": cfg.model, "task": cfg.task, "folds": cfg.folds, "rho": cfg.rho,
               "anticipation_first": cfg.anticipation_first, "subject_independent": cv["subject_independent"],
               "sequences": int(len(data.starts)), "frames": int(len(data.X)), "input_shape": list(data.in_shape),
               "mean": cv["mean"], "std": cv["std"], "pooled": cv["pooled"],
               "per_fold": [{k: v for k, v in f.items()} for f in cv["folds"]],
               "excluded": data.excluded}
    if "by_first_k" in cv:
        metrics["by_first_k"] = cv["by_first_k"]
    if cv["skipped"]:
        metrics["skipped_sequences"] = cv["skipped"]
    if cfg.final:
        metrics["final"] = {k: final_info[k] for k in ("best_epoch", "epochs", "best_val_loss", "n_train", "n_val")}
        save_checkpoint(model_out, model, cfg.model, data.classes if data.task == "classify" else data.regression,
                        {"in_shape": list(data.in_shape), **cfg.model_kwargs()},
                        meta={"config": asdict(cfg), "classes": data.classes, "regression": data.regression,
                                  "label_mean": None if data.label_mean is None else data.label_mean.tolist(),
                                  "label_std": None if data.label_std is None else data.label_std.tolist(),
                                  "features": str(features_h5), "cv_mean": _round(cv["mean"]),
                                  # the input statistics of its training frames: --test-only applies them
                                  "input_mean": None if final_data.norm_mean is None else final_data.norm_mean.tolist(),
                                  "input_std": None if final_data.norm_std is None else final_data.norm_std.tolist()})
    metrics = _round(metrics)
    write_json(metrics_path, metrics)
    if results_path:
        write_text(results_path, json.dumps(sequence_headline(metrics), indent=2) + "\n")  # in reading order
    if plots_dir and data.task == "classify":
        title = (f"{cfg.model}, {cfg.folds}-fold out-of-fold, acc {cv['mean']['accuracy']:.3f} "
                 f"+- {cv['std']['accuracy']:.3f}")
        confusion_png(Path(plots_dir) / "confusion.png", cv["confusion"], data.classes, title)
    if predictions_csv:
        write_csv(predictions_csv, cv["predictions"])
    return {**metrics, "seconds": round(seconds, 2)}  # the time is returned and printed, not stored


@writes("out_h5", "metrics_path")
def run_test_only(model_path, features_h5, out_h5, metrics_path=None) -> dict:
    """Apply a saved sequence model to a features file; write its outputs (LSTM-on-CNN --test-only).

    out_h5: outputs float32 [S, K] (probabilities, or predictions on the original scale), prediction
    (S, 1), label (S, 1) the target (-1 / NaN if none), seq_number int32 (S,), sequence_id (S,), and
    steps [S, T, K] (the output after each frame). Samples are built as the model was trained.
    """
    model, info = load_sequence_model(model_path)
    cfg = SequenceConfig(**{k: v for k, v in info["meta"]["config"].items() if k in {f.name for f in fields(SequenceConfig)}})
    data = load_sequences(features_h5, cfg.task)
    if cfg.task == "classify" and data.classes != info["meta"]["classes"]:
        raise ValueError(f"{features_h5}: classes {data.classes} differ from the model's {info['meta']['classes']}")
    in_shape = tuple(info["model_kwargs"]["in_shape"])
    if tuple(data.in_shape) != in_shape:
        raise ValueError(f"{features_h5}: frames {data.in_shape}, the model expects {in_shape}")
    if info["meta"].get("input_mean") is not None:  # the model's training statistics, not the file's
        data = data.standardized_with(torch.tensor(info["meta"]["input_mean"], dtype=torch.float32),
                                      torch.tensor(info["meta"]["input_std"], dtype=torch.float32))
    if cfg.task == "regress":
        data.label_mean = np.asarray(info["meta"]["label_mean"], np.float32)
        data.label_std = np.asarray(info["meta"]["label_std"], np.float32)
    samples = make_samples(data, np.arange(len(data.starts)), cfg.rho, cfg.max_len, cfg.anticipation_first,
                           cfg.clip_frames)
    if len(samples) == 0:
        raise ValueError(f"{features_h5}: no sample (every sequence is shorter than rho={cfg.rho})")
    m, steps = evaluate_samples(model, data, samples, cfg)
    last = steps[:, -1]
    y = samples.y.numpy()
    arrays = {"outputs": last.astype(np.float32), "steps": steps.astype(np.float32),
              "seq_number": data.seq_number[samples.seq].astype(np.int32),
              "sequence_id": data.sequence_ids[samples.seq]}
    if cfg.task == "classify":
        arrays.update(prediction=last.argmax(1)[:, None].astype(np.int64), label=y[:, None].astype(np.int64))
    else:
        arrays.update(prediction=last.astype(np.float32), label=(y * data.label_std + data.label_mean).astype(np.float32))
    write_h5(out_h5, arrays, {"stage": "train_sequence --test-only", "model": str(model_path),
                              "features": str(features_h5), "classes": data.classes, "regression": data.regression})
    metrics = _round({"samples": len(samples), **{k: v for k, v in m.items()}})
    if metrics_path:
        write_json(metrics_path, metrics)
    return metrics
