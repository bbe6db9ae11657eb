"""Write the model that ships inside ferpipe (src/ferpipe/weights/fer2013_vgg7.pt) from a train run.

The bundled model is a train-stage checkpoint like any other (loaded with weights_only=True); this
script only completes its meta: the task it was trained for (the checkpoint records params.yaml's
`task`, which a run of the stage script with an explicit --split does not change), the
preprocessing record (ingest 48 px, gray48 48 px, no guide map), and where it came from.

    .venv/bin/python bench/make_bundled_model.py RUN/models/final.pt --note "..."
"""
from __future__ import annotations

import argparse

import torch

from ferpipe.models.checkpoint import load_checkpoint, read_payload
from ferpipe.store import write_torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--out", default="src/ferpipe/weights/fer2013_vgg7.pt")
    p.add_argument("--task", default="classes")
    p.add_argument("--note", default="", help="provenance: data, command, device, time")
    a = p.parse_args()
    payload = read_payload(a.checkpoint)
    meta = dict(payload["meta"])
    meta["task"] = a.task
    meta.setdefault("preprocess", {"ingest_size": 48, "gray48_size": 48, "landmarks": None, "guides": {}})
    meta["provenance"] = a.note
    payload["meta"] = meta
    payload["state_dict"] = {k: v.contiguous() for k, v in payload["state_dict"].items()}
    write_torch(a.out, payload)
    model, info = load_checkpoint(a.out)  # it loads, weights_only
    n = sum(t.numel() for t in model.parameters())
    print(f"{a.out}: {info['model']} {info['model_kwargs']}, {n} parameters, classes {info['classes']}")


if __name__ == "__main__":
    main()
