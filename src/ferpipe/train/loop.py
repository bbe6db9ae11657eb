"""The training loop of every model ferpipe trains (images and sequences): Adam, an objective
(class-weighted cross-entropy, mean squared error, 1 - concordance correlation for valence/arousal,
the sequences' anticipation loss), optional
gradient clipping, early stopping on a validation figure.

One ``fit`` call trains one model on a set of rows of a dataset that gives batches by index (a
``TensorData`` of images, a ``SequenceBatches`` of clips) and returns the state of the epoch with
the best validation figure (``select``: accuracy as Guided-ST, balanced accuracy, the mean
per-class recall, or the validation loss as LSTM-on-CNN; ties keep the earlier epoch; training
figures never select anything). Patience: stop when ``patience`` epochs passed without a gain.
Without validation rows (the final model on all training data) it runs exactly ``max_epochs``
epochs and returns the last state.

Why balanced accuracy exists: with class weights the loss asks for a balanced answer, but plain
accuracy rewards the majority class. A constant answer in the first epoch scores the majority share
(0.50 on the demo's polarity folds), a model that has started to learn scores less for a while, and
30 epochs of patience (60 optimizer steps on the demo's 256 training rows) ended such folds with
the epoch-1 constant model. A constant answer's balanced accuracy is 1/classes, and with balanced
selection patience only starts counting once a model beats that: a fold at chance keeps training (up
to max_epochs) rather than stopping with its epoch-1 model.

Device and processes: ``setup_runtime`` picks CUDA (with autocast mixed precision) when present,
else CPU with ``torch.set_num_threads``; under ``torchrun`` it joins the process group (gloo on
CPU, nccl on GPU). Every rank draws the same shuffled order, takes its shard ``batch[rank::world]``
of each batch, and DistributedDataParallel all-reduces the gradients; epoch metrics are summed
over ranks, so every rank makes the same early-stopping decision. Only rank 0 logs and writes.

Determinism on CPU: ``seed_everything`` seeds torch/numpy/random and turns on
``torch.use_deterministic_algorithms`` (warn-only, so an op without a deterministic kernel on some
device still runs); shuffling and augmentation use their own seeded generators.

Snapshots (``cfg.snapshot_every`` and a ``snapshot`` path): every N epochs and when it ends, ``fit``
writes everything the next epoch depends on (weights, optimizer, plateau and step counters, the
shuffling, augmentation and torch RNG states of every process, the best state, history, regression
plots); a later ``fit`` with the same key (settings, rows, model shape, process count) continues
after that epoch, bitwise as if it had never stopped, or returns a finished fit's result without
training (``ferpipe.train.snapshots``; its ``RunSnapshots`` names a stage run's folder of them).
"""
from __future__ import annotations

import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from ferpipe.train.snapshots import note, read_snapshot, save_snapshot, set_rng_state, snapshot_key



# ---------------------------------------------------------------------------- runtime

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None   # autocast dtype on CUDA, None = full precision
    threads: int = 1
    restore: dict = field(default_factory=dict)  # process-wide torch settings to put back at teardown

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        amp = f", amp {str(self.amp_dtype).removeprefix('torch.')}" if self.amp_dtype else ""
        ddp = f", DDP {self.world} processes" if self.distributed else ""
        dev = self.device.type if self.device.type != "cpu" else f"cpu ({self.threads} threads)"
        return f"{dev}{amp}{ddp}"


