"""The packed artifacts of a run loaded once into memory as tensors, batches by index tensors.

No DataLoader and no file per item: the image array (gray48, or the patches/weighted collage) and,
for guided models, the guide map are read from their HDF5 files once, stacked as channels
[N, C, S, S] (the image's channels first: 1 gray, or R, G, B under ingest.color rgb; then the
guide) and kept as uint8 on the training
device. A batch is ``data.batch(index_tensor)``: a gather, a float conversion (/255), the batched
augmentation (``ferpipe.data.augment``) and the per-channel standardization, all on the device.
The train stage loads the train and test rows, the evaluate stage the test rows only.

Larger than memory: when the rows of a run do not fit the memory budget (``memory_budget``:
train.memory_gb, 0 = auto), the arrays stay in their files (``DiskPixels``) and each batch reads
its rows from them; the gather is the only step that differs, so both modes give the same batches
bit for bit (tests/test_tensors.py).

Which arrays a model needs comes from ``MODEL_SPECS[name]`` (image: gray48 | patches | weighted;
guide: None | a guide kind). Rows follow data/split/split.csv (its ``index`` column is the row in
the packed arrays; ids are checked).

Targets: class indices [N] (int64) for a classification split (task classes | polarity), or, for a
split of task valence_arousal (no class target, float ``valence`` and ``arousal`` columns), the
regression targets [N, 2] (float32, ``REGRESSION_TARGETS`` order) kept on their original scale;
``batch`` returns them standardized with ``target_mean`` / ``target_std`` (``standardize_targets``
sets those from the training rows; the checkpoint keeps them so inference returns the original scale).

The input recipe (``InputSpec``: channels, size, per-channel mean/std, kept in a checkpoint's
meta["input"]) and the resize + standardization of a batch are ``ferpipe.models.inputs``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ferpipe.models import MODEL_SPECS
from ferpipe.models.inputs import InputSpec, image_planes, model_size, normalize, split_channels
from ferpipe.store import BLOCK_BYTES, open_h5, read_attrs, read_rows


def artifact_paths(image: str, guide: str | None, gray48: str | os.PathLike = "data/gray48/images.h5",
                   guides_dir: str | os.PathLike = "data/guides") -> tuple[Path, Path | None]:
    """Where the image array and the guide array of a model live."""
    img = Path(gray48) if image == "gray48" else Path(guides_dir) / f"{image}.h5"
    gd = None if guide is None else Path(guides_dir) / f"{guide}.h5"
    return img, gd


REGRESSION_TARGETS = ["valence", "arousal"]  # the outputs of a task valence_arousal model, in this order


def is_regression_split(table: pd.DataFrame) -> bool:
    """A split of task valence_arousal: no class target at all, and valence/arousal columns."""
    return bool(len(table)) and bool((table["target"] < 0).all()) and set(REGRESSION_TARGETS) <= set(table.columns)


def read_split(path: str | os.PathLike) -> tuple[pd.DataFrame, list[str]]:
    """split.csv and its class names (ordered by target; from the target/target_name pairs), or for a
    valence/arousal split its rows with both values and the target names ``REGRESSION_TARGETS``."""
    table = pd.read_csv(path, dtype={"id": str, "target_name": str}, keep_default_na=False)
    missing = {"id", "index", "split", "fold", "target"} - set(table.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)} (is it the split stage output?)")
    if is_regression_split(table):
        values = table[REGRESSION_TARGETS].apply(pd.to_numeric, errors="coerce")
        table[REGRESSION_TARGETS] = values
        table = table[values.notna().all(axis=1).to_numpy()].reset_index(drop=True)
        if table.empty:
            raise ValueError(f"{path}: no row with both valence and arousal")
        return table, list(REGRESSION_TARGETS)
    if (table["target"] < 0).all():
        raise ValueError(f"{path}: no class targets and no valence/arousal columns; the trainer needs a "
                         "classification task (task: classes | polarity) or task valence_arousal")
    table = table[table["target"] >= 0].reset_index(drop=True)
    n = int(table["target"].max()) + 1
    classes = [f"class{i}" for i in range(n)]
    if "target_name" in table:
        for t, name in table.groupby("target")["target_name"].first().items():
            if name:
                classes[int(t)] = name
    return table, classes


MEMORY_SHARE = 0.5  # memory_gb 0 (auto): the share of available RAM (and of free GPU memory) the arrays may take


def available_ram() -> int:
    """Bytes of RAM available without swapping (MemAvailable of /proc/meminfo; free pages elsewhere)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_budget(memory_gb: float = 0, device: str | torch.device = "cpu") -> int:
    """Bytes the pixels of a run may take in memory: `memory_gb` GiB when > 0; 0 = auto: MEMORY_SHARE
    of the available RAM (shared among the torchrun processes of this machine) and, on CUDA, no more
    than that share of the GPU's free memory (the pixels live there)."""
    try:
        gb = float(memory_gb)
    except (TypeError, ValueError):
        gb = math.nan
    if not (gb >= 0 and math.isfinite(gb)):
        raise ValueError(f"train.memory_gb must be a number >= 0 (GiB; 0 = auto), got {memory_gb!r}")
    if gb > 0:
        return int(gb * 2**30)
    budget = MEMORY_SHARE * available_ram() / max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    device = torch.device(device)
    if device.type == "cuda":
        budget = min(budget, MEMORY_SHARE * torch.cuda.mem_get_info(device)[0])
    return int(budget)


