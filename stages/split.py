"""Stage split: targets for the task, stratified k folds on the training rows, the test split kept apart.

params: task (classes | polarity | valence_arousal), split.folds, split.seed, split.test (the manifest
splits held out for the final test; never used for selection), split.dataset_folds (a dataset that
brings its own folds, Guided-ST's CSV, keeps them; false draws new ones). Drawn folds are
subject-independent when every training row has a subject. Writes data/split/split.csv (id, index into the packed arrays,
split, fold, target, target_name [, valence, arousal]) and metrics/split.json (classes, counts,
excluded rows with the reason).
"""
from ferpipe.data.split import TASKS, run_split
from ferpipe.params import load_params
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--manifest", default="data/ingest/manifest.csv")
    p.add_argument("--out", default="data/split/split.csv")
    p.add_argument("--summary", default="metrics/split.json")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--task", choices=TASKS, help="override the top-level task")
    p.add_argument("--folds", type=int, help="override split.folds")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    params = load_params(a.params)
    prm = params["split"]
    print(run_split(a.manifest, a.out, a.summary, task=a.task or params["task"], folds=a.folds or prm["folds"],
                    seed=prm["seed"], test=prm["test"], dataset_folds=prm.get("dataset_folds", True)))


if __name__ == "__main__":
    run_stage(main)
