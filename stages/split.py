"""Stage split: targets for the task, stratified k folds on the training rows, the test split kept apart.

params: task (classes | polarity | valence_arousal), split.folds, split.seed, split.test (the manifest
splits held out for the final test; never used for selection), split.dataset_folds (a dataset that
brings its own folds, Guided-ST's CSV, keeps them; false draws new ones). Drawn folds are
subject-independent when every training row has a subject. Writes data/split/split.csv (id, index into the packed arrays,
split, fold, target, target_name [, valence, arousal]) and metrics/split.json (classes, counts,
excluded rows with the reason).
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it (python stages/split.py -S task=polarity -S split.folds=5).
"""
from ferpipe.data.split import run_split
from ferpipe.params import add_set_option, lookup, required, stage_params, whole_number
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--manifest", default="data/ingest/manifest.csv")
    p.add_argument("--out", default="data/split/split.csv")
    p.add_argument("--summary", default="metrics/split.json")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "task=polarity -S split.folds=5")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("task", "split.folds", "split.seed", "split.test",
                                                     "split.dataset_folds"))
    need = lambda key: required(params, key, a.params)  # noqa: E731
    print(run_split(a.manifest, a.out, a.summary, task=need("task"),
                    folds=whole_number(p, "split.folds", need("split.folds"), 2), seed=need("split.seed"),
                    test=need("split.test"), dataset_folds=lookup(params, "split.dataset_folds", True)))


if __name__ == "__main__":
    run_stage(main)
