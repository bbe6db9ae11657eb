"""Stage gray48: resize the normalized images to size x size grayscale (params: gray48.size).

Reads the ingest artifact, writes one packed HDF5 (images uint8 [N,size,size], ids) and a contact sheet.
"""
import argparse

from ferpipe.data.gray import run_gray
from ferpipe.params import load_params


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", default="data/ingest/images.h5", help="normalized images (ingest output)")
    p.add_argument("--out", default="data/gray48/images.h5", help="packed output")
    p.add_argument("--sheet", default="plots/sheets/gray48.png", help="contact sheet PNG ('' for none)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--size", type=int, help="override gray48.size")
    a = p.parse_args(argv)
    prm = load_params(a.params, "gray48")
    print(run_gray(a.images, a.out, a.sheet or None, size=a.size or prm["size"]))


if __name__ == "__main__":
    main()
