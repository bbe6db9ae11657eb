"""The train_sequence stage: LSTM / Deep RNN (context bridge) / per-frame models on a features file.

Data: a features HDF5 (ferpipe.sequences.features layout). Samples are built per sequence:
  rho > 0    sliding windows of rho frames inside each sequence, target = the label of the window's
             last frame; sequences shorter than rho are skipped and reported
  rho = 0    whole sequences, many-to-one, left zero padding with a mask (the model never sees the
             padding), target = the label of the last frame; max_len > 0 keeps the last max_len frames
  anticipation.first = k (or a fraction): the first k frames only, trained with the per-step loss of
             ferpipe.sequences.anticipation; target = the sequence's label (its last frame's)
Task classify: cross-entropy (balanced class weights optional); task regress: MSE on the targets
standardized with the file's label_mean/label_std (metrics on the original scale).

Evaluation is subject-independent k-fold at the sequence level (StratifiedGroupKFold on the frames'
subjects when every sequence has one, else stratified k-fold): for test fold i, fold i+1 is the
validation fold used for early stopping (stop when epochs since the best validation loss > patience;
the best state is kept) and the rest trains, so the test fold never takes part in selection. Metrics
per fold and mean +- std: accuracy, macro-F1, AUC (binary, or one-vs-rest macro over the classes
present), accuracy after the first k frames; MSE and Pearson r for regression. Adam, gradient-norm
clipping (5), seeded per fold: runs are identical on CPU for the same seed and thread count.
"""
from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ferpipe.live import live_curves
from ferpipe.sequences.anticipation import accuracy_per_k, anticipation_loss, parse_first, prefix_length, true_class_curve
from ferpipe.sequences.features import read_features
from ferpipe.sequences.models import KINDS, build_sequence_model, init_encoder, load_sequence_model, save_sequence_model
from ferpipe.store import atomic_path, write_csv, write_h5, write_json, write_text, writes

TASKS = ("classify", "regress")


def _say(msg: str) -> None:
    print(msg, flush=True)  # a line per fold as it ends, also when stdout is a log file


# ---------------------------------------------------------------------------------------------
# configuration

