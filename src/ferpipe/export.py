"""Export a ferpipe model for deployment: ONNX (checked with onnxruntime) or TorchScript.

The exported graph is the whole inference step after the face crop: it takes float pixels in 0..255,
[B, C, S, S] (C = the image's channels, 1 gray or 3 RGB for a model trained with ingest.color rgb,
plus 1 for guided models' guide map, as ferpipe makes them), at
the model's size S, standardizes them with the training run's statistics, runs the network and
returns class probabilities [B, classes]. The class names, the input spec and the preprocessing
record travel inside the file (ONNX metadata_props; TorchScript extra files `ferpipe.json`).

ONNX: opset 20 by default (the spatial transformers need AffineGrid, opset 20, and GridSample,
opset 16). Every export is checked against PyTorch on real faces when the caller gives them
(``check``: max abs difference of the probabilities, must be under ``tolerance``).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ferpipe.models.inputs import InputSpec
from ferpipe.store import atomic_path

FORMATS = ("onnx", "torchscript")


class ExportError(ValueError):
    """A model that cannot be exported in that format; str(error) says why."""


class Deployable(nn.Module):
    """pixels (0..255) -> standardize -> model -> softmax, as one module."""

    def __init__(self, model: nn.Module, spec: InputSpec):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.guided = spec.guide is not None
        self.image_channels = int(spec.image_channels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = (pixels - self.mean) / self.std
        k = self.image_channels
        logits = self.model(x[:, :k], x[:, k:k + 1]) if self.guided else self.model(x[:, :k])
        return torch.softmax(logits, dim=1)


def _metadata(member) -> dict[str, str]:
    info = member.info
    return {"ferpipe.model": str(info["model"]), "ferpipe.classes": json.dumps(info["classes"]),
            "ferpipe.input": json.dumps(member.spec.to_dict()),
            "ferpipe.preprocess": json.dumps(member.preprocess),
            "ferpipe.input_range": "float pixels 0..255, [batch, channels, size, size]; output: probabilities"}


def export_model(model=None, fmt: str = "onnx", out: str | os.PathLike = "model.onnx", opset: int = 20,
                 check: np.ndarray | None = None, tolerance: float = 1e-4) -> dict:
    """Export one checkpoint (``ferpipe.recognize.model_paths`` semantics; an ensemble is refused) and,
    with `check` (uint8 pixels [N, C, S, S] from real faces), compare the exported file's probabilities
    with PyTorch's. Returns {"out", "format", "max_abs_diff" (or None), "classes"}."""
    from ferpipe.recognize import load_members

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    members = load_members(model)
    if len(members) != 1:
        raise ExportError(f"export takes one checkpoint, got {len(members)} (a models/ folder of fold models "
                          "is an ensemble: pass one fold<k>.pt or final.pt)")
    member = members[0]
    if member.scale is not None:  # its graph would softmax two regression outputs: refused, not wrong
        raise ExportError(f"{member.path}: a valence/arousal model; export writes class probabilities and takes "
                          "classifiers only")
    net = Deployable(member.model, member.spec).eval()
    c, s = member.spec.channels, member.spec.size
    example = torch.full((2, c, s, s), 128.0)
    out = Path(out)
    meta = _metadata(member)
    try:
        if fmt == "onnx":
            _export_onnx(net, example, out, opset, meta)
        else:
            _export_torchscript(net, example, out, meta)
    except ExportError:
        raise
    except Exception as e:  # the exporter's own error: a clear message, not its traceback
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ExportError(f"{member.info['model']!r} cannot be exported to {fmt} (opset {opset}): {first}") from None
    result = {"out": str(out), "format": fmt, "max_abs_diff": None, "classes": list(member.info["classes"])}
    if check is not None:
        pixels = torch.from_numpy(np.ascontiguousarray(check)).float()
        with torch.no_grad():
            want = net(pixels).numpy()
        got = run_exported(out, fmt, pixels.numpy())
        result["max_abs_diff"] = float(np.abs(got - want).max())
        if not result["max_abs_diff"] < tolerance:
            raise ExportError(f"{out}: exported probabilities differ from PyTorch by {result['max_abs_diff']:.2e} "
                              f"(tolerance {tolerance:g}; deep networks accumulate float32 kernel differences: "
                              "inspect, then --tolerance)")
    return result


def _export_onnx(net: nn.Module, example: torch.Tensor, out: Path, opset: int, meta: dict) -> None:
    """The TorchScript-based exporter (dynamo=False) first: it exports the core registry models in
    under a second each, where torch.export-based export (dynamo=True, torch's default since 2.9) took
    7-17 s (150 s for rmn). Where it cannot express an op (VGG19's 7x7 adaptive pooling of a 1x1 map
    at 48 px), torch.export-based export, which decomposes it."""
    import warnings

    import onnx

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer and deprecation warnings: the check is what counts
        try:
            with _silenced():  # on failure it dumps its IR graph from C++
                torch.onnx.export(net, (example,), buf, input_names=["pixels"], output_names=["probs"],
                                  opset_version=int(opset), dynamo=False,
                                  dynamic_axes={"pixels": {0: "batch"}, "probs": {0: "batch"}})
            proto = onnx.load_from_string(buf.getvalue())
        except Exception:
            batch = torch.export.Dim("batch", min=1, max=65536)
            program = torch.onnx.export(net, (example,), input_names=["pixels"], output_names=["probs"],
                                        opset_version=int(opset), dynamo=True, verbose=False,
                                        dynamic_shapes={"pixels": {0: batch}})
            proto = program.model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    with atomic_path(out) as tmp:
        onnx.save(proto, str(tmp))


@contextlib.contextmanager
def _silenced():
    """Send file descriptors 1 and 2 to /dev/null for the block (C++ prints bypass sys.stdout)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, null):
            os.close(fd)


def _export_torchscript(net: nn.Module, example: torch.Tensor, out: Path, meta: dict) -> None:
    import warnings

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(net, (example,), check_trace=False)
    with atomic_path(out) as tmp:
        torch.jit.save(traced, str(tmp), _extra_files={"ferpipe.json": json.dumps(meta)})


def run_exported(path: str | os.PathLike, fmt: str, pixels: np.ndarray) -> np.ndarray:
    """Probabilities of an exported file for float pixels [N, C, S, S] (onnxruntime or torch.jit)."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"pixels": np.asarray(pixels, np.float32)})[0]
    module = torch.jit.load(str(path))
    with torch.no_grad():
        return module(torch.from_numpy(np.asarray(pixels, np.float32))).numpy()
