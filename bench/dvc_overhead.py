"""DVC overhead on the real FER-2013 pipeline (preprocessing stages).

Copies the project to a scratch folder, points `dataset.path` at the real data, then measures:
`dvc repro` wall time; the same stage commands run directly (no DVC) in DAG order; the no-op
`dvc repro` and `dvc status` on the finished pipeline (median of 3). Usage:

    .venv/bin/python bench/dvc_overhead.py [--data ../shared/data/fer2013] [--out /tmp/ferpipe-dvc]
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def sh(cmd, cwd, env) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, shell=isinstance(cmd, str), capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fer2013"))
    p.add_argument("--out", default="/tmp/ferpipe-dvc")
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, out / rel)
    (out / "dvc.lock").unlink()
    env = {**os.environ, "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}
    params = yaml.safe_load((out / "params.yaml").read_text())
    params["dataset"].update(format="folder", path=str(Path(a.data).resolve()))
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for c in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "-c", "user.name=b", "-c", "user.email=b@b",
                                                          "commit", "-qm", "bench"]):
        sh(c, out, env)
    stages = ["ingest", "gray48", "landmarks", "guide_landmarks", "guide_soft", "guide_dilation", "guide_patches",
              "guide_weighted", "guide_saliency", "split"]
    t_repro = sh(["dvc", "repro", *stages], out, env)
    cmds = yaml.safe_load((out / "dvc.yaml").read_text())["stages"]
    t_direct = sum(sh(cmds[s]["cmd"], out, env) for s in stages)
    noop = [sh(["dvc", "repro", *stages], out, env) for _ in range(3)]
    status = [sh(["dvc", "status"], out, env) for _ in range(3)]
    print(f"data: {a.data}")
    print("| measure | seconds |\n|---|---|")
    print(f"| dvc repro (preprocessing, from scratch) | {t_repro:.1f} |")
    print(f"| same stage commands run directly | {t_direct:.1f} |")
    print(f"| DVC overhead (hashing, caching, lock) | {t_repro - t_direct:.1f} |")
    print(f"| dvc repro with nothing to do (median of 3) | {statistics.median(noop):.2f} |")
    print(f"| dvc status on the finished pipeline (median of 3) | {statistics.median(status):.2f} |")


if __name__ == "__main__":
    main()
