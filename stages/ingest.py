"""Stage ingest: read a raw dataset, decode every image to size x size grayscale, pack it.

Formats (params: dataset.format, dataset.path, dataset.root):
  folder       Kaggle layout <path>/<split>/<class>/<image> (split: train, val, validation, test,
               PublicTest, PrivateTest; png jpg jpeg bmp tif tiff gif webp)
  fer2013_csv  the original fer2013.csv (emotion, pixels, Usage)
  affectnet    AffectNet training.csv / validation.csv (face box cropped; --split val for validation),
               or the folder holding both (one manifest: splits train and val)
  listfile     LSTM-on-CNN list file: path label [label2 ...] seq_number (--sort, --ignore-missing); or a
               folder with train.txt, val.txt [, test.txt]: one manifest, each list in its split
  guided_st    Guided-ST CSV emotion;path;in_set;fold (3-class polarity)
  raf_db       RAF-DB / Emotion SDK list `name label` (labels 1-7, split from the name; option aligned)
  ck_sequences CK+ frames/<sequence>/<frame>.png + labels.csv (options min_length, labels, frames)
  video        one video per sequence + a labels CSV (options every, max_frames, min_length, labels)
  ucf          class/video/frame folders, UCF-101 style: <class>/<video>/<frame>.png (option min_length)
Relative image paths of CSV/list formats are joined to --root (default: the file's folder).

Writes one packed HDF5 (images uint8 [N,size,size], ids; attrs with the class list), the manifest
of kept rows (same order), the rejects table (every input not used, with the reason), count metrics
and a contact sheet (a row of samples per class). Nothing is written if the dataset cannot be read.
Params: ingest.size, ingest.workers (0 = every core), ingest.max_file_mb (larger image files are
rejected unread; 0 = no limit). The dataset comes from the params section
--section (default `dataset`; the sequence stages use `sequence.dataset`): format, path, root, and
any option the format's reader takes (split, sort, ignore_missing, min_length, every, max_frames,
labels, per_frame_labels, outside_root, ...). -O KEY=VALUE sets a reader option on the command
line; a key the format does not take is an error there and ignored in params (one dataset section
may serve several formats). Image paths of CSV/list formats must resolve inside the root unless
outside_root=true. A dataset that cannot be read at all is a one-line error (exit 1).
dataset.face_crop (photos, not FER-style crops): the largest face of each image is found (the
recognizer's detector), aligned by its landmarks and framed like FER-2013 (dataset.face_margin > 1
keeps more around it); its box goes into the manifest and an image without a face into rejects.
"""
from ferpipe.data.ingest import run_ingest
from ferpipe.data.readers import READERS, reader_options
from ferpipe.params import add_override_option, load_params, overridden, params_section
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--section", default="dataset", help="params section of the dataset (dotted, e.g. sequence.dataset)")
    p.add_argument("--format", choices=sorted(READERS), help="override dataset.format")
    p.add_argument("--path", help="override dataset.path (a folder, CSV or list file)")
    p.add_argument("--root", help="override dataset.root (image root of CSV/list formats)")
    p.add_argument("--split", help="split of every row (affectnet, listfile; default train)")
    p.add_argument("--sort", action="store_true", default=None,
                   help="listfile: order by (seq_number, path) and renumber sequences")
    p.add_argument("--ignore-missing", action="store_true", default=None,
                   help="listfile: list absent images as rejects instead of failing")
    add_override_option(p, "reader option", "min_length=3", flag="-O", dest="option")
    p.add_argument("--size", type=int, help="override ingest.size")
    p.add_argument("--workers", type=int, help="override ingest.workers (0 = every core)")
    p.add_argument("--face-crop", action="store_true", default=None,
                   help="override dataset.face_crop: find, align and crop the largest face of each photo")
    p.add_argument("--face-margin", type=float, help="override dataset.face_margin (1 = FER-2013's framing)")
    p.add_argument("--out", default="data/ingest/images.h5", help="packed images (HDF5)")
    p.add_argument("--manifest", default="data/ingest/manifest.csv", help="manifest of kept rows (CSV)")
    p.add_argument("--rejects", default="data/ingest/rejects.csv", help="rejected inputs with reasons (CSV)")
    p.add_argument("--metrics", default="metrics/ingest.json", help="count metrics (JSON)")
    p.add_argument("--sheet", default="plots/sheets/ingest.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)

    prm = load_params(a.params).get("ingest") or {}  # also: a missing params file is an error here
    ds = params_section(a.params, a.section)
    if ds is None:
        p.error(f"{a.params}: no section {a.section}")
    fmt = a.format or ds.get("format")
    if fmt not in READERS:
        p.error(f"unknown dataset format {fmt!r}; known: {', '.join(sorted(READERS))}")
    allowed = reader_options(fmt)
    options = {key: ds[key] for key in allowed if ds.get(key) is not None}  # keys that do not apply: ignored
    cli = {key: getattr(a, key) for key in ("split", "sort", "ignore_missing") if getattr(a, key) is not None}
    cli = overridden(p, cli, a.option)
    for key, value in cli.items():
        if key not in allowed:
            p.error(f"format {fmt} takes no {key} option (it takes: {', '.join(allowed) or 'none'})")
        options[key] = value
    size = a.size if a.size is not None else prm.get("size", 48)
    workers = a.workers if a.workers is not None else prm.get("workers", 0)
    max_mb = prm.get("max_file_mb", 0)
    if not isinstance(size, int) or size < 1:
        p.error(f"size must be a whole number of pixels >= 1, got {size!r}")
    if not isinstance(workers, int) or workers < 0:
        p.error(f"workers must be >= 0 (0 = every core), got {workers!r}")
    if not isinstance(max_mb, (int, float)) or max_mb < 0:
        p.error(f"ingest.max_file_mb must be >= 0 (0 = no limit), got {max_mb!r}")
    face_crop = bool(a.face_crop if a.face_crop is not None else ds.get("face_crop", False))
    face_margin = a.face_margin if a.face_margin is not None else ds.get("face_margin", 1.0)
    if not isinstance(face_margin, (int, float)) or face_margin <= 0:
        p.error(f"face_margin must be > 0, got {face_margin!r}")
    print(run_ingest(  # a dataset that cannot be read at all (DatasetError): one line, from run_stage
        fmt, a.path or ds["path"], a.root if a.root is not None else ds.get("root", ""),
        a.out, a.manifest, a.rejects, a.metrics, a.sheet or None, size=size, workers=workers,
        options=options, progress=not a.quiet, max_file_mb=max_mb, face_crop=face_crop,
        face_margin=float(face_margin)))


if __name__ == "__main__":
    run_stage(main)
