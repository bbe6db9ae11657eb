"""Checkpoints: one .pt file that rebuilds its model without the code that trained it.

Contents: {"model": registry name, "num_classes", "classes", "model_kwargs" (passed to build_model),
"state_dict", "meta" (anything else: fold, epoch, val accuracy, params used)}. Written atomically.
"""
from __future__ import annotations

import os

import torch
import torch.nn as nn

from ferpipe.models import build_model
from ferpipe.store import write_torch


def save_checkpoint(path: str | os.PathLike, model: nn.Module, name: str, classes: list[str],
                    model_kwargs: dict | None = None, meta: dict | None = None) -> None:
    model = getattr(model, "module", model)  # unwrap DDP
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": name, "num_classes": len(classes), "classes": list(classes),
               "model_kwargs": dict(model_kwargs or {}), "state_dict": state, "meta": dict(meta or {})}
    write_torch(path, payload)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from a checkpoint (eval mode); return (model, the payload without state_dict)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = build_model(payload["model"], payload["num_classes"], **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"])
    model.eval()
    info = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, info


def read_checkpoint_info(path: str | os.PathLike) -> dict:
    """The payload without its weights and without building the model (memory-mapped: cheap even
    for a 500 MB RMN checkpoint), e.g. to compare the folds' validation accuracy."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} not found")
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return {k: v for k, v in payload.items() if k != "state_dict"}
