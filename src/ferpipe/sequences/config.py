"""train_sequence's settings: one dataclass, the only place their code defaults live.

``SequenceConfig.from_params(params["sequence"])`` reads the params.yaml section (nested ``train:`` and
``anticipation:`` groups flattened); a key it does not know is an error, never silently dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

from ferpipe.sequences.anticipation import parse_first
from ferpipe.models.sequence import KINDS
from ferpipe.train.loop import SELECT, FitConfig

TASKS = ("classify", "regress")


@dataclass
class SequenceConfig:
    """Every knob of train_sequence (params.yaml `sequence:` section, see `from_params`)."""
    model: str = "lstm"               # lstm | cbm | convlstm | frame
    task: str = "classify"            # classify | regress
    rho: int = 0                      # 0 = whole sequences (masked many-to-one); > 0 = windows of rho frames
    max_len: int = 0                  # whole sequences: keep the last max_len frames (0 = all)
    clip_frames: int = 0              # whole sequences: clips of N frames sampled from each (0 = every frame; SDK: 16)
    clip_sampling: str = "uniform"    # uniform | random (training clips drawn at random per fold, seeded; others uniform)
    encoder: str = "none"             # frame encoder for raw frames (features mode images): none | simple | simple_fc | conv
    encoder_width: int = 16
    encoder_init: str = ""            # simple encoder: start from this CNN checkpoint's trunk (fine-tuned end to end)
    lstm: dict = field(default_factory=lambda: {"hidden": 256, "depth": 1, "dropout": 0.5})
    cbm: dict = field(default_factory=lambda: {"hidden": 64, "depth": 15, "shortcut": 5, "kernel": 0,
                                               "temporal_dropout": 0.3, "dropout": 0.5})
    convlstm: dict = field(default_factory=lambda: {"hidden": 64, "depth": 15, "shortcut": 5, "kernel": 0,
                                                    "dropout": 0.5})
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
    init_from: str = ""               # start every fold from this saved sequence model (LSTM-on-CNN --load)
    select: str = "loss"              # the validation figure that picks the best epoch: loss | accuracy | balanced_accuracy
    seed: int = 2020
    folds: int = 4                    # k-fold CV (>= 3), or 0: the dataset's train / val / test splits (list files)
    anticipation_first: float = 0     # 0 = off; k >= 1 frames or a fraction in (0, 1)
    anticipation_weight: float = 1.0
    final: bool = True                # also train the model that is saved (all folds but fold 0, which validates)
    device: str = "auto"              # auto (CUDA + mixed precision when present) | cpu | cuda
    threads: int = 0                  # CPU threads (0 = every core)
    eval_batch_size: int = 256        # validation inside training, and the test / --test-only passes
    snapshot_every: int = 5           # a resumable state every N epochs and at a fold's end (0 = none): ferpipe.train.loop
    plot_every: int = 10              # task regress: validation predictions vs targets every N epochs, in dvclive (0 = none)

    # params.yaml: these fields sit in the sequence.train group; the other stages' sub-sections of `sequence`
    TRAIN_KEYS = ("lr", "weight_decay", "batch_size", "epochs", "patience", "clip", "balanced", "augment", "shift",
                  "init_from", "select", "seed", "final", "device", "threads", "eval_batch_size", "snapshot_every",
                  "plot_every")
    OTHER_STAGES = ("dataset", "features", "landmarks_passes")

    @classmethod
    def from_params(cls, section: dict | None) -> "SequenceConfig":
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
        cfg = cls(**{k: v for k, v in flat.items() if k in names})
        for group in KINDS:  # partial groups keep the other defaults
            setattr(cfg, group, {**getattr(cls(), group), **(getattr(cfg, group) or {})})
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if self.model not in KINDS:
            raise ValueError(f"sequence.model must be one of {KINDS}, got {self.model!r}")
        if self.task not in TASKS:
            raise ValueError(f"sequence.task must be one of {TASKS}, got {self.task!r}")
        if self.rho < 0 or self.max_len < 0 or self.folds in (1, 2) or self.folds < 0 or self.patience < 0 or self.epochs < 1:
            raise ValueError("need rho >= 0, max_len >= 0, folds >= 3 (test, validation and training folds) or 0 "
                             "(the dataset's train / val / test splits), "
                             "patience >= 0, epochs >= 1")
        if self.select not in SELECT or (self.task == "regress" and self.select != "loss"):
            raise ValueError(f"sequence.train.select must be one of {', '.join(SELECT)} (regress: loss), "
                             f"got {self.select!r}")
        for name, low in (("eval_batch_size", 1), ("snapshot_every", 0), ("plot_every", 0)):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < low:
                raise ValueError(f"sequence.train.{name} must be a whole number >= {low}, got {getattr(self, name)!r}")
        if self.clip_frames < 0 or self.clip_sampling not in ("uniform", "random"):
            raise ValueError("sequence.clip_frames must be >= 0 and clip_sampling uniform or random")
        if self.clip_frames and (self.rho or self.anticipation_first):
            raise ValueError("sequence.clip_frames samples whole sequences: it needs rho 0 and no anticipation")
        parse_first(self.anticipation_first)
        if self.anticipation_first and (self.task != "classify" or self.rho):
            raise ValueError("anticipation needs task classify and whole sequences (rho 0)")

    def fit_config(self, seed: int) -> FitConfig:
        """The training loop's settings (the one loop images train with, ferpipe.train.loop)."""
        return FitConfig(max_epochs=self.epochs, patience=self.patience, batch_size=self.batch_size,
                         eval_batch_size=self.eval_batch_size, lr=self.lr, weight_decay=self.weight_decay,
                         select=self.select, clip=self.clip, channels_last=False, seed=seed, log_every=0,
                         snapshot_every=self.snapshot_every, plot_every=self.plot_every)

    def model_kwargs(self) -> dict:
        kw = dict(getattr(self, self.model))
        if self.encoder not in (None, "", "none") or self.model == "frame":
            kw.update(encoder=self.encoder if self.encoder not in (None, "") else "none",
                      encoder_width=self.encoder_width)
        return kw