@dataclass
class SequenceConfig:
    """Every knob of train_sequence (params.yaml `sequence:` section, see `from_params`)."""
    model: str = "lstm"               # lstm | cbm | frame
    task: str = "classify"            # classify | regress
    rho: int = 0                      # 0 = whole sequences (masked many-to-one); > 0 = windows of rho frames
    max_len: int = 0                  # whole sequences: keep the last max_len frames (0 = all)
    encoder: str = "none"             # frame encoder for raw frames (features mode images): none | simple | simple_fc | conv
    encoder_width: int = 16
    encoder_init: str = ""            # simple encoder: start from this CNN checkpoint's trunk (fine-tuned end to end)
    lstm: dict = field(default_factory=lambda: {"hidden": 256, "depth": 1, "dropout": 0.5})
    cbm: dict = field(default_factory=lambda: {"hidden": 64, "depth": 15, "shortcut": 5, "kernel": 0,
                                               "temporal_dropout": 0.3, "dropout": 0.5})
    frame: dict = field(default_factory=lambda: {"hidden": 50, "dropout": 0.5})
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int = 200
    patience: int = 20
    clip: float = 5.0
    balanced: bool = False
    augment: bool = False             # raw frames: random flip + shift, the same for every frame of a sample
    shift: int = 3
    seed: int = 2020
    folds: int = 10
    anticipation_first: float = 0     # 0 = off; k >= 1 frames or a fraction in (0, 1)
    anticipation_weight: float = 1.0
    final: bool = True                # also train the model that is saved (all folds but fold 0, which validates)
    threads: int = 0                  # torch threads (0 = torch's default)

    # params.yaml: these fields sit in the sequence.train group; the other stages' sub-sections of `sequence`
    TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "patience", "clip", "balanced", "augment", "shift",
                  "seed", "final")
    OTHER_STAGES = ("dataset", "features", "landmarks_passes")

    @classmethod
    def from_params(cls, section: dict | None, **overrides) -> "SequenceConfig":
        """From the params.yaml `sequence:` section (nested train:/anticipation: groups flattened). A key
        this stage does not know is an error (the other sequence stages' sub-sections are skipped)."""
        names = {f.name for f in fields(cls)}
        flat, unknown = {}, []
        for key, value in (section or {}).items():
            if key in cls.OTHER_STAGES:
                continue
            if key == "train" and isinstance(value, dict):
                unknown += [f"train.{k}" for k in value if k not in cls.TRAIN_KEYS]
                flat.update(value)
            elif key == "anticipation" and isinstance(value, dict):
                unknown += [f"anticipation.{k}" for k in value if f"anticipation_{k}" not in names]
                flat.update({f"anticipation_{k}": v for k, v in value.items()})
            elif key in names and key not in cls.TRAIN_KEYS and not key.startswith("anticipation_"):
                flat[key] = value
            else:
                unknown.append(key)
        if unknown:
            raise ValueError(f"unknown sequence params {sorted(unknown)}")
        flat.update({k: v for k, v in overrides.items() if v is not None})
        cfg = cls(**{k: v for k, v in flat.items() if k in names})
        for group in ("lstm", "cbm", "frame"):  # partial groups keep the other defaults
            setattr(cfg, group, {**getattr(cls(), group), **(getattr(cfg, group) or {})})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.model not in KINDS:
            raise ValueError(f"sequence.model must be one of {KINDS}, got {self.model!r}")
        if self.task not in TASKS:
            raise ValueError(f"sequence.task must be one of {TASKS}, got {self.task!r}")
        if self.rho < 0 or self.max_len < 0 or self.folds < 3 or self.patience < 0 or self.epochs < 1:
            raise ValueError("need rho >= 0, max_len >= 0, folds >= 3 (test, validation and training folds), "
                             "patience >= 0, epochs >= 1")
        parse_first(self.anticipation_first)
        if self.anticipation_first and (self.task != "classify" or self.rho):
            raise ValueError("anticipation needs task classify and whole sequences (rho 0)")

    def model_kwargs(self) -> dict:
        kw = dict(getattr(self, self.model))
        if self.encoder not in (None, "", "none") or self.model == "frame":
            kw.update(encoder=self.encoder if self.encoder not in (None, "") else "none",
                      encoder_width=self.encoder_width)
        return kw


# ---------------------------------------------------------------------------------------------
# data

@dataclass
class SequenceData:
    """Frames and per-sequence bookkeeping of a features file."""
    X: torch.Tensor                 # [N, C, H, W] float32
    frame_y: np.ndarray             # [N] int64 (classify) or [N, L] float32 standardized (regress)
    starts: np.ndarray              # [S] first frame of each sequence
    lengths: np.ndarray             # [S]
    seq_number: np.ndarray          # [S] the file's seq_number
    sequence_ids: np.ndarray        # [S] str
    subjects: np.ndarray            # [S] str
    task: str
    classes: list
    regression: list
    label_mean: np.ndarray | None = None
    label_std: np.ndarray | None = None
    excluded: dict = field(default_factory=dict)
    file_mean: torch.Tensor | None = None   # the features file's standardization (None: outputs are raw)
    file_std: torch.Tensor | None = None
    norm_mean: torch.Tensor | None = None   # the statistics X is standardized with now (see fold_view)
    norm_std: torch.Tensor | None = None

    @property
    def in_shape(self):
        return tuple(self.X.shape[1:])

    @property
    def num_outputs(self):
        return len(self.classes) if self.task == "classify" else len(self.regression)

    def frames_of(self, seqs) -> np.ndarray:
        """Frame indices of the given sequences (indices into starts/lengths)."""
        seqs = np.asarray(seqs, np.int64)
        lengths = self.lengths[seqs]
        first = np.repeat(self.starts[seqs], lengths)                          # each frame's sequence start
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return (first + within).astype(np.int64)

    def raw(self) -> torch.Tensor:
        """The outputs before the features file's standardization."""
        if self.file_mean is None:
            return self.X
        return self.X * self.file_std + self.file_mean

    def standardized_with(self, mean: torch.Tensor | None, std: torch.Tensor | None) -> "SequenceData":
        """A copy whose X is (raw - mean) / std (mean None: raw); labels and bookkeeping shared."""
        raw = self.raw()
        X = raw if mean is None else (raw - mean) / std
        return replace(self, X=X.contiguous(), norm_mean=mean, norm_std=std)

    def fold_view(self, train_seqs) -> "SequenceData":
        """X re-standardized with the statistics of the training sequences' frames only.

        The features stage standardizes over every frame of the file, test folds included; cross-
        validation must not see the test folds, so each fold undoes that and uses its own training
        frames' per-element mean/std (mean only where the file has std = 1, the images mode).
        A file written without standardization stays raw.
        """
        if self.file_mean is None:
            return self
        raw = self.raw()[torch.from_numpy(self.frames_of(train_seqs))]
        if len(raw) == 0:
            raise ValueError("no training frames to standardize with")
        mean = raw.mean(0, dtype=torch.float64).float()
        if bool((self.file_std == 1).all()):
            std = torch.ones_like(mean)
        else:
            std = raw.double().std(0, unbiased=False).float()
            std = torch.where(std < 1e-6, torch.ones_like(std), std)
        return self.standardized_with(mean, std)

    def seq_target(self) -> np.ndarray:
        """Each sequence's target (its last frame's label)."""
        return self.frame_y[self.starts + self.lengths - 1]