def setup_runtime(device: str = "auto", threads: int = 0, amp: bool = True) -> Runtime:
    """Choose the device, thread count and mixed precision; join the torchrun process group if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"train.device must be auto, cpu or cuda, got {device!r}")
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("train.device is cuda but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    cores = os.cpu_count() or 1
    n_threads = int(threads) if threads else max(1, cores // world)
    restore = {"threads": torch.get_num_threads(),
               "deterministic": (torch.are_deterministic_algorithms_enabled(),
                                 torch.is_deterministic_algorithms_warn_only_enabled())}
    torch.set_num_threads(n_threads)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    amp_dtype = None
    if use_cuda and amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return Runtime(dev, rank, world, local_rank, amp_dtype, n_threads, restore)


def teardown_runtime(rt: Runtime) -> None:
    """Leave the process group; put back the thread count and determinism flags of the caller."""
    if rt.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    if rt.restore:
        torch.set_num_threads(rt.restore["threads"])
        mode, warn_only = rt.restore["deterministic"]
        torch.use_deterministic_algorithms(mode, warn_only=warn_only)


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python, numpy and torch; ask torch for deterministic kernels where it has them."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


# ---------------------------------------------------------------------------- config

@dataclass
class FitConfig:
    max_epochs: int = 500
    patience: int = 30
    batch_size: int = 128
    eval_batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    optimizer: str = "adam"           # adam (Guided-ST) | radam (RMN) | sgd
    lr_schedule: str = "constant"     # constant (Guided-ST) | cosine (per batch, to 0 at max_epochs) | plateau (RMN)
    plateau_patience: int = 2         # plateau: epochs without a gain before the rate drops 10x (RMN: 2)
    localization_lr: float = 1.0      # STN localization net's rate as a fraction of lr (1 = Guided-ST)
    localization_warmup: float = 1.0  # epochs over which the localization net's rate ramps up from 0 (0 = none)
    select: str = "balanced_accuracy"  # the validation figure that picks the best epoch: balanced_accuracy | accuracy | loss
    clip: float = 0.0                 # gradient-norm clipping (0 = none; LSTM-on-CNN / Deep RNN: 5)
    label_smoothing: float = 0.0      # CrossEntropy label smoothing of the training loss (validation loss: none)
    channels_last: bool = True        # conv weights and batches in NHWC: the CPU kernels are faster (bench/train_speed.py)
    compile: bool = False             # torch.compile (inductor) the model for the training steps (validation runs eager)
    seed: int = 2020
    progress: bool | None = None      # None: a bar when stderr is a terminal
    log_every: int = 10               # print an epoch summary line every N epochs, and the first and last (0 = never)
    snapshot_every: int = 0           # a resumable state every N epochs and at the end, at fit's `snapshot` path (0 = none)
    plot_every: int = 0               # regression: validation predictions vs targets every N epochs (needs `targets`, `live`)




def class_weights(counts: torch.Tensor) -> torch.Tensor:
    """min_count / count_c per class (Guided-ST); a class with no rows gets weight 0."""
    counts = counts.to(torch.float32)
    present = counts > 0
    if not present.any():
        raise ValueError("no training rows")
    w = torch.zeros_like(counts)
    w[present] = counts[present].min() / counts[present]
    return w


# the validation figure that selects the best epoch: (history key, True when higher is better)
SELECT = {"accuracy": ("val_acc", True), "balanced_accuracy": ("val_bal_acc", True), "loss": ("val_loss", False)}


class CrossEntropy:
    """Class-weighted cross-entropy on ``model(*inputs)``; label smoothing in training only.

    An objective is what ``fit`` minimizes and how it asks the model: ``objective(model, inputs, y,
    training) -> (loss, outputs)``, outputs [B, K] are the scores the metrics read (``classify``: the
    arg-max is the answer). Image and sequence training differ only in their objective and batches.
    """
    classify = True

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        self.weight, self.label_smoothing = weight, float(label_smoothing)

    def to(self, device) -> "CrossEntropy":
        if self.weight is not None:
            self.weight = self.weight.to(device)
        return self

    def __call__(self, model, inputs, y, training: bool = False):
        out = model(*inputs)
        loss = F.cross_entropy(out.float(), y, weight=self.weight,
                               label_smoothing=self.label_smoothing if training else 0.0)
        return loss, out


class MeanSquared:
    """Mean squared error on standardized regression targets (valence / arousal); no accuracy."""
    classify = False

    def to(self, device) -> "MeanSquared":
        return self

    def __call__(self, model, inputs, y, training: bool = False):
        out = model(*inputs)
        return F.mse_loss(out.float(), y), out


def concordance(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Lin's concordance correlation coefficient per column of [B, K] tensors (population moments):
    2 cov / (var_pred + var_target + (mean_pred - mean_target)^2). 1 = identical; 0 = uncorrelated;
    unlike Pearson r it also counts a shift or a scale difference as disagreement."""
    pred, target = pred.float(), target.float()
    mp, mt = pred.mean(0), target.mean(0)
    dp, dt = pred - mp, target - mt
    cov = (dp * dt).mean(0)
    return 2 * cov / (dp.pow(2).mean(0) + dt.pow(2).mean(0) + (mp - mt).pow(2) + eps)


