"""Stage train: k-fold cross-validation of the `model` param, an optional final model (params: model, task, train).

Reads data/split/split.csv (folds; the test rows are never loaded here), the gray48 images and, for a
guided model, its guide map (data/guides/<kind>.h5); which ones comes from the model registry.
Writes models/fold<k>.pt (best epoch by validation accuracy on fold k), models/final.pt when
train.final is true (all training rows, round(mean best epoch) epochs; max_epochs with train.folds
none), metrics/train.json (per fold: validation accuracy, best epoch, at_chance; not a DVC metric:
metrics/results.json holds the summary) and per-epoch dvclive curves in dvclive/train/fold<k> (and .../final), and the learning curves of every
fold and the final model in one PNG (plots/train/curves.png).

Runs on CUDA with mixed precision when present, else CPU (train.threads, 0 = every core).
Training rows whose pixels exceed train.memory_gb (0 = auto: half the available RAM / free GPU memory)
stay in their HDF5 files and each batch reads its rows: the same batches and results, only slower.
Several processes (DDP; gloo on CPU, nccl on GPU), only rank 0 writing:
  torchrun --nproc_per_node 2 stages/train.py
Transfer learning: -S train.init_from=path/to/other/final.pt (head replaced if the classes differ).
Valence/arousal (a split of task valence_arousal): 2 outputs, targets standardized with the training
rows' mean/std (kept in the checkpoint), train.loss auto|mse or ccc (1 - concordance correlation),
epochs selected by validation loss (needs -S train.select=loss); train.json then has val_loss per fold.
A fold whose best model is no better than always answering the most common class is at chance: a
WARNING line, at_chance in its metrics and runs_at_chance in metrics/results.json.
Snapshots: every train.snapshot_every epochs (5) each fold's state goes to .ferpipe/snapshots/train/; run
again after a kill or failure with the same params and data, the stage resumes there (finished folds are
not retrained; the results are an uninterrupted run's). rm -r .ferpipe/snapshots starts fresh.
Valence/arousal: every train.plot_every epochs (10) a predicted-vs-true scatter per fold in dvclive/train.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it. Examples:
  python stages/train.py -S model=soft -S 'train.folds=[0]' -S train.max_epochs=5
  dvc exp run -S model=soft -S 'train.folds=[0,1]'
"""
import os

# Idle OpenMP threads sleep instead of spinning: with another busy process on the cores, spinning
# threads made small-model training ~20x slower here (bench/train_speed.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import yaml

from ferpipe.evaluate.plots import curves_png
from ferpipe.models.checkpoint import read_checkpoint_info
from ferpipe.params import add_set_option, required, stage_params
from ferpipe.stagecli import run_stage, stage_parser
from ferpipe.train.run import DEFAULTS, run_train


def parser():
    p = stage_parser(__doc__, epilog="train params (params.yaml train:, defaults): "
                                     + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items() if k != "progress"))
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--split", default="data/split/split.csv", help="split stage output")
    p.add_argument("--gray48", default="data/gray48/images.h5", help="gray48 stage output")
    p.add_argument("--guides", default="data/guides", help="folder of the guide_<kind> stages' outputs")
    p.add_argument("--models", default="models", help="output folder for fold<k>.pt / final.pt")
    p.add_argument("--metrics", default="metrics/train.json", help="metrics JSON ('' for none)")
    p.add_argument("--live", default="dvclive/train", help="dvclive root, one folder per fold ('' for none)")
    p.add_argument("--curves", default="plots/train/curves.png",
                   help="learning curves of every fold and the final model (PNG, '' for none)")
    add_set_option(p, "model=soft -S 'train.folds=[0]' -S train.max_epochs=3")
    return p


def write_curves(path: str, models_dir: str, model: str) -> None:
    """The learning curves PNG, from the histories the checkpoints keep in their meta."""
    runs = sorted(Path(models_dir).glob("fold*.pt"), key=lambda f: int(f.stem[4:])) + sorted(Path(models_dir).glob("final.pt"))
    histories = {f.stem: read_checkpoint_info(f)["meta"].get("history", []) for f in runs}
    curves_png(path, histories, title=f"{model}: learning curves")


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("model", "task", "train.*"))
    required(params, "model", a.params)  # the one param without a default
    metrics = run_train(params, a.split, a.gray48, a.guides, a.models, a.metrics or None, a.live or None)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks
        if a.curves:
            write_curves(a.curves, a.models, params["model"])
        print(yaml.safe_dump({k: v for k, v in metrics.items() if k != "classes"}, sort_keys=False).rstrip())


if __name__ == "__main__":
    run_stage(main)
