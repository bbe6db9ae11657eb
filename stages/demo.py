"""Stage demo: generate the demo dataset, so the pipeline runs on a fresh machine with no data.

Writes <out>/{train,test}/<class>/<n>_<identity>.png (the Kaggle FER-2013 folder layout; grayscale,
size x size; classes neutral, happy, sad, surprise, angry) and <out>/README.txt, replacing any old
<out> atomically, plus a metrics JSON (images per split/class, identities used, the share of images
in which dlib's HOG detector finds a face).

The faces are made from images that ship with scikit-image (astronaut, lfw_subset): landmark-driven
expression warps plus random pose/photometric jitter. Nothing is downloaded; the same params give
byte-identical files. Params: demo.seed, demo.train_per_class, demo.test_per_class, demo.size.
"""
import argparse
import json

from ferpipe.data.demo import make_demo
from ferpipe.params import load_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="data/demo", help="output folder (replaced as a whole)")
    p.add_argument("--metrics", default="metrics/demo.json", help="metrics JSON ('' for none)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--seed", type=int, help="override demo.seed")
    p.add_argument("--train-per-class", type=int, help="override demo.train_per_class")
    p.add_argument("--test-per-class", type=int, help="override demo.test_per_class")
    p.add_argument("--size", type=int, help="override demo.size (image side in pixels)")
    a = p.parse_args(argv)
    prm = load_params(a.params, "demo")
    pick = lambda cli, key: prm[key] if cli is None else cli  # noqa: E731  (0 is a valid override)
    result = make_demo(a.out, seed=pick(a.seed, "seed"), train_per_class=pick(a.train_per_class, "train_per_class"),
                       test_per_class=pick(a.test_per_class, "test_per_class"), size=pick(a.size, "size"),
                       metrics_path=a.metrics or None)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
