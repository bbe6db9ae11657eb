"""The `ferpipe` command: recognize expressions in photos, folders and videos; export a model.

    ferpipe recognize photo.jpg                         # the bundled FER-2013 model, a table on stdout
    ferpipe recognize photos/ clip.mp4 --out results.csv --annotate annotated/
    ferpipe recognize faces/ --crops --model models/    # already-cropped faces, the pipeline's own models
    ferpipe export --model models/final.pt --format onnx --out fer.onnx

Exit codes: 0 everything was read; 1 some inputs could not be read (each listed on stderr with the
reason; the rest are processed and written); 2 usage errors (a bad option, a model that does not load).
The pipeline itself runs through DVC (`dvc repro`); see README.md.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def _version() -> str:
    try:
        return version("ferpipe")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferpipe", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"ferpipe {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    r = sub.add_parser("recognize", help="expressions of the faces in images, folders (recursively) and videos",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    r.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders, videos")
    r.add_argument("--model", action="append", dest="models", metavar="MODEL",
                   help="'bundled' (the default: FER-2013, 7 classes), a checkpoint .pt, a train stage models/ "
                        "folder (final.pt, else the fold models as an ensemble); repeat for an ensemble")
    r.add_argument("--out", help="write the table to this .csv or .json (default: a short table on stdout)")
    r.add_argument("--annotate", metavar="DIR", help="write annotated images (PNG) and videos (MP4) here")
    r.add_argument("--crops", action="store_true", help="each image is one already-cropped face (FER-style): no detector")
    r.add_argument("--tta", type=int, default=0, help="test-time augmentation copies averaged with the plain prediction")
    r.add_argument("--tencrop", action="store_true", help="test-time augmentation: the ten crops (corners, centre, mirrors)")
    r.add_argument("--every", type=int, default=1, help="videos: every Nth frame")
    r.add_argument("--max-frames", type=int, default=None, help="videos: at most this many kept frames")
    r.add_argument("--sequence-model", metavar="MODEL_PT", help="videos: train_sequence's model.pt, applied to each "
                   "face track (columns track_label, track_probability); run from the project root")
    r.add_argument("--batch-size", type=int, default=256, help="faces per network batch")
    r.add_argument("--margin", type=float, default=None, help="> 1 shows the model more around each face than "
                   "FER-2013's framing (default: the model's ingest face_margin, else 1)")
    r.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default: every core)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")

    e = sub.add_parser("export", help="export a model to ONNX or TorchScript (checked against PyTorch)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--model", default="bundled", help="'bundled', or one checkpoint .pt")
    e.add_argument("--format", choices=("onnx", "torchscript"), default="onnx")
    e.add_argument("--out", required=True, help="output file (.onnx / .pt)")
    e.add_argument("--opset", type=int, default=20, help="ONNX opset (spatial transformers need >= 20)")
    e.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted |probability difference| vs PyTorch")
    e.add_argument("--check", metavar="FOLDER", help="images (face crops) to compare the export with PyTorch on; "
                                                     "default: random pixels")
    return p


def _recognize(a) -> int:
    import cv2
    import pandas as pd

    from ferpipe.recognize import (Recognizer, TrackLabeler, draw, expand_inputs, is_video, label_tracks,
                                   results_table)

    if a.every < 1 or a.batch_size < 1 or a.tta < 0 or (a.max_frames is not None and a.max_frames < 1):
        raise UsageError("--every, --batch-size and --max-frames must be >= 1, --tta >= 0")
    models = a.models or ["bundled"]
    fer = Recognizer(models if len(models) > 1 else models[0], tta=a.tta, batch_size=a.batch_size,
                     margin=a.margin, threads=a.threads, tta_mode="tencrop" if a.tencrop else "random")
    inputs, missing = expand_inputs(a.paths)
    failures = list(missing)
    labeler = TrackLabeler(a.sequence_model) if a.sequence_model else None
    images = [p for p in inputs if not is_video(p)]
    videos = [p for p in inputs if is_video(p)]
    annotate = Path(a.annotate) if a.annotate else None
    if annotate:
        annotate.mkdir(parents=True, exist_ok=True)
    tables = []
    results = fer.recognize_many(images, crops=a.crops, progress=not a.quiet)
    for res in results:
        if res.failed:
            failures.append((res.input, res.reason))
        elif annotate:
            cv2.imwrite(str(annotate / (_safe_name(res.input) + ".png")), draw(res.input, res))
    tables.append(results_table(results, fer.classes, fer.regression))
    for video in videos:
        if a.crops:
            failures.append((str(video), "--crops takes images, not videos"))
            continue
        try:
            frames = list(fer.video_results(video, a.every, a.max_frames, progress=not a.quiet,
                                            keep_crops=labeler is not None))
            table = results_table(frames, fer.classes, fer.regression)
            if labeler:
                table = label_tracks(table, frames, labeler)
        except ValueError as err:
            failures.append((str(video), str(err).removeprefix(f"{video}: ")))
            continue
        if annotate:
            _annotate_video(video, frames, annotate / (_safe_name(video) + ".mp4"), a.every)
        tables.append(table)
    table = pd.concat([t for t in tables if len(t)], ignore_index=True) if any(len(t) for t in tables) \
        else results_table([], fer.classes, fer.regression)
    _write_table(table, a.out, fer.classes)
    for path, reason in failures:
        print(f"ferpipe: {path}: {reason}", file=sys.stderr)
    if failures:
        print(f"ferpipe: {len(failures)} input(s) could not be read", file=sys.stderr)
    return 1 if failures else 0


def _safe_name(path) -> str:
    return str(path).strip("/").replace("/", "__").replace(os.sep, "__")


def _write_table(table, out: str | None, classes: list[str]) -> None:
    from ferpipe.store import write_csv, write_text

    if out:
        if out.endswith(".json"):
            write_text(out, table.to_json(orient="records", indent=1))
        elif out.endswith(".csv"):
            write_csv(out, table)
        else:
            raise UsageError(f"--out {out}: use a .csv or .json name")
        print(f"ferpipe: {len(table)} rows -> {out}", file=sys.stderr)
        return
    # a classifier's label and probability, or a valence/arousal model's values
    answer = ["label", "probability"] if "label" in table else list(classes)
    numbers = ["probability"] if "label" in table else list(classes)
    short = table[["input", "frame", "face_id", *answer, "reason"]].copy()
    short[numbers] = short[numbers].round(3)
    with_frames = (table["frame"] != 0).any()
    print(short.to_string(index=False, columns=None if with_frames else
                          ["input", "face_id", *answer, "reason"]))


def _annotate_video(video, frames, out: Path, every: int) -> None:
    import cv2

    from ferpipe.recognize import draw

    cap = cv2.VideoCapture(str(video))
    fps = (cap.get(cv2.CAP_PROP_FPS) or 25.0) / every
    by_frame = {r.frame: r for r in frames}
    writer = None
    index = 0
    try:
        while True:
            ok, frame = cap.read()
            if not ok or (frames and index > frames[-1].frame):
                break
            if index in by_frame:
                img = draw(frame, by_frame[index])
                if writer is None:
                    writer = cv2.VideoWriter(str(out), cv2.VideoWriter_fourcc(*"mp4v"), fps, img.shape[1::-1])
                writer.write(img)
            index += 1
    finally:
        cap.release()
        if writer is not None:
            writer.release()


def _export(a) -> int:
    import numpy as np

    from ferpipe.export import export_model

    check = None
    if a.check:
        from ferpipe.data.decode import decode_image
        from ferpipe.recognize import Recognizer, expand_inputs, is_video

        fer = Recognizer(a.model)
        inputs, _ = expand_inputs([a.check])
        crops = [decode_image(p, fer.ingest_size) for p in inputs[:64] if not is_video(p)]
        if not crops:
            raise UsageError(f"--check {a.check}: no images there")
        check = fer.model_inputs(np.stack(crops))[0]
    result = export_model(a.model, a.format, a.out, a.opset, check=check if check is not None else
                          _random_pixels(a.model), tolerance=a.tolerance)
    print(f"ferpipe: {result['format']} -> {result['out']} (max |probability difference| vs PyTorch "
          f"{result['max_abs_diff']:.1e}, classes {result['classes']})")
    return 0


def _random_pixels(model):
    import numpy as np

    from ferpipe.recognize import load_members

    spec = load_members(model)[0].spec
    return np.random.default_rng(0).integers(0, 256, (8, spec.channels, spec.size, spec.size), dtype=np.uint8)


class UsageError(ValueError):
    """A bad command line: exit code 2."""


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    if not a.command:
        p.print_help()
        return 2
    from ferpipe.export import ExportError
    from ferpipe.recognize import RecognizeError

    try:
        return _recognize(a) if a.command == "recognize" else _export(a)
    except (UsageError, RecognizeError, ExportError) as e:
        if a.debug:
            raise
        print(f"ferpipe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ferpipe: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
