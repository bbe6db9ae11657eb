"""Stage features: frames -> HDF5 in the LSTM-on-CNN layout (outputs [N,C,H,W], label, seq_number, ...).

Mode cnn runs a trained CNN checkpoint (by default the FER-2013 model bundled with ferpipe; or the
training stage's .pt, or its models folder: its final.pt, else the best-validation fold model) over
every frame in large batches and dumps one layer (layer: a module name such as fc1, classifier.fc1,
dropout, layer4; "flatten" = the input of the first Linear layer; "logits"); a vector layer is stored
as [N, D, 1, 1]. Instead of a checkpoint, --backbone resnet18 --weights FILE builds a torchvision
backbone from a local weights file. Mode images writes the frames themselves, resized to `size`,
scaled to [0, 1] and mean-subtracted. Guided models (STN on a guide map) and collage models (patches,
weighted) see their map or collage of every frame, made here from --landmarks (the landmarks stage's
output for these frames) with the params.yaml `guides` section, as the guide stages make them for
still images; or pass --guide.

Standardization (standardize, default on): outputs = (raw - mean) / std, per element, with mean and
std stored in the file; a test file reuses a training file's statistics and class list with
--stats-from TRAIN_FEATURES.h5. Regression labels (valence/arousal) get label_mean/label_std.

Settings come from params.yaml `sequence.features` (mode, checkpoint, layer, batch_size, standardize, size)
and `guides`. Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as
`dvc exp run -S` takes it (python stages/features.py -S sequence.features.mode=images -S sequence.features.size=32).
"""
from ferpipe.params import add_set_option, lookup, stage_params
from ferpipe.sequences.features import DEFAULTS, run_features
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/sequences/gray48/images.h5", help="packed frames (gray48 output)")
    p.add_argument("--manifest", default="data/sequences/ingest/manifest.csv",
                   help="manifest of those frames (ingest output: sequence_id, frame_index, subject)")
    p.add_argument("--out", default="data/sequences/features.h5", help="features HDF5")
    p.add_argument("--metrics", default="metrics/features.json", help="counts and images/s (JSON, '' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "sequence.features.layer=fc1")
    p.add_argument("--backbone", help="registry backbone instead of a checkpoint (e.g. resnet18), with --weights")
    p.add_argument("--weights", help="weights file for --backbone")
    p.add_argument("--guide", help="guide maps HDF5 for guided models (default: made from --landmarks)")
    p.add_argument("--landmarks", help="landmarks HDF5 of these frames (for guided and collage models)")
    p.add_argument("--stats-from", help="reuse mean/std (and classes) of this features file (test files)")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("sequence.features.*", "guides.*"))
    section = lookup(params, "sequence.features") or {}
    unknown = sorted(set(section) - set(DEFAULTS))
    if unknown:
        p.error(f"unknown sequence.features params {unknown}; known: {sorted(DEFAULTS)}")
    prm = {**DEFAULTS, **section}
    if prm["mode"] == "cnn" and not (prm["checkpoint"] or a.backbone):
        p.error("mode cnn needs a checkpoint (-S sequence.features.checkpoint=FILE) or --backbone with --weights")
    result = run_features(a.images, a.manifest, a.out, mode=prm["mode"],
                          checkpoint=None if a.backbone else prm["checkpoint"] or None,
                          backbone=a.backbone or None, weights=a.weights or None, layer=prm["layer"],
                          batch_size=int(prm["batch_size"]), guide_h5=a.guide or None,
                          standardize=bool(prm["standardize"]), stats_from=a.stats_from or None,
                          size=int(prm["size"]), metrics_path=a.metrics or None,
                          landmarks_h5=a.landmarks or None, guide_params=lookup(params, "guides"))
    print(result)


if __name__ == "__main__":
    run_stage(main)