def channels_of(shape: tuple) -> int:
    """The channels of a packed image array of this shape: [N, S, S] 1, RGB [N, S, S, 3] 3."""
    return 1 if len(shape) == 3 else int(shape[3])


class DiskPixels:
    """The uint8 pixels [N, C, S, S] of a run left in their HDF5 files: the channels of dataset
    ``images`` of ``paths[0]`` (1 gray, 3 RGB), then those of ``paths[1]`` ...; row i is file row
    ``file_rows[i]``. It stands for the in-memory
    tensor: ``pixels[rows]`` / ``pixels[rows, channel]`` read those rows (``read_rows``: each
    distinct row once, in file order) and give a uint8 tensor on its device."""

    def __init__(self, paths: list[Path], file_rows: np.ndarray, device: str | torch.device = "cpu"):
        self.paths = [Path(p) for p in paths]
        self.file_rows = np.asarray(file_rows, np.int64)
        self.device = torch.device(device)
        self._files = [open_h5(p) for p in self.paths]
        arrays = [f["images"] for f in self._files]
        for path, ds in zip(self.paths[1:], arrays[1:]):
            if ds.shape[1:3] != arrays[0].shape[1:3]:
                raise ValueError(f"{path} is {ds.shape[1:3]}, {self.paths[0]} is {arrays[0].shape[1:3]}")
        self._arrays = arrays
        self.file_channels = [channels_of(ds.shape) for ds in arrays]
        self.shape = (len(self.file_rows), sum(self.file_channels), *arrays[0].shape[1:3])
        self.dtype = torch.uint8

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape)

    def to(self, device: str | torch.device) -> "DiskPixels":
        return self if torch.device(device) == self.device else DiskPixels(self.paths, self.file_rows, device)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 [len(rows), C, S, S]: these rows (any order, repeats allowed)."""
        file_rows = self.file_rows[np.asarray(rows, np.int64)]
        out = np.empty((len(file_rows), *self.shape[1:]), np.uint8)
        c = 0
        for ds, k in zip(self._arrays, self.file_channels):
            out[:, c:c + k] = image_planes(read_rows(ds, file_rows))
            c += k
        return out

    def load(self) -> np.ndarray:
        """Every row in memory (read in blocks of about BLOCK_BYTES)."""
        out = np.empty(self.shape, np.uint8)
        step = max(1, BLOCK_BYTES // max(1, math.prod(self.shape[1:])))
        for start in range(0, len(self), step):
            out[start:start + step] = self.read(np.arange(start, min(start + step, len(self))))
        return out

    def __getitem__(self, key) -> torch.Tensor:
        rows, channel = key if isinstance(key, tuple) else (key, slice(None))
        if isinstance(rows, slice):
            rows = np.arange(len(self))[rows]
        elif isinstance(rows, torch.Tensor):
            rows = rows.cpu().numpy()
        return torch.from_numpy(self.read(np.atleast_1d(rows))).to(self.device)[:, channel]


def _check_rows(path: Path, rows: np.ndarray, ids: np.ndarray) -> None:
    """The split's rows exist in `path` and hold the ids split.csv says."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (run its stage first: dvc repro)")
    with open_h5(path) as f:
        stored = f["ids"].asstr()[()].astype(str)
    if rows.max(initial=-1) >= len(stored):
        raise ValueError(f"{path} has {len(stored)} rows, split.csv refers to row {rows.max()}")
    got = stored[rows]
    if not np.array_equal(got, ids):
        bad = int(np.flatnonzero(got != ids)[0])
        raise ValueError(f"{path}: row {rows[bad]} is id {got[bad]!r}, split.csv says {ids[bad]!r}; "
                         "the artifacts come from different ingests (dvc repro)")


