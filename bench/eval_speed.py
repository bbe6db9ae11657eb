"""Evaluation and feature-extraction speed on real FER-2013 (CPU), against the compute bound.

Issue 11 asks for evaluation and feature extraction at >= 5,000 img/s for `baseline` / `vgg`. For each model,
images/s over the PublicTest faces (uint8 in memory, as the evaluate stage holds them) of:
  evaluate   ferpipe.evaluate.run.predict_pixels on the model's inference form (models/inference.py: batch
             norms folded, channels_last), the evaluate stage's and ferpipe.recognize's path (uint8 -> float,
             standardize, forward, softmax), at each batch size of --batches;
  features   ferpipe.sequences.features.run_cnn on the same form: the features stage's path (layer `flatten`;
             `vgg` only, the bundled model's family), at each batch size;
  forward    the plain eval() model alone on ready float tensors under torch.inference_mode at batch 512,
             NCHW, channels_last, and NCHW with batch norms folded: what each change gives;
and the bound: the model's FLOPs per image (torch.utils.flop_counter) against this machine's measured
float32 GEMM rate (a 1024^3 matmul), i.e. the img/s that a perfect kernel would reach.

    .venv/bin/python bench/eval_speed.py [--data ../shared/data/fer2013] [--models baseline vgg] [--batches 64 128 512]

Run on an otherwise idle machine; figures in one run are comparable (ratios), absolute ones move with load.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as the stage scripts

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from ferpipe.data.ingest import decode_all
from ferpipe.data.readers import read_folder
from ferpipe.evaluate.run import predict_pixels
from ferpipe.models import build_model
from ferpipe.models.inference import fold_batchnorm, inference_model
from ferpipe.models.inputs import InputSpec
from ferpipe.sequences.features import run_cnn

REPO = Path(__file__).resolve().parents[1]


def timed(fn, repeat: int = 3) -> float:
    """Best of `repeat` wall times of fn() after one warm-up call (the machine is shared)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gemm_gflops() -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / timed(lambda: [a @ b for _ in range(8)]) * 8 / 1e9


def flops_per_image(model: torch.nn.Module) -> float:
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(16, 1, 48, 48))
    return counter.get_total_flops() / 16


def forward_rate(model: torch.nn.Module, x: torch.Tensor, batch: int) -> float:
    def run():
        with torch.inference_mode():
            for chunk in x.split(batch):
                model(chunk)
    return len(x) / timed(run)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "fer2013"))
    p.add_argument("--models", nargs="+", default=["baseline", "vgg"])
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = every core)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads or os.cpu_count() or 1)
    manifest, _ = read_folder(Path(a.data))
    manifest = manifest[manifest["split"] == "test"].reset_index(drop=True)
    images, ok, _ = decode_all(manifest, 48, workers=0, progress=False)
    pixels = torch.from_numpy(images[ok][:, None].copy())  # uint8 [N, 1, 48, 48]
    x = pixels.float().div(255.0)
    spec = InputSpec(mean=[x.mean().item()], std=[x.std().item()])
    gemm = gemm_gflops()
    print(f"{len(pixels)} PublicTest faces, {torch.get_num_threads()} threads, float32 GEMM {gemm:.0f} GFLOP/s, "
          f"load average {os.getloadavg()[0]:.2f}")
    batches = " ".join(f"{b:>6}" for b in a.batches)
    print(f"{'model':9} {'MFLOP/img':>9} {'bound':>6} | evaluate at batch {batches} | features at batch {batches} | "
          f"forward at 512: NCHW NHWC folded   (img/s)")
    for name in a.models:
        torch.manual_seed(0)
        model = build_model(name, 7).eval()
        fast = inference_model(model)
        flops = flops_per_image(model)
        evaluate = [len(pixels) / timed(lambda: predict_pixels(fast, pixels, spec, batch_size=b)) for b in a.batches]
        features = [len(pixels) / timed(lambda: run_cnn(fast, images[ok], "flatten", b)) if name == "vgg"
                    else float("nan") for b in a.batches]
        nchw = forward_rate(model, x, 512)
        nhwc_model = build_model(name, 7).eval()
        nhwc_model.load_state_dict(model.state_dict())
        nhwc_model.to(memory_format=torch.channels_last)
        nhwc = forward_rate(nhwc_model, x.contiguous(memory_format=torch.channels_last), 512)
        folded = forward_rate(fold_batchnorm(model), x, 512)
        row = lambda values: " ".join(f"{v:6.0f}" for v in values)  # noqa: E731
        print(f"{name:9} {flops / 1e6:9.1f} {gemm * 1e9 / flops:6.0f} | {'':17} {row(evaluate)} | {'':17} "
              f"{row(features)} | {'':14} {nchw:4.0f} {nhwc:4.0f} {folded:6.0f}", flush=True)


if __name__ == "__main__":
    main()
