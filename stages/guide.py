"""Stage guide_<kind>: one Guided-ST guide map per image from gray48 + landmarks (params: guides.<kind>).

Reads the gray48 images and the 68-point landmarks (same ids, same order), writes one packed HDF5
(images uint8 [N,S,S] = the guide map or collage, ids, found) and a contact sheet (faces with their
landmarks, red where found=False, above their guide maps). dvc.yaml has one stage per kind,
guide_<kind>: `python stages/guide.py <kind>` (each lists only its own guides.<kind> params).
Command line: the kind and paths, plus -S KEY=VALUE with the full params.yaml key for this run only, as
`dvc exp run -S` takes it (python stages/guide.py soft -S guides.soft.mode=gaussian).
"""
import textwrap

from ferpipe.guides.maps import DEFAULT_PARAMS, GUIDE_KINDS, KIND_HELP, run_guide
from ferpipe.params import add_set_option, lookup, stage_params
from ferpipe.stagecli import run_stage, stage_parser


def _epilog() -> str:
    lines = ["kinds (params in params.yaml guides.<kind>, defaults shown):"]
    for kind in GUIDE_KINDS:
        prm = ", ".join(f"{k}={v}" for k, v in DEFAULT_PARAMS[kind].items())
        text = textwrap.wrap(KIND_HELP[kind], 86) + [f"params: {prm}"]
        lines += [f"  {kind if j == 0 else '':<10} {t}" for j, t in enumerate(text)]
    return "\n".join(lines)


def parser():
    p = stage_parser(__doc__, epilog=_epilog())
    p.add_argument("kind", nargs="?", choices=GUIDE_KINDS, help="the guide kind (or --kind)")
    p.add_argument("--kind", dest="kind_opt", choices=GUIDE_KINDS, help="the guide kind")
    p.add_argument("--images", default="data/gray48/images.h5", help="gray48 images")
    p.add_argument("--landmarks", default="data/landmarks/landmarks.h5", help="landmarks stage output")
    p.add_argument("--out", help="packed output (default data/guides/<kind>.h5)")
    p.add_argument("--sheet", help="contact sheet PNG (default plots/sheets/guide_<kind>.png; '' for none)")
    p.add_argument("--params", default="params.yaml", help="params file")
    add_set_option(p, "guides.soft.mode=gaussian")
    return p


def main(argv=None):
    p = parser()
    a = p.parse_args(argv)
    if a.kind and a.kind_opt and a.kind != a.kind_opt:
        p.error(f"two different kinds given: {a.kind} and --kind {a.kind_opt}")
    kind = a.kind or a.kind_opt
    if not kind:
        p.error(f"give a kind, one of {', '.join(GUIDE_KINDS)}")
    params = stage_params(p, a.params, a.set, reads=(f"guides.{kind}.*",))
    prm = lookup(params, f"guides.{kind}") or {}  # none: the kind's defaults
    out = a.out or f"data/guides/{kind}.h5"
    sheet = f"plots/sheets/guide_{kind}.png" if a.sheet is None else (a.sheet or None)
    print(run_guide(kind, a.images, a.landmarks, out, sheet, **prm))


if __name__ == "__main__":
    run_stage(main)