def load_sequences(path, task: str = "classify") -> SequenceData:
    """Read a features file; frames of a sequence must be contiguous (LSTM-on-CNN list-file rule)."""
    f = read_features(path)
    attrs = f["attrs"]
    seq = f["seq_number"].astype(np.int64)
    n = len(seq)
    if n == 0:
        raise ValueError(f"{path}: no frames")
    change = np.flatnonzero(np.diff(seq) != 0) + 1
    starts = np.concatenate([[0], change])
    lengths = np.diff(np.concatenate([starts, [n]]))
    if len(set(seq[starts].tolist())) != len(starts):
        raise ValueError(f"{path}: the frames of a sequence are not contiguous (seq_number repeats after a gap)")
    sids = f.get("sequence_id", seq.astype(str))[starts]
    subjects = f.get("subject", np.full(n, ""))[starts]
    classes, regression = list(attrs.get("classes", [])), list(attrs.get("regression_labels", []))
    lm = ls = None
    excluded = {}
    if task == "classify":
        if "label" not in f or not classes:
            raise ValueError(f"{path}: no class labels (datasets {sorted(k for k in f if k != 'attrs')})")
        frame_y = f["label"].reshape(n, -1)[:, 0].astype(np.int64)
        keep = frame_y[starts + lengths - 1] >= 0
    else:
        if not regression:
            raise ValueError(f"{path}: no regression labels (valence/arousal) for task regress")
        reg = np.concatenate([f[name].reshape(n, 1) for name in regression], axis=1).astype(np.float32)
        lm = f["label_mean"] if "label_mean" in f else np.nanmean(reg, 0).astype(np.float32)
        ls = f["label_std"] if "label_std" in f else np.nanstd(reg, 0).astype(np.float32)
        frame_y = ((reg - lm) / np.where(ls < 1e-6, 1.0, ls)).astype(np.float32)
        keep = ~np.isnan(frame_y[starts + lengths - 1]).any(1)
    if (~keep).any():
        excluded["no label on the last frame"] = int((~keep).sum())
    sel = np.flatnonzero(keep)
    fm = fs = None
    if "mean" in f and "std" in f:
        fm = torch.from_numpy(np.ascontiguousarray(f["mean"], dtype=np.float32))
        fs = torch.from_numpy(np.ascontiguousarray(f["std"], dtype=np.float32))
    return SequenceData(torch.from_numpy(np.ascontiguousarray(f["outputs"], dtype=np.float32)), frame_y,
                        starts[sel], lengths[sel], seq[starts][sel], sids[sel].astype(str),
                        subjects[sel].astype(str), task, classes, regression, lm, ls, excluded,
                        file_mean=fm, file_std=fs, norm_mean=fm, norm_std=fs)


