"""Sequence data for training: a features file's frames, samples (windows or whole sequences) and
the batches the training loop (ferpipe.train.loop.fit) reads.

``load_sequences`` reads a features HDF5 (ferpipe.sequences.features layout); ``make_samples`` cuts it
into samples; ``SequenceBatches`` puts one fold's samples (training and validation, or test) on the
training device as one set indexed by row, as ``TensorData`` does for images; ``sequence_folds``
draws the subject-independent folds.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import GroupKFold, KFold, StratifiedGroupKFold, StratifiedKFold

from ferpipe.sequences.anticipation import prefix_length
from ferpipe.sequences.features import read_features


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
    splits: np.ndarray | None = None        # [S] the dataset's split of each sequence (train / val / test)

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
    splits = f.get("split", np.full(n, "train"))[starts]
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
                        file_mean=fm, file_std=fs, norm_mean=fm, norm_std=fs, splits=splits[sel].astype(str))


@dataclass
class Samples:
    idx: torch.Tensor     # [S, T] long, frame index, -1 = padding (left)
    mask: torch.Tensor    # [S, T] bool
    y: torch.Tensor       # [S] long or [S, L] float
    seq: np.ndarray       # [S] index of the sequence in SequenceData
    skipped: dict

    def __len__(self):
        return len(self.seq)


def clip_positions(n: int, frames: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """`frames` positions in a sequence of n frames, in order: spread uniformly (the centre of each of
    `frames` equal parts), or with `rng` drawn at random (without repeats when n >= frames). A sequence
    shorter than `frames` repeats frames, so every clip has the same length (Emotion SDK's 16-frame clips)."""
    if rng is None:
        return np.floor((np.arange(frames) + 0.5) * n / frames).astype(np.int64)
    return np.sort(rng.choice(n, size=frames, replace=n < frames)).astype(np.int64)


def make_samples(data: SequenceData, seqs, rho: int = 0, max_len: int = 0, first=0, clip: int = 0,
                 rng: np.random.Generator | None = None) -> Samples:
    """Windows (rho > 0) or whole left-padded sequences (rho = 0), optionally the first k frames only,
    or (clip > 0) clips of `clip` frames sampled from each sequence (``clip_positions``; `rng`: at random)."""
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
        if clip:
            frames = [frames[i] for i in clip_positions(len(frames), clip, rng)]
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


class ClipAugment:
    """Random horizontal flip and translation (zero fill) per sample, the same for all its frames. Its random
    numbers come from ``generator`` (as ``BatchAugment``'s: a training snapshot saves and restores it)."""

    def __init__(self, shift: int = 3, seed: int = 0):
        self.shift = int(shift)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        flip = (torch.rand(B, generator=self.generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None, None], x.flip(-1), x)
        if self.shift > 0:
            s, (H, W) = self.shift, x.shape[-2:]
            pad = F.pad(x, (s, s, s, s))
            d = torch.randint(0, 2 * s + 1, (B, 2), generator=self.generator).tolist()
            x = torch.stack([pad[b, :, :, d[b][0]:d[b][0] + H, d[b][1]:d[b][1] + W] for b in range(B)])
        return x


class SequenceBatches:
    """Samples as one set of rows on a device: ``batch(rows, augment) -> (x, mask, y)`` for train.loop.fit.

    ``parts`` (e.g. [training, validation]) are stacked in order; ``part(i)`` gives the rows of part i.
    A batch's frames are [B, T, C, H, W], zero at the left padding, T cut to the batch's longest sample
    (the models are causal and masked, so the amount of padding never changes an output).
    """

    def __init__(self, data: SequenceData, parts: list[Samples], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.X = data.X.to(self.device)
        self.classes = list(data.classes) if data.task == "classify" else []
        T = max([p.idx.shape[1] for p in parts] + [1])
        self.idx = torch.cat([F.pad(p.idx, (T - p.idx.shape[1], 0), value=-1) for p in parts]).to(self.device)
        self.y = torch.cat([p.y for p in parts]).to(self.device)
        self.bounds = np.cumsum([0] + [len(p) for p in parts])

    def __len__(self) -> int:
        return len(self.idx)

    def part(self, i: int) -> torch.Tensor:
        return torch.arange(int(self.bounds[i]), int(self.bounds[i + 1]), device=self.device)

    def class_counts(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.bincount(self.y[rows], minlength=len(self.classes)).cpu()

    def batch(self, rows: torch.Tensor, augment=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = self.idx[rows]
        mask = idx >= 0
        first = int(mask.any(0).int().argmax()) if len(idx) else 0
        idx, mask = idx[:, first:], mask[:, first:]
        x = self.X[idx.clamp(min=0)] * mask[:, :, None, None, None].to(self.X.dtype)
        if augment is not None:
            x = augment(x) * mask[:, :, None, None, None].to(x.dtype)
        return x, mask, self.y[rows]


def fold_plan(data: SequenceData, folds: int, seed: int) -> tuple[list[tuple], bool]:
    """[(name, train, val, test) sequence indices] and whether they are subject-independent.

    folds >= 3: k-fold cross-validation (test fold i, validation fold i+1, the rest trains).
    folds == 0: the dataset's own splits, as LSTM-on-CNN's train/val list files: train trains, val
    selects the epoch, test (when the data has one) is scored, else val is (then the figure is the
    validation one, optimistic: say so when you report it).
    """
    if folds == 0:
        splits = data.splits if data.splits is not None else np.full(len(data.starts), "train")
        train, val, test = (np.flatnonzero(splits == s) for s in ("train", "val", "test"))
        if not len(train) or not len(val):
            raise ValueError(f"sequence.folds 0 uses the dataset's splits: need train and val sequences, got "
                             f"{len(train)} train, {len(val)} val (a listfile folder with train.txt and val.txt)")
        return [("splits", train, val, test if len(test) else val)], False
    fold, grouped = sequence_folds(data, folds, seed)
    return [(k, np.flatnonzero((fold != k) & (fold != (k + 1) % folds)), np.flatnonzero(fold == (k + 1) % folds),
             np.flatnonzero(fold == k)) for k in range(folds)], grouped


def sequence_folds(data: SequenceData, folds: int, seed: int) -> tuple[np.ndarray, bool]:
    """Fold of every sequence; subject-independent when every sequence has a subject."""
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
