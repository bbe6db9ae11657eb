"""Stage demo: generate the demo dataset, so the pipeline runs on a fresh machine with no data.

Writes <out>/{train,test}/<class>/<n>_<identity>.png (the Kaggle FER-2013 folder layout; grayscale,
size x size; classes neutral, happy, sad, surprise, angry) and <out>/README.txt, replacing any old
<out> atomically, plus a metrics JSON (images per split/class, identities used, the share of images
in which dlib's HOG detector finds a face).

The faces are made from images that ship with scikit-image (astronaut, lfw_subset): landmark-driven
expression warps plus random pose/photometric jitter. Nothing is downloaded; the same params give
byte-identical files. Params: demo.seed, demo.train_per_class, demo.test_per_class, demo.size.

With --sequences it writes demo expression sequences instead, in the CK+ layout the sequence stages
read (<out>/frames/<sequence>/<sequence>_<frame>.png + <out>/labels.csv): the same faces going from
neutral to the apex of happy, sad, surprise or angry. Params: demo.seed, demo.size,
demo.sequences.per_class, demo.sequences.frames.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it (python stages/demo.py --sequences -S demo.sequences.frames=5).
"""
import json

from ferpipe.data.demo import make_demo, make_demo_sequences
from ferpipe.params import add_set_option, required, stage_params, whole_number
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--out", help="output folder, replaced as a whole (default data/demo, with --sequences "
                                 "data/demo_sequences)")
    p.add_argument("--metrics", help="metrics JSON ('' for none; default metrics/demo.json, with --sequences "
                                     "metrics/demo_sequences.json)")
    p.add_argument("--sequences", action="store_true", help="write the demo sequences (CK+ layout) instead")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "demo.seed=1")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    keys = ("seed", "size") + (("sequences.per_class", "sequences.frames") if a.sequences else
                               ("train_per_class", "test_per_class"))
    params = stage_params(p, a.params, a.set, reads=tuple(f"demo.{key}" for key in keys))
    # whole numbers here; their ranges (a face needs 16 px, a sequence 2 frames) are the library's
    prm = {key.rpartition(".")[2]: whole_number(p, f"demo.{key}", required(params, f"demo.{key}", a.params), 0)
           for key in keys}
    try:
        result = _generate(a, prm)
    except ValueError as e:  # sizes and counts out of range: a usage error, not a traceback
        p.error(str(e))
    print(json.dumps(result, indent=1))


def _generate(a, prm: dict) -> dict:
    """The image demo, or with --sequences the demo sequences."""
    metrics = lambda default: default if a.metrics is None else a.metrics or None  # noqa: E731
    if a.sequences:
        return make_demo_sequences(a.out or "data/demo_sequences", **prm,
                                   metrics_path=metrics("metrics/demo_sequences.json"))
    return make_demo(a.out or "data/demo", **prm, metrics_path=metrics("metrics/demo.json"))


if __name__ == "__main__":
    run_stage(main)
