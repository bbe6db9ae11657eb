"""Benchmark every preprocessing stage on a real dataset (default: all of ../shared/data/fer2013).

Runs each stage script by hand, as `dvc repro` would, into a scratch folder, and prints per stage:
wall time, images/s, and peak memory (RSS summed over the stage process and its workers, sampled
every 50 ms). Then the landmark shares per method. Usage:

    .venv/bin/python bench/preprocess.py [--data ../shared/data/fer2013] [--out /tmp/ferpipe-bench]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in MiB over its process tree)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [ps, *ps.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out = proc.stdout.read()
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out}")
    return time.perf_counter() - t0, peak / 2**20


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fer2013"))
    p.add_argument("--format", default="folder")
    p.add_argument("--out", default="/tmp/ferpipe-bench")
    p.add_argument("--workers", type=int, default=0, help="0 = every core")
    a = p.parse_args()
    out = Path(a.out)
    py = sys.executable
    stages = [
        ("ingest", [py, "stages/ingest.py", "-S", f"dataset.format={a.format}", "-S", f"dataset.path={a.data}",
                    "-S", f"ingest.workers={a.workers}",
                    "--out", f"{out}/ingest/images.h5", "--manifest", f"{out}/ingest/manifest.csv",
                    "--rejects", f"{out}/ingest/rejects.csv", "--metrics", f"{out}/ingest.json",
                    "--sheet", f"{out}/ingest.png", "--quiet"]),
        ("gray48", [py, "stages/gray48.py", "--images", f"{out}/ingest/images.h5", "--out", f"{out}/gray48.h5",
                    "--sheet", f"{out}/gray48.png"]),
        ("landmarks", [py, "stages/landmarks.py", "--images", f"{out}/ingest/images.h5",
                       "-S", f"landmarks.workers={a.workers}",
                       "--out", f"{out}/landmarks.h5", "--metrics", f"{out}/landmarks.json",
                       "--sheet", f"{out}/landmarks.png"]),
    ]
    for kind in ("landmarks", "soft", "dilation", "patches", "weighted", "saliency"):
        stages.append((f"guide_{kind}", [py, "stages/guide.py", kind, "--images", f"{out}/gray48.h5",
                                         "--landmarks", f"{out}/landmarks.h5", "--out", f"{out}/guides/{kind}.h5",
                                         "--sheet", f"{out}/guide_{kind}.png"]))
    stages.append(("split", [py, "stages/split.py", "--manifest", f"{out}/ingest/manifest.csv",
                             "--out", f"{out}/split.csv", "--summary", f"{out}/split.json"]))
    rows = []
    n = None
    for name, cmd in stages:
        wall, peak = run(cmd)
        if n is None:
            n = json.loads(Path(f"{out}/ingest.json").read_text())["images"]
        rows.append((name, wall, n / wall, peak))
        print(f"{name:18s} {wall:8.2f} s {n / wall:10.0f} img/s {peak:8.0f} MiB", flush=True)
    print(f"\n{n} images from {a.data}, {psutil.cpu_count()} cores")
    print("| stage | wall s | images/s | peak MiB |\n|---|---|---|---|")
    for name, wall, ips, peak in rows:
        print(f"| {name} | {wall:.1f} | {ips:,.0f} | {peak:,.0f} |")
    lm = json.loads(Path(f"{out}/landmarks.json").read_text())
    print("\nlandmarks: found", f"{lm['found_share']:.1%}", {k: f"{v:.1%}" for k, v in lm["share"].items()})


if __name__ == "__main__":
    main()