@dataclass
class Samples:
    idx: torch.Tensor     # [S, T] long, frame index, -1 = padding (left)
    mask: torch.Tensor    # [S, T] bool
    y: torch.Tensor       # [S] long or [S, L] float
    seq: np.ndarray       # [S] index of the sequence in SequenceData
    skipped: dict

    def __len__(self):
        return len(self.seq)


def make_samples(data: SequenceData, seqs, rho: int = 0, max_len: int = 0, first=0) -> Samples:
    """Windows (rho > 0) or whole left-padded sequences (rho = 0), optionally the first k frames only."""
    rows, targets, owner, skipped = [], [], [], {}
    for s in np.asarray(seqs, np.int64):
        a, n = int(data.starts[s]), int(data.lengths[s])
        if rho:
            if n < rho:
                skipped[str(data.sequence_ids[s])] = f"{n} frame(s), shorter than the window rho={rho}"
                continue
            for w in range(n - rho + 1):
                rows.append(list(range(a + w, a + w + rho)))
                targets.append(a + w + rho - 1)
                owner.append(s)
            continue
        k = prefix_length(n, first)
        frames = list(range(a, a + k))
        if max_len:
            frames = frames[-max_len:]
        rows.append(frames)
        targets.append(a + n - 1)  # the sequence's label, also when only its first frames are seen
        owner.append(s)
    T = max((len(r) for r in rows), default=1)
    idx = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, r in enumerate(rows):
        idx[i, T - len(r):] = torch.tensor(r, dtype=torch.long)
    y = torch.from_numpy(data.frame_y[np.asarray(targets, np.int64)]) if rows else \
        torch.zeros((0,) + data.frame_y.shape[1:], dtype=torch.float32 if data.task == "regress" else torch.long)
    return Samples(idx, idx >= 0, y, np.asarray(owner, np.int64), skipped)


