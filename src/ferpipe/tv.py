"""The one place torchvision is imported from.

PyPI's torchvision 0.28 is built against CUDA torch; on the CPU-only torch 2.13 its compiled ops
fail to load and `import torchvision` dies registering a fake kernel for the missing
`torchvision::nms`. Defining that operator (a pure-torch nms, plus the `qnms` schema) before the
import lets models, transforms and batched_nms work. Everywhere else: `from ferpipe.tv import torchvision`.
"""
from __future__ import annotations

import torch


def _nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression, same contract as torchvision.ops.nms."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1).clamp(min=0) * (y2 - y1).clamp(min=0)
    xx1 = torch.maximum(x1[:, None], x1[None, :])
    yy1 = torch.maximum(y1[:, None], y1[None, :])
    xx2 = torch.minimum(x2[:, None], x2[None, :])
    yy2 = torch.minimum(y2[:, None], y2[None, :])
    inter = (xx2 - xx1).clamp(min=0) * (yy2 - yy1).clamp(min=0)
    iou = inter / (area[:, None] + area[None, :] - inter).clamp(min=1e-12)
    suppressed = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
    keep = []
    for i in order.tolist():
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= iou[i] > iou_threshold
    return torch.tensor(keep, dtype=torch.long, device=boxes.device)


def _install_fallback() -> None:
    try:
        torch.ops.torchvision.nms  # noqa: B018 - compiled ops present
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", _nms, "CompositeExplicitAutograd")
    _install_fallback.lib = lib  # keep the registration alive


try:
    import torchvision  # noqa: F401
except RuntimeError:
    _install_fallback()
    import torchvision  # noqa: F401
    import torchvision.extension

    # ops.nms asserts the compiled library loaded; ours is registered, so let it through.
    # Other compiled ops (roi_align, deform_conv) still fail, with torch's "no such op" error.
    torchvision.extension._has_ops = lambda: True

__all__ = ["torchvision"]
