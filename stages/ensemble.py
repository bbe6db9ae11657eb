"""Ensemble command (not a DVC stage): average the class probabilities of several predictions CSVs.

Each CSV is an evaluate output (plots/eval/predictions.csv) of one experiment. Save them first, e.g.
  dvc exp show                                   # experiment names / refs
  git show <exp-ref>:plots/eval/predictions.csv > exp_soft.csv
  python stages/ensemble.py exp_soft.csv exp_landmarks.csv exp_baseline.csv \\
      --out metrics/ensemble.json --predictions-out ensemble_predictions.csv
Rows are matched by id; the files must hold the same test rows, labels and classes. Prints the
accuracy of every member and of the ensemble (accuracy, macro_f1, balanced_accuracy, top2/top3,
per-class precision/recall/f1), and writes them as JSON with --out.
"""
import json

from ferpipe.evaluate.ensemble import run_ensemble
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("predictions", nargs="+", help="predictions CSVs (id, actual, prob_<class> ...)")
    p.add_argument("--weights", type=float, nargs="+", help="one weight per CSV (default: equal)")
    p.add_argument("--out", help="write the metrics JSON here")
    p.add_argument("--predictions-out", dest="predictions_out", help="write the ensemble's predictions CSV here")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if len(a.predictions) < 2:
        p.error("give at least two predictions CSVs")
    m = run_ensemble(a.predictions, a.out, a.predictions_out, a.weights)
    for name, acc in m["members"].items():
        print(f"member {name}: accuracy {acc:.4f}")
    summary = {k: m[k] for k in ("n", "accuracy", "macro_f1", "balanced_accuracy", "top2", "top3") if k in m}
    print("ensemble: " + json.dumps(summary))
    print("per class: " + json.dumps(m["per_class"]))


if __name__ == "__main__":
    run_stage(main)
