"""A trained model in the form that predicts fastest on a CPU, with the same outputs.

Used by every prediction path (the evaluate stage, ``ferpipe.recognize``, the features stage), so a
checkpoint gives the same numbers wherever it is applied. Two changes, neither alters the function the
model computes (outputs equal to ~1e-6, tests/test_models.py):
- each Conv2d -> BatchNorm2d pair inside an nn.Sequential is folded into one Conv2d (one pass over the
  activations instead of two; CompactVGG's batch norms were a fifth of its inference time);
- conv weights in channels_last (NHWC): oneDNN's CPU kernels run the small-channel convolutions of these
  models faster in NHWC (bench/eval_speed.py), and an NCHW input is converted by the first conv.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """An eval-mode copy with each Conv2d -> BatchNorm2d pair inside nn.Sequential containers folded into one
    Conv2d (the batch norm becomes nn.Identity, so module names, e.g. a features layer, still resolve)."""
    model = copy.deepcopy(model).eval()
    for module in list(model.modules()):
        if not isinstance(module, nn.Sequential):
            continue
        names = list(module._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = module._modules[a], module._modules[b]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                module._modules[a] = fuse_conv_bn_eval(conv, bn)
                module._modules[b] = nn.Identity()
    return model


def inference_model(model: nn.Module) -> nn.Module:
    """An eval-mode copy for prediction: batch norms folded (``fold_batchnorm``), conv weights channels_last."""
    model = fold_batchnorm(model)
    if any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)  # 4-d weights only; linear/LSTM weights are untouched
    return model