def gather(data: SequenceData, idx: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Frames of a batch [B, T, C, H, W], zero at the padding."""
    x = data.X[idx.clamp(min=0)]
    return x * mask[:, :, None, None, None].to(x.dtype)


def augment_batch(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and translation (zero fill) per sample, the same for all its frames."""
    B = x.shape[0]
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
    if shift > 0:
        H, W = x.shape[-2:]
        pad = F.pad(x, (shift, shift, shift, shift))
        d = torch.randint(0, 2 * shift + 1, (B, 2), generator=gen)
        x = torch.stack([pad[b, :, :, d[b, 0]:d[b, 0] + H, d[b, 1]:d[b, 1] + W] for b in range(B)])
    return x


# ---------------------------------------------------------------------------------------------
# training

def class_weights(y: np.ndarray, k: int) -> torch.Tensor:
    """'balanced' weights n / (k * count_c) (classes absent from y get weight 0)."""
    counts = np.bincount(y, minlength=k).astype(np.float64)
    w = np.where(counts > 0, len(y) / (k * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def _loss(model, xb, mb, yb, cfg: SequenceConfig, cw):
    if cfg.anticipation_first:
        return anticipation_loss(model.steps(xb, mb), mb, yb, cfg.anticipation_weight, cw)[0]
    out = model(xb, mb)
    if cfg.task == "classify":
        return F.cross_entropy(out, yb, weight=cw)
    return F.mse_loss(out, yb)


def evaluate_loss(model, data, samples: Samples, cfg, cw=None, batch: int = 256) -> tuple[float, float]:
    """(mean loss, accuracy at the last step; NaN for regression) in eval mode."""
    model.eval()
    total, count, correct = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            sl = slice(i, i + batch)
            xb = gather(data, samples.idx[sl], samples.mask[sl])
            loss = _loss(model, xb, samples.mask[sl], samples.y[sl], cfg, cw)
            if cfg.task == "classify":
                correct += int((model(xb, samples.mask[sl]).argmax(1) == samples.y[sl]).sum())
            n = len(samples.idx[sl])
            total, count = total + float(loss) * n, count + n
    return total / max(count, 1), (correct / max(count, 1) if cfg.task == "classify" else float("nan"))


def fit(model: nn.Module, data: SequenceData, train: Samples, val: Samples, cfg: SequenceConfig,
        seed: int = 0, live=None, prefix: str = "") -> dict:
    """Adam + gradient clipping; early stopping on validation loss; the best state is loaded back."""
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"empty training ({len(train)}) or validation ({len(val)}) set")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    cw = class_weights(train.y.numpy(), data.num_outputs) if cfg.balanced and cfg.task == "classify" else None
    do_aug = cfg.augment and data.in_shape[1] > 1
    best, best_epoch, since, history = math.inf, -1, 0, []
    best_state = copy.deepcopy(model.state_dict())
    # a bar over the epochs on a terminal (disable=None): dvc repro shows it, captured logs stay clean
    bar = tqdm(range(cfg.epochs), desc=(prefix.rstrip("/") or "train"), unit="epoch", leave=False, disable=None,
               dynamic_ncols=True)
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train), generator=gen)
        total = 0.0
        for i in range(0, len(train), cfg.batch_size):
            b = perm[i:i + cfg.batch_size]
            xb = gather(data, train.idx[b], train.mask[b])
            if do_aug:
                xb = augment_batch(xb, cfg.shift, gen) * train.mask[b][:, :, None, None, None]
            loss = _loss(model, xb, train.mask[b], train.y[b], cfg, cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
            opt.step()
            total += float(loss.detach()) * len(b)
        train_loss = total / len(train)
        val_loss, val_acc = evaluate_loss(model, data, val, cfg, cw)
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_acc": val_acc})
        if live is not None:
            live.step = epoch
            live.log_metric(f"{prefix}train_loss", train_loss)
            live.log_metric(f"{prefix}val_loss", val_loss)
            if cfg.task == "classify":
                live.log_metric(f"{prefix}val_acc", val_acc)
            live.next_step()
        if val_loss < best:
            best, best_epoch, since = val_loss, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            since += 1
        bar.set_postfix_str(f"train loss {train_loss:.4f} | val loss {val_loss:.4f}"
                            + (f" acc {val_acc:.4f}" if cfg.task == "classify" else "")
                            + f" | best {best:.4f} @ {best_epoch}", refresh=False)
        if since > cfg.patience:
            break
    bar.close()
    model.load_state_dict(best_state)
    model.eval()
    return {"best_epoch": best_epoch, "best_val_loss": best, "epochs": len(history), "history": history}


def predict(model, data: SequenceData, samples: Samples, batch: int = 256) -> np.ndarray:
    """Per-step outputs [S, T, K]: class probabilities, or predictions on the original scale."""
    model.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(samples), batch):
            sl = slice(i, i + batch)
            y = model.steps(gather(data, samples.idx[sl], samples.mask[sl]), samples.mask[sl])
            outs.append(torch.softmax(y, -1) if data.task == "classify" else y)
    steps = torch.cat(outs).numpy() if outs else np.zeros((0, samples.idx.shape[1], data.num_outputs), np.float32)
    if data.task == "regress":
        steps = steps * np.where(data.label_std < 1e-6, 1.0, data.label_std) + data.label_mean
    return steps


# ---------------------------------------------------------------------------------------------
# metrics

def auc_score(y: np.ndarray, prob: np.ndarray) -> float:
    """Binary ROC AUC (2 classes) or one-vs-rest macro AUC over the classes present with both outcomes."""
    from sklearn.metrics import roc_auc_score
    K = prob.shape[1]
    if K == 2:
        return float(roc_auc_score(y == 1, prob[:, 1])) if 0 < (y == 1).sum() < len(y) else float("nan")
    scores = [roc_auc_score(y == c, prob[:, c]) for c in range(K) if 0 < (y == c).sum() < len(y)]
    return float(np.mean(scores)) if scores else float("nan")


