"""Stage features: frames -> HDF5 in the LSTM-on-CNN layout (outputs [N,C,H,W], label, seq_number, ...).

Mode cnn runs a trained CNN checkpoint (by default the FER-2013 model bundled with ferpipe; or the
training stage's .pt, or its models folder) over every frame in large batches
and dumps one layer (--layer: a module name such as fc1, classifier.fc1, dropout, layer4; "flatten" =
the input of the first Linear layer; "logits"); a vector layer is stored as [N, D, 1, 1]. Instead of a
checkpoint, --backbone resnet18 --weights FILE builds a torchvision backbone from a local weights file.
The checkpoint may be the training stage's models folder: its final.pt, else the best-validation fold model.
Mode images writes the frames themselves, resized to --size, scaled to [0, 1] and mean-subtracted.
Guided models (STN on a guide map) and collage models (patches, weighted) see their map or collage
of every frame, made here from --landmarks (the landmarks stage's output for these frames) with the
params.yaml `guides` section, as the guide stages make them for still images; or pass --guide.

Standardization (--standardize, default on): outputs = (raw - mean) / std, per element, with mean and
std stored in the file; a test file reuses a training file's statistics and class list with
--stats-from TRAIN_FEATURES.h5. Regression labels (valence/arousal) get label_mean/label_std.

Defaults come from params.yaml `sequence.features` when that section exists; every value can be given
on the command line instead.
"""
from ferpipe.params import params_section
from ferpipe.sequences.features import MODES, run_features
from ferpipe.stagecli import run_stage, stage_parser

# the params.yaml sequence.features keys (defaults where params.yaml has no such section: conf/config.yaml's values)
PARAMS = {"mode": "cnn", "checkpoint": "src/ferpipe/weights/fer2013_vgg7.pt", "layer": "flatten", "batch_size": 1024,
          "standardize": True, "size": 48}
CLI_ONLY = ("backbone", "weights", "stats_from", "guide", "landmarks")  # command-line options, never params
DEFAULTS = {**PARAMS, **{k: "" for k in CLI_ONLY}}


def _from_params(key: str) -> str:
    return f"default: params.yaml sequence.features.{key}, else {DEFAULTS[key]!r}"


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/sequences/gray48/images.h5", help="packed frames (gray48 output)")
    p.add_argument("--manifest", default="data/sequences/ingest/manifest.csv",
                   help="manifest of those frames (ingest output: sequence_id, frame_index, subject)")
    p.add_argument("--out", default="data/sequences/features.h5", help="features HDF5")
    p.add_argument("--metrics", default="metrics/features.json", help="counts and images/s (JSON, '' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--mode", choices=MODES, help=f"cnn | images ({_from_params('mode')})")
    p.add_argument("--checkpoint", help=f"CNN checkpoint (.pt, or the train stage's models folder) "
                                        f"({_from_params('checkpoint')})")
    p.add_argument("--backbone", help="registry backbone instead of a checkpoint (e.g. resnet18)")
    p.add_argument("--weights", help="weights file for --backbone")
    p.add_argument("--layer", help=f"layer to dump: flatten | fc1 | logits | a module name ({_from_params('layer')})")
    p.add_argument("--batch-size", type=int, help=f"frames per forward pass, halved automatically on "
                                                  f"out-of-memory ({_from_params('batch_size')})")
    p.add_argument("--guide", help="guide maps HDF5 for guided models (default: made from --landmarks)")
    p.add_argument("--landmarks", help="landmarks HDF5 of these frames (for guided and collage models)")
    p.add_argument("--standardize", dest="standardize", action="store_true", default=None,
                   help=f"store standardized features ({_from_params('standardize')})")
    p.add_argument("--no-standardize", dest="standardize", action="store_false")
    p.add_argument("--stats-from", help="reuse mean/std (and classes) of this features file (test files)")
    p.add_argument("--size", type=int, help=f"images mode: frame size ({_from_params('size')})")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    section = params_section(a.params, "sequence.features") or {}
    unknown = sorted(set(section) - set(PARAMS))
    if unknown:
        p.error(f"unknown sequence.features params {unknown}; known: {sorted(PARAMS)}")
    prm = {**DEFAULTS, **section}
    val = {k: getattr(a, k) if getattr(a, k) is not None else prm[k] for k in DEFAULTS}
    if val["mode"] == "cnn" and not (val["checkpoint"] or val["backbone"]):
        p.error("mode cnn needs --checkpoint (or --backbone with --weights)")
    result = run_features(a.images, a.manifest, a.out, mode=val["mode"], checkpoint=val["checkpoint"] or None,
                          backbone=val["backbone"] or None, weights=val["weights"] or None, layer=val["layer"],
                          batch_size=int(val["batch_size"]), guide_h5=val["guide"] or None,
                          standardize=bool(val["standardize"]), stats_from=val["stats_from"] or None,
                          size=int(val["size"]), metrics_path=a.metrics or None,
                          landmarks_h5=val["landmarks"] or None, guide_params=params_section(a.params, "guides"))
    print(result)


if __name__ == "__main__":
    run_stage(main)