class Concordance:
    """1 - CCC (concordance correlation coefficient), averaged over the targets: AffectNet's figure of
    merit as the loss (``train.loss: ccc``). Computed per batch, so the validation loss ``fit`` reports
    is the row-weighted mean of per-batch values (one batch when the validation rows fit in
    ``eval_batch_size``); a batch of one row has no variance and gives loss 1."""
    classify = False

    def to(self, device) -> "Concordance":
        return self

    def __call__(self, model, inputs, y, training: bool = False):
        out = model(*inputs)
        return 1.0 - concordance(out.float(), y).mean(), out


@dataclass
class FitResult:
    best_state: dict
    best_epoch: int
    best_val_acc: float | None        # accuracy of the selected epoch
    best_val_loss: float | None
    epochs: int
    best_val_bal_acc: float | None = None
    best_score: float | None = None   # the selected figure (cfg.select) of that epoch
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    images: int = 0

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def _all_sum(rt: Runtime, *values: torch.Tensor) -> list[torch.Tensor]:
    t = torch.stack([v.detach().to("cpu", torch.float64) for v in values])  # counters live on either device
    if rt.distributed:
        # gloo/nccl both reduce float64 on their own devices
        t = t.to(rt.device)
        dist.all_reduce(t)
    return list(t.cpu())


def _to_memory(inputs: tuple, memory: torch.memory_format) -> tuple:
    """4-d batches (images) in the conv weights' memory format; other inputs (masks, 5-d clips) as they are."""
    return tuple(x.contiguous(memory_format=memory) if isinstance(x, torch.Tensor) and x.dim() == 4 else x
                 for x in inputs)


@torch.no_grad()
def evaluate_rows(model: nn.Module, data, rows: torch.Tensor, objective, rt: Runtime,
                  batch_size: int = 512, outputs: list | None = None) -> tuple[float, float, float]:
    """(mean loss, accuracy, balanced accuracy) of `model` on `rows` of `data` (each rank takes a shard;
    results summed). Balanced accuracy: the mean recall over the classes present in `rows` (a constant
    answer scores 1 / that many classes, whatever the class shares). Regression: accuracies are NaN.
    `outputs`, when a list: (targets, outputs) of each batch of this rank's shard are appended (on the CPU)."""
    net = _unwrap(model)
    was_training = net.training
    net.eval()
    rows = rows[rt.rank::rt.world]
    k = len(data.classes) if objective.classify else 0
    loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
    seen = torch.zeros((), device=rt.device, dtype=torch.float64)
    hits = torch.zeros(k, device=rt.device, dtype=torch.float64)    # correct answers per true class
    count = torch.zeros(k, device=rt.device, dtype=torch.float64)   # rows per true class
    for idx in rows.split(batch_size):
        *inputs, y = data.batch(idx)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
            loss, out = objective(net, inputs, y, training=False)
        loss_sum += loss.double() * len(idx)
        seen += len(idx)
        if outputs is not None:
            outputs.append((y.float().cpu(), out.float().cpu()))
        if k:
            hits += torch.bincount(y[out.argmax(1) == y], minlength=k).double()
            count += torch.bincount(y, minlength=k).double()
    loss_sum, n, *per_class = _all_sum(rt, loss_sum, seen, *hits, *count)
    hits, count = (torch.stack(per_class[:k]), torch.stack(per_class[k:])) if k else (None, None)
    net.train(was_training)
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    if not k:
        return float(loss_sum / n), float("nan"), float("nan")
    present = count > 0
    return float(loss_sum / n), float(hits.sum() / n), float((hits[present] / count[present]).mean())


def train_batches(rows: torch.Tensor, batch_size: int, generator: torch.Generator, world: int = 1) -> list[torch.Tensor]:
    """Shuffle rows (same order on every rank) and cut batches; a last batch too small to give
    every rank two samples (BatchNorm needs > 1) is dropped."""
    perm = torch.randperm(len(rows), generator=generator).to(rows.device)
    batches = list(rows[perm].split(batch_size))
    if len(batches) > 1 and len(batches[-1]) < 2 * world:
        batches.pop()
    return batches


