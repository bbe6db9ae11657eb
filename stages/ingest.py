"""Stage ingest: read a raw dataset, decode every image to size x size grayscale (or RGB), pack it.

Formats (params: dataset.format, dataset.path, dataset.root):
  folder       Kaggle layout <path>/<split>/<class>/<image> (split: train, val, validation, test,
               PublicTest, PrivateTest; png jpg jpeg bmp tif tiff gif webp)
  fer2013_csv  the original fer2013.csv (emotion, pixels, Usage)
  affectnet    AffectNet training.csv / validation.csv (face box cropped; option split val: validation),
               or the folder holding both (one manifest: splits train and val)
  listfile     LSTM-on-CNN list file: path label [label2 ...] seq_number (options sort, ignore_missing); or a
               folder with train.txt, val.txt [, test.txt]: one manifest, each list in its split
  guided_st    Guided-ST CSV emotion;path;in_set;fold (3-class polarity)
  raf_db       RAF-DB / Emotion SDK list `name label` (labels 1-7, split from the name; option aligned)
  ck_sequences CK+ frames/<sequence>/<frame>.png + labels.csv (options min_length, labels, frames)
  video        one video per sequence + a labels CSV (options every, max_frames, min_length, labels)
  ucf          class/video/frame folders, UCF-101 style: <class>/<video>/<frame>.png (option min_length)
Relative image paths of CSV/list formats are joined to root (default: the file's folder).

Writes one packed HDF5 (images uint8 [N,size,size], ids; attrs with the class list), the manifest
of kept rows (same order), the rejects table (every input not used, with the reason), count metrics
and a contact sheet (a row of samples per class). Nothing is written if the dataset cannot be read.
Params: ingest.size, ingest.workers (0 = every core), ingest.max_file_mb (larger image files are
rejected unread; 0 = no limit), ingest.color (gray | rgb: rgb keeps colour, images uint8
[N,size,size,3] in RGB order and attrs color=rgb; a gray image becomes three equal channels; the
sequence ingest passes --color-param '' and stays gray). The dataset comes from the params section --section (default
`dataset`; the sequence stages use `sequence.dataset`): format, path, root, and any option the
format's reader takes (split, sort, ignore_missing, min_length, every, max_frames, labels,
per_frame_labels, outside_root, ...). A reader option set with -S (-S dataset.split=val,
-S sequence.dataset.min_length=3) that the format does not take is an error; in params.yaml it is
ignored (one dataset section may serve several formats). Image paths of CSV/list formats must
resolve inside the root unless outside_root=true. A dataset that cannot be read at all is a
one-line error (exit 1).
dataset.face_crop (photos, not FER-style crops): the largest face of each image is found (the
recognizer's detector), aligned by its landmarks and framed like FER-2013 (dataset.face_margin > 1
keeps more around it); its box goes into the manifest and an image without a face into rejects.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it (python stages/ingest.py -S dataset.format=listfile -S dataset.path=train.txt -S ingest.size=96).
"""
from ferpipe.data.decode import COLORS
from ferpipe.data.ingest import run_ingest
from ferpipe.data.readers import READERS, reader_options
from ferpipe.params import add_set_option, keys_set_in, lookup, required, stage_params, whole_number
from ferpipe.stagecli import run_stage, stage_parser

DATASET_KEYS = ("format", "path", "root", "face_crop", "face_margin")  # the rest of the section: reader options


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--section", default="dataset", help="params section of the dataset (dotted, e.g. sequence.dataset)")
    add_set_option(p, "dataset.path=/abs/fer2013 -S ingest.size=96")
    p.add_argument("--out", default="data/ingest/images.h5", help="packed images (HDF5)")
    p.add_argument("--manifest", default="data/ingest/manifest.csv", help="manifest of kept rows (CSV)")
    p.add_argument("--rejects", default="data/ingest/rejects.csv", help="rejected inputs with reasons (CSV)")
    p.add_argument("--metrics", default="metrics/ingest.json", help="count metrics (JSON)")
    p.add_argument("--sheet", default="plots/sheets/ingest.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--color-param", default="ingest.color",
                   help="params key of the colour, gray | rgb ('' = gray: the sequence frames, whose CNN features "
                        "and models take gray)")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=(f"{a.section}.*", "ingest.size", "ingest.workers",
                                                     "ingest.max_file_mb", *([a.color_param] if a.color_param else [])))
    fmt = required(params, f"{a.section}.format", a.params)
    if fmt not in READERS:
        p.error(f"unknown dataset format {fmt!r}; known: {', '.join(sorted(READERS))}")
    ds, prm = lookup(params, a.section), params.get("ingest") or {}
    allowed = reader_options(fmt)
    for key in sorted(keys_set_in(a.set, a.section) - set(DATASET_KEYS) - set(allowed)):
        p.error(f"-S {a.section}.{key}: format {fmt} takes no {key} option (it takes: {', '.join(allowed) or 'none'})")
    options = {key: ds[key] for key in allowed if ds.get(key) is not None}  # params.yaml keys that do not apply: ignored
    size = whole_number(p, "ingest.size", prm.get("size", 48), 1)
    workers = whole_number(p, "ingest.workers", prm.get("workers", 0), 0, " (0 = every core)")
    max_mb = prm.get("max_file_mb", 0)
    if not isinstance(max_mb, (int, float)) or max_mb < 0:
        p.error(f"ingest.max_file_mb must be >= 0 (0 = no limit), got {max_mb!r}")
    color = lookup(params, a.color_param, "gray") if a.color_param else "gray"
    if color not in COLORS:
        p.error(f"{a.color_param} must be one of {', '.join(COLORS)}, got {color!r}")
    face_margin = ds.get("face_margin", 1.0)
    if not isinstance(face_margin, (int, float)) or face_margin <= 0:
        p.error(f"{a.section}.face_margin must be > 0, got {face_margin!r}")
    print(run_ingest(  # a dataset that cannot be read at all (DatasetError): one line, from run_stage
        fmt, required(params, f"{a.section}.path", a.params), ds.get("root", ""),
        a.out, a.manifest, a.rejects, a.metrics, a.sheet or None, size=size, workers=workers,
        options=options, progress=not a.quiet, max_file_mb=max_mb, face_crop=bool(ds.get("face_crop", False)),
        face_margin=float(face_margin), color=color))


if __name__ == "__main__":
    run_stage(main)
