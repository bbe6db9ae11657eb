"""Stage landmarks: 68 face landmarks per image (params: landmarks.size, passes, workers, chunk).

Each image is resized to landmarks.size px; detector passes run in order until one finds a face
box (dlib HOG, dlib on the equalized image, dlib with a padded border, MTCNN, OpenCV Haar, dlib MMOD
CNN); dlib's 68-point predictor runs on that box. Where every pass fails the predictor runs on a fixed
box and the image is flagged (found=False, method=fallback). Writes landmarks.h5 (landmarks
[N,68,2] (x, y) as a share of the width/height, not clipped: points past the border fall slightly
outside [0, 1]; found, method, confidence, box, ids), metrics (share per method) and a contact sheet
with a row per method, as one output set.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it (python stages/landmarks.py -S 'landmarks.passes=[dlib, haar]' -S landmarks.workers=1).
"""
from ferpipe.faces.landmarks import PASSES, run_landmarks
from ferpipe.params import add_set_option, required, stage_params, whole_number
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/ingest/images.h5", help="normalized images (ingest output)")
    p.add_argument("--out", default="data/landmarks/landmarks.h5")
    p.add_argument("--metrics", default="metrics/landmarks.json")
    p.add_argument("--sheet", default="plots/sheets/landmarks.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--passes-param", default="landmarks.passes",
                   help="the param holding the passes (the sequence frames': sequence.landmarks_passes)")
    add_set_option(p, "'landmarks.passes=[dlib, haar]'")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("landmarks.size", "landmarks.workers", "landmarks.chunk",
                                                     a.passes_param))
    size = whole_number(p, "landmarks.size", required(params, "landmarks.size", a.params), 1)
    workers = whole_number(p, "landmarks.workers", required(params, "landmarks.workers", a.params), 0,
                           " (0 = every core)")
    passes = required(params, a.passes_param, a.params)
    if not isinstance(passes, list) or not set(passes) <= set(PASSES):  # [] = no detection (the recipes without guides)
        p.error(f"{a.passes_param} must be a list of passes from {', '.join(PASSES)}, got {passes!r}")
    print(run_landmarks(a.images, a.out, a.metrics or None, a.sheet or None, size=size, passes=passes, workers=workers,
                        chunk=required(params, "landmarks.chunk", a.params)))


if __name__ == "__main__":
    run_stage(main)