def classification_metrics(y: np.ndarray, prob: np.ndarray) -> dict:
    from sklearn.metrics import f1_score
    pred = prob.argmax(1)
    return {"accuracy": float((pred == y).mean()), "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
            "auc": auc_score(y, prob)}


def regression_metrics(y: np.ndarray, pred: np.ndarray, names: list[str]) -> dict:
    out = {}
    for j, name in enumerate(names):
        a, b = y[:, j], pred[:, j]
        out[f"mse_{name}"] = float(np.mean((a - b) ** 2))
        out[f"pearson_{name}"] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan")
    out["mse"] = float(np.mean([out[f"mse_{n}"] for n in names]))
    out["pearson"] = float(np.nanmean([out[f"pearson_{n}"] for n in names])) if names else float("nan")
    return out


def confusion(y: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    cm = np.zeros((k, k), np.int64)
    np.add.at(cm, (y, pred), 1)
    return cm


def plot_confusion(cm: np.ndarray, classes: list[str], path, title: str = "") -> None:
    """Confusion matrix PNG: counts, rows = true class, colour = row share."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(classes), 0.8 + 0.7 * len(classes)), dpi=100)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# folds and cross-validation

def sequence_folds(data: SequenceData, folds: int, seed: int) -> tuple[np.ndarray, bool]:
    """Fold of every sequence; subject-independent when every sequence has a subject."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold
    S = len(data.starts)
    grouped = bool(len(data.subjects) and (data.subjects != "").all())
    if grouped and len(set(data.subjects)) < folds:
        raise ValueError(f"{len(set(data.subjects))} subjects for {folds} folds: lower sequence.folds")
    if S < folds:
        raise ValueError(f"{S} sequences for {folds} folds")
    y = data.seq_target()
    if data.task == "classify":
        split = (StratifiedGroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(S), y, data.subjects)
                 if grouped else StratifiedKFold(folds, shuffle=True, random_state=seed).split(np.zeros(S), y))
    else:
        split = (GroupKFold(folds, shuffle=True, random_state=seed).split(np.zeros(S), groups=data.subjects)
                 if grouped else KFold(folds, shuffle=True, random_state=seed).split(np.zeros(S)))
    fold = np.full(S, -1, np.int64)
    for k, (_, test) in enumerate(split):
        fold[test] = k
    return fold, grouped


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def train_one(data: SequenceData, train_seqs, val_seqs, cfg: SequenceConfig, seed: int, live=None,
              prefix: str = "") -> tuple[nn.Module, dict]:
    _seed_all(seed)
    tr = make_samples(data, train_seqs, cfg.rho, cfg.max_len, cfg.anticipation_first)
    va = make_samples(data, val_seqs, cfg.rho, cfg.max_len, cfg.anticipation_first)
    model = build_sequence_model(cfg.model, data.in_shape, data.num_outputs, **cfg.model_kwargs())
    if cfg.encoder_init:
        init_encoder(model, cfg.encoder_init)
    info = fit(model, data, tr, va, cfg, seed=seed, live=live, prefix=prefix)
    info.update(n_train=len(tr), n_val=len(va), skipped={**tr.skipped, **va.skipped})
    return model, info


def evaluate_samples(model, data: SequenceData, samples: Samples, cfg: SequenceConfig) -> tuple[dict, np.ndarray]:
    """(metrics, per-step outputs) of a model on samples."""
    steps = predict(model, data, samples)
    last = steps[:, -1]
    y = samples.y.numpy()
    if data.task == "classify":
        m = classification_metrics(y, last)
        if not cfg.rho:
            lengths = samples.mask.sum(1).numpy()
            m["by_first_k"] = accuracy_per_k(steps, lengths, y)
            if cfg.anticipation_first:
                m["true_class_prob"] = true_class_curve(steps, lengths, y)
    else:
        m = regression_metrics(y * data.label_std + data.label_mean, last, data.regression)
    return m, steps