LR_SCHEDULES = ("constant", "cosine", "plateau")
OPTIMIZERS = ("adam", "radam", "sgd")


def make_optimizer(name: str, groups: list[dict], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizers ferpipe trains with, by name: adam (Guided-ST, LSTM-on-CNN), radam (Residual Masking
    Network), sgd (momentum 0.9, nesterov). `groups` from ``param_groups``."""
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    if name == "radam":
        return torch.optim.RAdam(groups, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, weight_decay=weight_decay, momentum=0.9, nesterov=True)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")


class Plateau:
    """ReduceLROnPlateau on the figure that selects the best epoch (RMN's schedule): the rate is multiplied by
    `factor` after `patience` epochs without a gain (relative 1e-4, as torch's), never below `min_lr`."""

    def __init__(self, patience: int = 2, higher: bool = True, factor: float = 0.1, min_lr: float = 1e-6):
        if patience < 0:
            raise ValueError(f"plateau_patience must be >= 0, got {patience}")
        self.patience, self.higher, self.factor, self.min_lr = int(patience), higher, factor, min_lr
        self.scale, self.best, self.bad = 1.0, None, 0

    def step(self, value: float, base_lr: float) -> None:
        if math.isnan(value):
            return
        better = self.best is None or (value > self.best * (1 + 1e-4) if self.higher else value < self.best * (1 - 1e-4))
        if better:
            self.best, self.bad = value, 0
            return
        self.bad += 1
        if self.bad > self.patience:
            floor = self.min_lr / base_lr if base_lr > 0 else 0.0  # lr 0 (a frozen run) has nothing to lower
            self.scale = max(self.scale * self.factor, floor)
            self.bad = 0


def param_groups(net: nn.Module, localization_lr: float = 1.0, own_group: bool = False) -> list[dict]:
    """Adam groups: a spatial transformer's localization net at `localization_lr` x the rate (in a
    group of its own also when `own_group`, e.g. for its warm-up; the group has "localization": True).

    Why: with Adam every weight moves about lr per step whatever its gradient, so the predicted
    translation can leave the image within a few dozen steps; the sampler then reads only zero
    padding, the classifier sees a constant image, and no gradient ever brings it back (seen on
    FER-2013: soft, fold 2 of 5, translation -8 image widths, loss ln 3 from epoch 1 on).
    """
    loc = [p for n, p in net.named_parameters() if n.startswith("localization.")]
    rest = [p for n, p in net.named_parameters() if not n.startswith("localization.")]
    if localization_lr < 0:
        raise ValueError(f"localization_lr must be >= 0, got {localization_lr}")
    if not loc or (localization_lr == 1.0 and not own_group):
        return [{"params": list(net.parameters()), "lr_scale": 1.0, "localization": False}]
    return [{"params": rest, "lr_scale": 1.0, "localization": False},
            {"params": loc, "lr_scale": float(localization_lr), "localization": True}]


def scheduled_lr(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based) of `total_steps`.

    ``cosine`` anneals from ``base_lr`` to 0 over the whole ``max_epochs`` budget (per batch), so a
    short CPU budget still ends at a small rate instead of stopping mid-oscillation; early stopping
    still picks the best validation epoch. ``plateau``: ``base_lr`` here, times ``Plateau.scale``.
    """
    if schedule in ("constant", "plateau"):
        return base_lr
    if schedule == "cosine":
        return 0.5 * base_lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    raise ValueError(f"unknown lr_schedule {schedule!r}; known: {', '.join(LR_SCHEDULES)}")


# ---------------------------------------------------------------------------- regression plots

@dataclass
class TargetScale:
    """A regression's targets: their names and the mean / std they were standardized with, so the per-epoch
    plot shows predictions and targets on their own scale (value = standardized * std + mean)."""
    names: list[str]
    mean: list[float]
    std: list[float]


def regression_png(pairs: list[tuple[torch.Tensor, torch.Tensor]], targets: TargetScale, title: str) -> bytes:
    """The evaluate stage's scatter (predicted vs true, RMSE and CCC per target) of `pairs` (standardized
    (targets, outputs) batches, ``evaluate_rows(outputs=...)``) on the targets' scale, as PNG bytes."""
    from ferpipe.evaluate.metrics import regression_metrics
    from ferpipe.evaluate.plots import scatter_png_bytes

    mean, std = np.asarray(targets.mean, np.float64), np.asarray(targets.std, np.float64)
    y = torch.cat([a for a, _ in pairs]).double().numpy() * std + mean
    pred = torch.cat([b for _, b in pairs]).double().numpy() * std + mean
    return scatter_png_bytes(y, pred, targets.names, title, regression_metrics(y, pred, targets.names))


def _put_plot(live, epoch: int, png: bytes) -> None:
    """A regression plot into the dvclive folder: plots/images/regression/<epoch>.png (dvclive's
    ``<folder>/<step>.png`` pattern, which DVC Studio and the VS Code extension show as a slider)."""
    path = Path(live.plots_dir, "images", "regression", f"{epoch}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)


def _log_epoch(live, row: dict) -> None:
    """One epoch's figures into dvclive (also replayed from a snapshot when a run resumes)."""
    live.step = row["epoch"]
    for name in ("train_loss", "train_acc", "val_loss", "val_acc", "val_bal_acc"):
        if name in row and not math.isnan(row[name]):  # not `key`: that names the selected figure
            live.log_metric(name.replace("_", "/", 1), row[name])
    live.next_step()


def fit(model: nn.Module, data, train_rows: torch.Tensor, val_rows: torch.Tensor | None,
        cfg: FitConfig, rt: Runtime, weights: torch.Tensor | None = None, augment: Callable | None = None,
        live=None, desc: str = "train", objective=None, snapshot: Path | None = None,
        targets: TargetScale | None = None) -> FitResult:
    """Train `model` (already on rt.device, DDP-wrapped when distributed); return the best state.

    `data` gives batches by row index: ``data.batch(idx, augment) -> (*inputs, y)`` and its
    ``classes`` (a ``TensorData`` of images, a ``sequences.data.SequenceBatches`` of clips).
    `objective` (default: ``CrossEntropy(weights, cfg.label_smoothing)``) is the loss and how the
    model is called; `weights` are the class weights of that default.
    `snapshot` (with ``cfg.snapshot_every``): the file of this fit's resumable state (module docstring);
    every process passes it, the main one writes. `targets` (a regression; with ``cfg.plot_every`` and
    `live`): the scatter of validation predictions vs targets every N epochs, into the dvclive folder.
    """
    if len(train_rows) == 0:
        raise ValueError(f"{desc}: no training rows")
    has_val = val_rows is not None and len(val_rows) > 0
    net = _unwrap(model)
    memory = torch.channels_last if cfg.channels_last else torch.contiguous_format
    net.to(memory_format=memory)  # 4-d (conv) weights only; DDP's buckets follow the parameters
    if objective is None:
        objective = CrossEntropy(weights, cfg.label_smoothing)
    elif weights is not None:
        raise ValueError("class weights belong to the objective: pass CrossEntropy(weights) as objective")
    objective.to(rt.device)
    if cfg.localization_warmup < 0:
        raise ValueError(f"localization_warmup must be >= 0 epochs, got {cfg.localization_warmup}")
    optimizer = make_optimizer(cfg.optimizer, param_groups(net, cfg.localization_lr, own_group=cfg.localization_warmup > 0),
                               cfg.lr, cfg.weight_decay)
    scheduled_lr(cfg.lr, cfg.lr_schedule, 0, 1)  # an unknown schedule fails before the first epoch
    if cfg.select not in SELECT:
        raise ValueError(f"select must be one of {', '.join(SELECT)}, got {cfg.select!r}")
    key, higher = SELECT[cfg.select]
    if not objective.classify and key != "val_loss":
        raise ValueError(f"select {cfg.select!r} needs classes; a regression selects by loss")
    # plateau: watches the selecting figure, or the training loss when there is no validation
    plateau = Plateau(cfg.plateau_patience, higher if has_val else False) if cfg.lr_schedule == "plateau" else None
    # compiled once per fit; the validation pass stays eager (no second graph for eval mode)
    step_model = torch.compile(model) if cfg.compile else model
    step = 0
    scaler = torch.amp.GradScaler("cuda") if rt.amp_dtype == torch.float16 else None
    order = torch.Generator().manual_seed(int(cfg.seed))
    patience = cfg.patience if cfg.patience and cfg.patience > 0 else math.inf
    # balanced selection: patience starts once a model beats a constant answer (1/classes present), so a
    # fold whose first epochs sit at chance gets time to learn instead of keeping its epoch-1 model
    floor = (1.0 / max(1, int((data.class_counts(val_rows) > 0).sum())) + 1e-9
             if val_rows is not None and len(val_rows) and key == "val_bal_acc" else -math.inf)
    # tqdm: disable=None shows a bar only on a terminal (dvc repro logs stay readable)
    bar_off = True if not rt.is_main else (None if cfg.progress is None else not cfg.progress)
    last = ""  # the previous epoch's summary, shown on the next epoch's bar

    best = FitResult(best_state={}, best_epoch=0, best_val_acc=None, best_val_loss=None, epochs=0)
    plots: dict[int, bytes] = {}  # epoch -> the regression plot drawn then (kept in snapshots)
    first = 1
    snap_key = snapshot_key(asdict(cfg), net, train_rows, val_rows, rt.world, objective, augment) \
        if snapshot is not None and cfg.snapshot_every else None
    state = read_snapshot(Path(snapshot), snap_key, desc, rt.is_main) if snap_key else None
    if state is not None:
        best = FitResult(**state["result"])
        # the history's keys as the interned literals that made them: pickling memoizes by identity, so a
        # checkpoint holding this history has the bytes of an uninterrupted run's
        best.history = [{sys.intern(k): v for k, v in row.items()} for row in best.history]
        plots = {int(e): png.numpy().tobytes() for e, png in state["plots"].items()}
        if rt.is_main and live is not None:  # the dvclive folder is new: its curves and plots so far, again
            for row in best.history:
                _log_epoch(live, row)
            for e, png in plots.items():
                _put_plot(live, e, png)
        if state["done"]:
            if rt.is_main:
                note(f"{desc}: finished in an earlier run ({best.epochs} epochs): taken from its snapshot, not retrained")
            return best
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None:
            scaler.load_state_dict(state["scaler"])
        if plateau is not None:
            plateau.scale, plateau.best, plateau.bad = state["plateau"]
        step = state["step"]
        order.set_state(state["order"])
        set_rng_state(state["rng"][rt.rank], rt.device, augment)
        first = state["epoch"] + 1
        if rt.is_main:
            note(f"{desc}: resumed from its snapshot after epoch {state['epoch']}")
    seconds = best.seconds  # of the earlier runs of this fit
    t0 = time.perf_counter()
    for epoch in range(first, int(cfg.max_epochs) + 1):
        model.train()
        batches = train_batches(train_rows, cfg.batch_size, order, rt.world)
        loss_sum = torch.zeros((), device=rt.device, dtype=torch.float64)
        correct = torch.zeros((), device=rt.device, dtype=torch.float64)
        seen = 0
        bar = tqdm(total=len(batches), desc=f"{desc} epoch {epoch}/{cfg.max_epochs}", unit="batch", leave=False,
                   disable=bar_off, dynamic_ncols=True, postfix=_postfix(last, t0, epoch, first, cfg.max_epochs))
        total_steps = int(cfg.max_epochs) * len(batches)
        warm_steps = cfg.localization_warmup * len(batches)
        for idx in batches:
            rate = scheduled_lr(cfg.lr, cfg.lr_schedule, step, total_steps) * (plateau.scale if plateau else 1.0)
            warm = min(1.0, (step + 1) / warm_steps) if warm_steps > 0 else 1.0
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * rate * (warm if group["localization"] else 1.0)
            step += 1
            local = idx[rt.rank::rt.world]
            *inputs, y = data.batch(local, augment)
            with torch.autocast(rt.device.type, dtype=rt.amp_dtype, enabled=rt.amp_dtype is not None):
                loss, out = objective(step_model, _to_memory(inputs, memory), y, training=True)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip:
                nn.utils.clip_grad_norm_(net.parameters(), cfg.clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            loss_sum += loss.detach().double() * len(local)
            if objective.classify:
                correct += (out.detach().argmax(1) == y).sum()
            seen += len(local)
            bar.update(1)
            if not bar.disable and (bar.n % 10 == 0 or bar.n == len(batches)):
                bar.set_postfix_str(f"loss {float(loss_sum) / max(seen, 1):.4f} | "
                                    + _postfix(last, t0, epoch, first, cfg.max_epochs), refresh=False)
        bar.close()
        loss_sum, correct, n = _all_sum(rt, loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64))
        best.images += int(n)
        row = {"epoch": epoch, "train_loss": float(loss_sum / n),
               "train_acc": float(correct / n) if objective.classify else float("nan")}
        plot = (targets is not None and has_val and live is not None and rt.is_main and bool(cfg.plot_every)
                and epoch % cfg.plot_every == 0)
        pairs = [] if plot else None
        if has_val:
            row["val_loss"], row["val_acc"], row["val_bal_acc"] = evaluate_rows(model, data, val_rows, objective,
                                                                                 rt, cfg.eval_batch_size, pairs)
        if plateau is not None:
            plateau.step(row[key] if has_val else row["train_loss"], cfg.lr)
            row["lr"] = cfg.lr * plateau.scale
        best.history.append(row)
        improved = (not has_val) or best.best_score is None or (
            row[key] > best.best_score if higher else row[key] < best.best_score)
        if improved:
            best.best_state = {k: v.detach().to("cpu", copy=True) for k, v in net.state_dict().items()}
            best.best_epoch = epoch
            if has_val:
                best.best_val_acc, best.best_val_loss = row["val_acc"], row["val_loss"]
                best.best_val_bal_acc, best.best_score = row["val_bal_acc"], row[key]
        best.epochs = epoch
        stop = has_val and epoch - best.best_epoch >= patience and best.best_score > floor
        if rt.is_main:
            if live is not None:
                _log_epoch(live, row)
            if plot:
                plots[epoch] = regression_png(pairs, targets, f"{desc}, epoch {epoch}: validation")
                _put_plot(live, epoch, plots[epoch])
            last = f"train loss {row['train_loss']:.4f}" + (f" acc {row['train_acc']:.4f}" if objective.classify else "")
            if has_val:
                last += (f" | val loss {row['val_loss']:.4f}"
                         + (f" acc {row['val_acc']:.4f} bal {row['val_bal_acc']:.4f}" if objective.classify else "")
                         + f" | best {best.best_score:.4f} @ {best.best_epoch}")
            if cfg.log_every and (epoch % cfg.log_every == 0 or epoch == 1 or epoch == cfg.max_epochs or stop):
                tqdm.write(f"{desc} epoch {epoch}/{cfg.max_epochs}: {last}")
        done = stop or epoch == cfg.max_epochs
        if snap_key and (done or epoch % cfg.snapshot_every == 0):
            best.seconds = seconds + time.perf_counter() - t0
            result = {f.name: getattr(best, f.name) for f in fields(FitResult)}
            save_snapshot(Path(snapshot), snap_key, epoch, done, result, plots, rt, augment, net, optimizer, scaler,
                          plateau, step, order)
        if stop:
            if rt.is_main and cfg.log_every:
                tqdm.write(f"{desc}: early stop at epoch {epoch} (no validation {cfg.select} gain for "
                           f"{epoch - best.best_epoch} epochs)")
            break
    if rt.device.type == "cuda":
        torch.cuda.synchronize(rt.device)
    best.seconds = seconds + time.perf_counter() - t0
    return best


def _postfix(last: str, t0: float, epoch: int, first: int, max_epochs: int) -> str:
    """The bar's text after the batch count: the previous epoch's summary and the run's ETA (at max_epochs);
    t0: when epoch `first` (1, or the one after a snapshot) began."""
    if epoch <= first:
        return last
    per_epoch = (time.perf_counter() - t0) / (epoch - first)
    left = per_epoch * (max_epochs - epoch + 1)
    eta = f"{int(left // 3600)}:{int(left % 3600 // 60):02d}:{int(left % 60):02d}"
    return f"{last} | {per_epoch:.1f} s/epoch | ETA {eta} to epoch {max_epochs}"

