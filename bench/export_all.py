"""Export every registry model to ONNX and check it with onnxruntime on real FER-2013 faces.

tests/test_recognize.py checks every model but the three largest (vgg19, vgg19_bn, resnet152:
0.2-0.6 GB per file) on each run; this script checks them all and prints the table in the README.
Each model has its initial (seeded) weights with BatchNorm statistics from the faces themselves: what is
checked is the export of its operations, on graded (not saturated) probabilities.

    .venv/bin/python bench/export_all.py [--data ../shared/data/fer2013] [--only vgg19 resnet152]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_recognize import FER7, calibrate, real_pixels  # noqa: E402  (the tests' real-face pixels)

from ferpipe.export import ExportError, export_model  # noqa: E402
from ferpipe.models import MODEL_NAMES, MODEL_SPECS, build_model, count_params  # noqa: E402
from ferpipe.models.checkpoint import save_checkpoint  # noqa: E402
from ferpipe.models.inputs import InputSpec  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/fer2013")
    p.add_argument("--only", nargs="*")
    a = p.parse_args()
    print("| model | parameters | input | max abs probability difference (onnxruntime vs PyTorch) | export s |")
    print("|---|---|---|---|---|")
    for name in a.only or MODEL_NAMES:
        spec = MODEL_SPECS[name]
        channels = 1 + (spec["guide"] is not None)
        size = spec["in_size"] if name != "rmn" else 96
        torch.manual_seed(0)
        model = build_model(name, 7, **({"in_size": size} if name == "rmn" else {})).eval()
        input_spec = InputSpec(image=spec["image"], guide=spec["guide"], size=size, mean=[0.5] * channels,
                               std=[0.25] * channels)
        pixels = real_pixels(a.data, input_spec)
        calibrate(model, pixels, input_spec)
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(f"{d}/m.pt", model, name, FER7, {"in_size": size} if name == "rmn" else {},
                            {"input": input_spec.to_dict()})
            t = time.perf_counter()
            try:
                r = export_model(f"{d}/m.pt", "onnx", f"{d}/m.onnx", check=pixels, tolerance=1.0)
                diff = f"{r['max_abs_diff']:.1e}" + ("" if r["max_abs_diff"] < 1e-4 else " (over 1e-4)")
            except ExportError as e:
                diff = f"not exported: {e}"
            print(f"| {name} | {count_params(model):,} | {channels}x{size}x{size} | {diff} | "
                  f"{time.perf_counter() - t:.0f} |", flush=True)


if __name__ == "__main__":
    main()