def cross_validate(data: SequenceData, cfg: SequenceConfig, live=None, progress=_say) -> dict:
    """k-fold CV (test fold i, validation fold i+1, the rest trains): per-fold metrics, mean, std,
    pooled out-of-fold predictions and confusion."""
    fold, grouped = sequence_folds(data, cfg.folds, cfg.seed)
    per_fold, rows, pooled_y, pooled_p, skipped = [], [], [], [], {}
    for k in range(cfg.folds):
        t0 = time.perf_counter()
        test = np.flatnonzero(fold == k)
        val = np.flatnonzero(fold == (k + 1) % cfg.folds)
        train = np.flatnonzero((fold != k) & (fold != (k + 1) % cfg.folds))
        fold_data = data.fold_view(train)  # statistics of this fold's training frames only
        model, info = train_one(fold_data, train, val, cfg, cfg.seed * 1000 + k, live, f"fold{k}/")
        te = make_samples(fold_data, test, cfg.rho, cfg.max_len, cfg.anticipation_first)
        if len(te) == 0:
            raise ValueError(f"fold {k}: no test sample (every sequence shorter than rho={cfg.rho}?)")
        skipped.update({**info["skipped"], **te.skipped})
        m, steps = evaluate_samples(model, fold_data, te, cfg)
        last = steps[:, -1]
        m.update(fold=k, n_train=info["n_train"], n_val=info["n_val"], n_test=len(te), best_epoch=info["best_epoch"],
                 epochs=info["epochs"], best_val_loss=info["best_val_loss"])
        seconds = round(time.perf_counter() - t0, 2)  # printed, not stored: `dvc metrics diff` would show noise
        per_fold.append(m)
        y = te.y.numpy()
        pooled_y.append(y)
        pooled_p.append(last)
        for i, s in enumerate(te.seq):
            row = {"fold": k, "sequence_id": data.sequence_ids[s], "subject": data.subjects[s],
                   "seq_number": int(data.seq_number[s]), "frames": int(te.mask[i].sum())}
            if data.task == "classify":
                row.update(target=data.classes[y[i]], prediction=data.classes[int(last[i].argmax())],
                           **{f"p_{c}": float(last[i, j]) for j, c in enumerate(data.classes)})
            else:
                row.update({f"{n}": float(y[i, j] * data.label_std[j] + data.label_mean[j]) for j, n in enumerate(data.regression)})
                row.update({f"pred_{n}": float(last[i, j]) for j, n in enumerate(data.regression)})
            rows.append(row)
        if progress:
            key = "accuracy" if data.task == "classify" else "mse"
            progress(f"fold {k}: {key} {m[key]:.4f} (train {info['n_train']}, val {info['n_val']}, test {len(te)}, "
                     f"best epoch {info['best_epoch']}/{info['epochs']}, {seconds} s)")
    keys = [k for k, v in per_fold[0].items() if isinstance(v, float) and k != "best_val_loss"]
    mean = {k: float(np.nanmean([f[k] for f in per_fold])) for k in keys}
    std = {k: float(np.nanstd([f[k] for f in per_fold])) for k in keys}
    out = {"folds": per_fold, "mean": mean, "std": std, "subject_independent": grouped,
           "predictions": pd.DataFrame(rows), "skipped": skipped}
    y, p = np.concatenate(pooled_y), np.concatenate(pooled_p)
    if data.task == "classify":
        out["pooled"] = classification_metrics(y, p)
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


@writes("model_out", "metrics_path", "predictions_csv", "results_path",
        lambda a: a["plots_dir"] and Path(a["plots_dir"]) / "confusion.png", dirs=["live_dir"])
