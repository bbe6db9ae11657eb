"""Stage gray48: resize the normalized images to size x size grayscale (params: gray48.size).

Reads the ingest artifact, writes one packed HDF5 (images uint8 [N,size,size], ids) and a contact sheet.
"""
from ferpipe.data.gray import run_gray
from ferpipe.params import load_params
from ferpipe.stagecli import run_stage, stage_parser


def parser():
    p = stage_parser(__doc__)
    p.add_argument("--images", default="data/ingest/images.h5", help="normalized images (ingest output)")
    p.add_argument("--out", default="data/gray48/images.h5", help="packed output")
    p.add_argument("--sheet", default="plots/sheets/gray48.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--size", type=int, help="override gray48.size")
    return p


def main(argv=None):
    a = parser().parse_args(argv)
    prm = load_params(a.params, "gray48")
    print(run_gray(a.images, a.out, a.sheet or None, size=a.size or prm["size"]))


if __name__ == "__main__":
    run_stage(main)