def open_pixels(table: pd.DataFrame, image: str = "gray48", guide: str | None = None,
                gray48: str | os.PathLike = "data/gray48/images.h5",
                guides_dir: str | os.PathLike = "data/guides") -> DiskPixels:
    """The image (and guide) rows of the split table, in its order, left on disk (ids checked):
    ``.load()`` gives them in memory as uint8 [len(table), C, S, S]."""
    paths = [p for p in artifact_paths(image, guide, gray48, guides_dir) if p is not None]
    rows = table["index"].to_numpy(np.int64)
    ids = table["id"].astype(str).to_numpy()
    for path in paths:
        _check_rows(path, rows, ids)
    return DiskPixels(paths, rows)


class TensorData:
    """All rows of one run in memory as uint8 [N, C, S, S] on `device` (or, given ``DiskPixels``, left
    on disk and read batch by batch), plus targets: class indices [N],
    or with ``regression`` the float targets [N, 2] (``REGRESSION_TARGETS`` columns of the table, on
    their original scale; ``classes`` then names them).

    ``batch(idx)`` gathers rows by an index tensor and returns float, optionally augmented,
    standardized input (and standardized regression targets). ``train_rows(folds)`` /
    ``val_rows(fold)`` / ``test_rows()`` give index tensors.
    """

    def __init__(self, pixels: np.ndarray | DiskPixels, table: pd.DataFrame, classes: list[str], spec: InputSpec,
                 device: str | torch.device = "cpu", regression: bool = False):
        self.device = torch.device(device)
        self.pixels = (torch.from_numpy(pixels) if isinstance(pixels, np.ndarray) else pixels).to(self.device)
        self.regression = bool(regression)
        if self.regression:
            values = table[REGRESSION_TARGETS].to_numpy(np.float32).copy()
            self.targets = torch.from_numpy(values).to(self.device)
        else:
            self.targets = torch.from_numpy(table["target"].to_numpy(np.int64).copy()).to(self.device)
        k = len(REGRESSION_TARGETS) if self.regression else 0
        self.target_mean = torch.zeros(k, device=self.device)   # batch() returns (targets - mean) / std
        self.target_std = torch.ones(k, device=self.device)
        self.table = table.reset_index(drop=True)
        self.classes = list(classes)
        self.spec = spec
        self._fold = table["fold"].to_numpy(np.int64)
        self._split = table["split"].astype(str).to_numpy()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def streaming(self) -> bool:
        """The pixels stay in their files; each batch reads its rows."""
        return isinstance(self.pixels, DiskPixels)

    @property
    def folds(self) -> list[int]:
        return sorted(int(f) for f in np.unique(self._fold[self._split == "train"]) if f >= 0)

    def _rows(self, mask: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.flatnonzero(mask)).to(self.device)

    def train_rows(self, exclude_fold: int | None = None) -> torch.Tensor:
        """Training rows (split == train), leaving out one validation fold when given."""
        mask = self._split == "train"
        if exclude_fold is not None:
            mask &= self._fold != exclude_fold
        return self._rows(mask)

    def val_rows(self, fold: int) -> torch.Tensor:
        return self._rows((self._split == "train") & (self._fold == fold))

    def test_rows(self) -> torch.Tensor:
        return self._rows(self._split == "test")

    def class_counts(self, rows: torch.Tensor) -> torch.Tensor:
        if self.regression:
            raise ValueError("a valence/arousal split has no classes to count")
        return torch.bincount(self.targets[rows], minlength=len(self.classes))

    def standardize_targets(self, rows: torch.Tensor | None) -> tuple[list[float], list[float]]:
        """Regression: standardize the targets ``batch`` returns with the mean / std (population) of
        `rows` (the training rows of a run; None = back to the original scale). Returns (mean, std)."""
        if not self.regression:
            return [], []
        if rows is None:
            self.target_mean = torch.zeros_like(self.target_mean)
            self.target_std = torch.ones_like(self.target_std)
        else:
            y = self.targets[rows].to(torch.float64)
            self.target_mean = y.mean(0).float()
            self.target_std = y.std(0, unbiased=False).clamp_min(1e-6).float()
        return [float(v) for v in self.target_mean], [float(v) for v in self.target_std]

    def batch(self, idx: torch.Tensor, augment=None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(image, guide, targets) for the rows `idx`; `augment(x)` runs on [B,C,S,S] in [0, 1]. Streaming
        or not, only the gather differs (uint8 rows from memory or from the files): the rest is one path."""
        x = self.pixels[idx].float().div_(255.0)
        if augment is not None:
            x = augment(x)
        image, guide = split_channels(normalize(x, self.spec), self.spec.image_channels)
        y = self.targets[idx]
        if self.regression:
            y = (y - self.target_mean) / self.target_std
        return image, guide, y


def load_data(split_csv: str | os.PathLike, model: str, model_kwargs: dict | None = None,
              gray48: str | os.PathLike = "data/gray48/images.h5", guides_dir: str | os.PathLike = "data/guides",
              device: str | torch.device = "cpu", splits: tuple[str, ...] = ("train", "test"),
              memory_gb: float = 0) -> TensorData:
    """Read split.csv and the arrays `model` needs; keep the rows of `splits`; mean/std left at 0/1
    (the input's and, for a valence/arousal split, the targets'). The rows are loaded into memory
    when they fit ``memory_budget(memory_gb, device)``, else left on disk (streamed batch by batch)."""
    table, classes = read_split(split_csv)
    regression = is_regression_split(table)
    table = table[table["split"].isin(splits)].reset_index(drop=True)
    if table.empty:
        raise ValueError(f"{split_csv}: no rows with split in {list(splits)}")
    ms = MODEL_SPECS[model]
    check_guides_found_faces(InputSpec(image=ms["image"], guide=ms["guide"]), guides_dir)
    disk = open_pixels(table, ms["image"], ms["guide"], gray48, guides_dir)
    spec = InputSpec(image=ms["image"], guide=ms["guide"], size=model_size(model, model_kwargs),
                     mean=[0.0] * disk.shape[1], std=[1.0] * disk.shape[1],
                     image_channels=disk.file_channels[0])   # 3: the RGB images of ingest.color rgb
    budget = memory_budget(memory_gb, device)
    if disk.nbytes <= budget:
        pixels = disk.load()
    else:
        pixels = disk
        print(f"{disk.nbytes / 2**30:.2f} GiB of pixels > the memory budget of {budget / 2**30:.2f} GiB "
              f"(train.memory_gb {memory_gb}): batches are read from {', '.join(map(str, disk.paths))}", flush=True)
    return TensorData(pixels, table, classes, spec, device, regression=regression)


def check_guides_found_faces(spec: InputSpec, guides_dir: str | os.PathLike = "data/guides") -> None:
    """A guide drawn from landmarks that no detector looked for (``landmarks.passes: []``, what the
    quick / cpu60 / bundled recipes set, since their model needs no guide) holds the same fixed face
    for every image: training a guided model on it would be a silent lie, so it is an error."""
    for kind in {spec.image, spec.guide} - {"gray48", None}:
        path = Path(guides_dir) / f"{kind}.h5"
        if path.is_file() and read_attrs(path).get("landmarks_passes", None) == []:
            raise ValueError(f"guide '{kind}' was drawn without face detection (landmarks.passes is [], as "
                             "in the quick/cpu60/bundled recipes): add -S 'landmarks.passes=[dlib,dlib_equalized,"
                             "dlib_padded,mtcnn,haar,mmod]' (conf/config.yaml's default) to train a guided model")