def run_train_sequence(features_h5, model_out, metrics_path, plots_dir=None, predictions_csv=None,
                       live_dir=None, cfg: SequenceConfig | None = None, progress=_say, results_path=None) -> dict:
    """Cross-validate, then train and save the final model; write metrics, confusion PNG, predictions and
    the one-screen summary (`results_path`, sequence_headline), as one output set."""
    cfg = cfg or SequenceConfig()
    cfg.validate()
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    t0 = time.perf_counter()
    data = load_sequences(features_h5, cfg.task)
    if progress:
        progress(f"train_sequence: {cfg.model} on {len(data.starts)} sequences ({len(data.X)} frames), "
                 f"{cfg.folds}-fold cross-validation{' + the final model' if cfg.final else ''}, "
                 f"up to {cfg.epochs} epochs each")
    with live_curves(live_dir) as live:
        cv = cross_validate(data, cfg, live, progress)
        final_info = {}
        if cfg.final:
            fold, _ = sequence_folds(data, cfg.folds, cfg.seed)
            final_data = data.fold_view(np.flatnonzero(fold != 0))
            model, final_info = train_one(final_data, np.flatnonzero(fold != 0), np.flatnonzero(fold == 0), cfg,
                                          cfg.seed * 1000 + cfg.folds, live, "final/")
            if progress:
                progress(f"final model: best epoch {final_info['best_epoch']}/{final_info['epochs']} "
                         f"(train {final_info['n_train']}, val {final_info['n_val']})")
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
        save_sequence_model(model_out, model, cfg.model, cfg.model_kwargs(),
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
        plot_confusion(cv["confusion"], data.classes, Path(plots_dir) / "confusion.png", title)
    if predictions_csv:
        write_csv(predictions_csv, cv["predictions"])
    return {**metrics, "seconds": round(seconds, 2)}  # the time is returned and printed, not stored


def _check_sequence_model(path) -> None:
    """ValueError naming the file's kind when it is not a train_sequence model (e.g. the image
    training stage's checkpoint, which has 'model' where a sequence model has 'kind')."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"sequence model {path} not found")
    try:
        info = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # not a torch file at all, or not one weights_only can read
        raise ValueError(f"{path} is not a model file ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if isinstance(info, dict) and {"kind", "in_shape", "num_outputs", "kwargs"} <= set(info):
        return
    what = (f"an image model checkpoint ('{info.get('model')}', from the train stage)"
            if isinstance(info, dict) and "model" in info else "not a train_sequence model")
    raise ValueError(f"{path} is {what}; --test-only needs a sequence model saved by train_sequence "
                     "(--model-out, default data/sequences/model.pt)")


@writes("out_h5", "metrics_path")
def run_test_only(model_path, features_h5, out_h5, metrics_path=None) -> dict:
    """Apply a saved sequence model to a features file; write its outputs (LSTM-on-CNN --test-only).

    out_h5: outputs float32 [S, K] (probabilities, or predictions on the original scale), prediction
    (S, 1), label (S, 1) the target (-1 / NaN if none), seq_number int32 (S,), sequence_id (S,), and
    steps [S, T, K] (the output after each frame). Samples are built as the model was trained.
    """
    _check_sequence_model(model_path)
    model, info = load_sequence_model(model_path)
    cfg = SequenceConfig(**{k: v for k, v in info["meta"]["config"].items() if k in {f.name for f in fields(SequenceConfig)}})
    data = load_sequences(features_h5, cfg.task)
    if cfg.task == "classify" and data.classes != info["meta"]["classes"]:
        raise ValueError(f"{features_h5}: classes {data.classes} differ from the model's {info['meta']['classes']}")
    if tuple(data.in_shape) != tuple(info["in_shape"]):
        raise ValueError(f"{features_h5}: frames {data.in_shape}, the model expects {tuple(info['in_shape'])}")
    if info["meta"].get("input_mean") is not None:  # the model's training statistics, not the file's
        data = data.standardized_with(torch.tensor(info["meta"]["input_mean"], dtype=torch.float32),
                                      torch.tensor(info["meta"]["input_std"], dtype=torch.float32))
    if cfg.task == "regress":
        data.label_mean = np.asarray(info["meta"]["label_mean"], np.float32)
        data.label_std = np.asarray(info["meta"]["label_std"], np.float32)
    samples = make_samples(data, np.arange(len(data.starts)), cfg.rho, cfg.max_len, cfg.anticipation_first)
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
