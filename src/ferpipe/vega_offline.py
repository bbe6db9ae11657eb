"""An HTML template that makes `dvc plots show` work offline.

DVC's page loads vega, vega-lite and vega-embed from a CDN (cdn.jsdelivr.net), so without a network
its Vega plots are empty boxes. This writes a template (DVC's `plots.html_template`) with the same
three scripts inlined, taken from the npm packages; setup.sh fetches them once with
`npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2` (the versions DVC's page asks for) and sets
the template in .dvc/config.local. The template has no `{scripts}` placeholder, so DVC adds no CDN
link; `{plot_divs}` and `{refresh_tag}` are DVC's own placeholders.

    python -m ferpipe.vega_offline vega-5.20.2.tgz vega-lite-5.2.0.tgz vega-embed-6.18.2.tgz --out FILE
"""
from __future__ import annotations

import argparse
import json
import os
import tarfile
from pathlib import Path

PACKAGES = ("vega", "vega-lite", "vega-embed")  # load order: vega-embed needs the other two
PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}", "{scripts}")

PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <title>DVC Plot</title>
    <!-- vega, vega-lite, vega-embed inlined from their npm packages (ferpipe.vega_offline): no network needed -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def browser_bundle(tgz: str | os.PathLike) -> tuple[str, str, str]:
    """(package name, version, the minified browser build) of an `npm pack` tarball."""
    with tarfile.open(tgz, "r:gz") as tar:
        meta = json.load(tar.extractfile("package/package.json"))
        entry = meta.get("jsdelivr") or meta.get("unpkg")
        if not entry:
            raise ValueError(f"{tgz}: package.json names no browser build (jsdelivr / unpkg)")
        member = "package/" + entry.removeprefix("./")
        try:
            code = tar.extractfile(member).read().decode("utf-8")
        except KeyError:
            raise ValueError(f"{tgz}: {member} is not in the package") from None
    return meta["name"], meta["version"], code


def template(tarballs: list[str | os.PathLike]) -> str:
    """The template's text, the scripts in PACKAGES order."""
    found = {}
    for tgz in tarballs:
        name, version, code = browser_bundle(tgz)
        found[name] = (version, code)
    missing = [p for p in PACKAGES if p not in found]
    if missing:
        raise ValueError(f"missing package(s) {missing}: give the npm pack tarballs of {', '.join(PACKAGES)}")
    scripts = []
    for name in PACKAGES:
        version, code = found[name]
        if any(p in code for p in PLACEHOLDERS):
            raise ValueError(f"{name} {version} contains a DVC template placeholder; cannot inline it")
        code = code.replace("</script", "<\\/script")
        scripts.append(f"    <script>/* {name} {version} */\n{code}\n    </script>")
    return PAGE % "\n".join(scripts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m ferpipe.vega_offline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tarballs", nargs="+", help="npm pack tarballs of vega, vega-lite and vega-embed")
    p.add_argument("--out", required=True, help="template HTML to write")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(template(a.tarballs), encoding="utf-8")
    tmp.replace(out)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
