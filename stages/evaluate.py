"""Stage evaluate: the trained model(s) on the held-out test split (params: model, evaluate).

Only rows with split == test (never used for training or selection). The model is models/final.pt
when present, else the fold models with their softmax probabilities averaged (evaluate.members:
auto | final | folds); eval.json says which. evaluate.tta: N averages N augmented copies
(evaluate.tta_augment: flip / small affine) with the plain prediction.

Writes metrics/results.json (the one-screen summary, the DVC metrics file `dvc metrics show` and
`dvc exp show` list: test accuracy and macro-F1, the folds' validation mean and std read from
metrics/train.json, how many trained models ended at chance level, model, recipe) and, not DVC
metrics: metrics/eval.json (accuracy, macro_f1, balanced_accuracy, top2/top3 when classes > 2/3,
per-class precision/recall/f1, n), plots/eval/predictions.csv (id, actual, predicted, correct,
confidence, prob_<class>; a DVC confusion plot), plots/eval/confusion.png (counts and row-normalized)
and plots/eval/errors.png (the most confident wrong predictions, true / predicted).
A valence/arousal model (task valence_arousal) writes the same paths with regression content:
results.json test_rmse, test_ccc (means over valence and arousal) and the folds' val_loss_mean/std;
eval.json rmse, pearson, ccc, mse per target (rmse_valence, ...), sagr_valence (sign agreement) and
their means; predictions.csv id, actual_valence, actual_arousal, predicted_valence, predicted_arousal
(DVC's confusion template cannot draw it); --confusion's path holds the predicted-vs-true scatter
per target (there is no confusion matrix; the path stays the one dvc.yaml declares) and --errors' the
rows predicted farthest from the truth.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it. Example: python stages/evaluate.py -S evaluate.tta=8 --metrics metrics/eval_tta.json
Compare runs: dvc exp show --only-changed; dvc metrics diff --targets metrics/eval.json; dvc plots diff; ensembles of runs: python stages/ensemble.py --help
"""
import os

# Idle OpenMP threads sleep instead of spinning: with another busy process on the cores, spinning
# threads made small-model training ~20x slower here (bench/train_speed.py). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import yaml

from ferpipe.evaluate.run import DEFAULTS, run_evaluate
from ferpipe.params import add_set_option, stage_params
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__, epilog="evaluate params (params.yaml evaluate:, defaults): "
                                     + ", ".join(f"{k}={v}" for k, v in DEFAULTS.items()))
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--models", default="models", help="train stage output folder")
    p.add_argument("--split", default="data/split/split.csv")
    p.add_argument("--gray48", default="data/gray48/images.h5")
    p.add_argument("--guides", default="data/guides")
    p.add_argument("--metrics", default="metrics/eval.json", help="all test metrics, per class too (JSON, '' for none)")
    p.add_argument("--results", default="metrics/results.json",
                   help="the one-screen summary, the pipeline's DVC metrics file (JSON, '' for none)")
    p.add_argument("--train-metrics", default="metrics/train.json",
                   help="the train stage's metrics, for the summary's validation figures (none when absent)")
    p.add_argument("--predictions", default="plots/eval/predictions.csv", help="predictions CSV ('' for none)")
    p.add_argument("--confusion", default="plots/eval/confusion.png",
                   help="confusion PNG; a valence/arousal model's predicted-vs-true scatter ('' for none)")
    p.add_argument("--errors", default="plots/eval/errors.png", help="worst-errors sheet PNG ('' for none)")
    add_set_option(p, "evaluate.tta=4")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("model", "recipe", "evaluate.*"))
    m = run_evaluate(params, a.models, a.split, a.gray48, a.guides, a.metrics or None, a.predictions or None,
                     a.confusion or None, a.errors or None, a.results or None, a.train_metrics or None)
    keys = ("model", "members", "tta", "n", "accuracy", "macro_f1", "balanced_accuracy", "top2", "top3",
            "rmse", "ccc", "pearson", "sagr_valence")
    print(yaml.safe_dump({k: m[k] for k in keys if k in m}, sort_keys=False).rstrip())


if __name__ == "__main__":
    run_stage(main)
