"""Stage landmarks: 68 face landmarks per image (params: landmarks.size, passes, workers, chunk).

Each image is resized to landmarks.size px; detector passes run in order until one finds a face
box (dlib HOG, dlib on the equalized image, dlib with a padded border, MTCNN, OpenCV Haar, dlib MMOD
CNN); dlib's 68-point predictor runs on that box. Where every pass fails the predictor runs on a fixed
box and the image is flagged (found=False, method=fallback). Writes landmarks.h5 (landmarks
[N,68,2] (x, y) as a share of the width/height, not clipped: points past the border fall slightly
outside [0, 1]; found, method, confidence, box, ids), metrics (share per method) and a contact sheet
with a row per method, as one output set.
"""
from ferpipe.faces.landmarks import PASSES, run_landmarks
from ferpipe.params import load_params
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/ingest/images.h5", help="normalized images (ingest output)")
    p.add_argument("--out", default="data/landmarks/landmarks.h5")
    p.add_argument("--metrics", default="metrics/landmarks.json")
    p.add_argument("--sheet", default="plots/sheets/landmarks.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--size", type=int, help="override landmarks.size")
    p.add_argument("--passes", nargs="+", choices=PASSES, help="override landmarks.passes")
    p.add_argument("--passes-param", default="landmarks.passes",
                   help="the param holding the passes (the sequence frames': sequence.landmarks_passes)")
    p.add_argument("--workers", type=int, help="override landmarks.workers (0 = every core)")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    prm = load_params(a.params, "landmarks")
    size = prm["size"] if a.size is None else a.size
    workers = prm["workers"] if a.workers is None else a.workers
    if not isinstance(size, int) or size < 1:
        p.error(f"size must be a whole number of pixels >= 1, got {size!r}")
    if not isinstance(workers, int) or workers < 0:
        p.error(f"workers must be >= 0 (0 = every core), got {workers!r}")
    passes = load_params(a.params)
    for key in a.passes_param.split("."):
        passes = passes[key]
    print(run_landmarks(a.images, a.out, a.metrics or None, a.sheet or None, size=size,
                        passes=a.passes if a.passes is not None else passes, workers=workers, chunk=prm["chunk"]))


if __name__ == "__main__":
    run_stage(main)
