"""Stage gray48: resize the normalized images to size x size grayscale (params: gray48.size).

Gray unless ingest.color=rgb: RGB images stay RGB (uint8 [N,size,size,3], each channel resized alike).
Reads the ingest artifact, writes one packed HDF5 (images uint8 [N,size,size], ids) and a contact sheet.
Command line: paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as `dvc exp run -S`
takes it (python stages/gray48.py -S gray48.size=64).
"""
from ferpipe.data.gray import run_gray
from ferpipe.params import add_set_option, required, stage_params, whole_number
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/ingest/images.h5", help="normalized images (ingest output)")
    p.add_argument("--out", default="data/gray48/images.h5", help="packed output")
    p.add_argument("--sheet", default="plots/sheets/gray48.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "gray48.size=64")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    params = stage_params(p, a.params, a.set, reads=("gray48.size",))
    size = whole_number(p, "gray48.size", required(params, "gray48.size", a.params), 1)
    print(run_gray(a.images, a.out, a.sheet or None, size=size))


if __name__ == "__main__":
    run_stage(main)
