"""Anticipation (Deep RNN Framework, DESIGN.md 4.4): name the expression from the first frames only.

Training sees the first k frames of every sequence (``first`` = an int k >= 1, or a fraction in
(0, 1) of each sequence's length, at least one frame); the target is the sequence's label (the label
of its last frame). The loss is cross-entropy at EVERY real step plus a hinge that keeps the true
class's probability from falling over time:

    loss = mean_t CE(z_t, y)  +  weight * mean_t max(0, p_y(t-1) - p_y(t))

(means over the real steps / the pairs of consecutive real steps). Because every sequence model here
is causal, the output at the k-th real frame IS the prediction from the first k frames, so one forward
pass gives the accuracy for every k (``accuracy_per_k``).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def parse_first(first) -> tuple[int, float]:
    """(k, fraction): exactly one is set; (0, 0.0) = anticipation off."""
    if first in (None, 0, 0.0, "", False):
        return 0, 0.0
    f = float(first)
    if f >= 1:
        if f != int(f):
            raise ValueError(f"anticipation first={first!r}: an integer k >= 1 or a fraction in (0, 1)")
        return int(f), 0.0
    if f <= 0:
        raise ValueError(f"anticipation first={first!r} must be positive")
    return 0, f


def prefix_length(n: int, first) -> int:
    """How many leading frames of an n-frame sequence anticipation uses (n when off)."""
    k, frac = parse_first(first)
    if k:
        return min(k, n)
    if frac:
        return max(1, min(n, math.ceil(frac * n)))
    return n


def anticipation_loss(step_logits: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, weight: float = 1.0,
                      class_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Per-step CE + weight * monotonicity hinge on p_true; step_logits [B, T, K], mask [B, T], target [B].

    Returns (loss, {"ce": float, "hinge": float}). Padded steps are ignored.
    """
    B, T, K = step_logits.shape
    m = mask.bool()
    tgt = target[:, None].expand(B, T)
    ce = F.cross_entropy(step_logits[m], tgt[m], weight=class_weights, reduction="none")
    if class_weights is not None:
        ce_mean = ce.sum() / class_weights[tgt[m]].sum()
    else:
        ce_mean = ce.mean()
    p = torch.softmax(step_logits, -1).gather(2, tgt[..., None])[..., 0]  # [B, T]
    pairs = m[:, 1:] & m[:, :-1]
    drops = torch.relu(p[:, :-1] - p[:, 1:])[pairs]
    hinge = drops.mean() if drops.numel() else step_logits.new_zeros(())
    loss = ce_mean + float(weight) * hinge
    return loss, {"ce": float(ce_mean.detach()), "hinge": float(hinge.detach())}


def accuracy_per_k(step_probs: np.ndarray, lengths: np.ndarray, targets: np.ndarray,
                   ks: list[int] | None = None) -> dict[str, float]:
    """{"k1": acc, "k2": ...}: accuracy of the prediction after the first k real frames.

    step_probs [S, T, K] left-padded per-step outputs; lengths [S] real frames; a sequence shorter
    than k counts with its full length. ks defaults to 1..T.
    """
    S, T, _ = step_probs.shape
    ks = ks or list(range(1, T + 1))
    out = {}
    for k in ks:
        pos = T - lengths + np.minimum(k, lengths) - 1
        pred = step_probs[np.arange(S), pos].argmax(-1)
        out[f"k{k}"] = float((pred == targets).mean()) if S else float("nan")
    return out


def true_class_curve(step_probs: np.ndarray, lengths: np.ndarray, targets: np.ndarray) -> dict[str, float]:
    """Mean probability of the true class after the first k frames, k = 1..T (how early it rises)."""
    S, T, _ = step_probs.shape
    out = {}
    for k in range(1, T + 1):
        pos = T - lengths + np.minimum(k, lengths) - 1
        out[f"k{k}"] = float(step_probs[np.arange(S), pos, targets].mean()) if S else float("nan")
    return out
