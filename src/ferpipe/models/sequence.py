"""Sequence models over per-frame features: LSTM, the Deep RNN context-bridge stack, a per-frame baseline.

Every model takes a left-zero-padded batch ``x`` [B, T, C, H, W] (a feature vector as C x 1 x 1)
with ``mask`` bool [B, T] (True = a real frame; each row's real frames are the last ones, contiguous)
and returns per-step outputs [B, T, K] from ``steps(x, mask)``; ``forward(x, mask)`` is the
many-to-one output [B, K] at the last step (the sequence's last real frame). All of them are causal
(the output at a frame depends only on that frame and the ones before), so the output at the k-th
real frame is the prediction "from the first k frames" that anticipation evaluates.

* ``LSTMNet`` (LSTM-on-CNN, DESIGN.md 4.2): optional frame encoder -> flatten -> LSTM (depth,
  hidden 256, dropout between layers) -> dropout -> Linear. Padding is masked exactly: frames are
  packed (``pack_padded_sequence``), so padded steps never touch the state.
* ``CBMNet`` (Deep RNN, Pang et al. CVPR 2019, DESIGN.md 4.4): a stack of ``depth`` context-bridge
  cells; per step ``data = tanh(BN(conv(x)))``, ``ctrl = sigmoid(BN(conv([x, c_prev])))``,
  ``h = data * ctrl``, ``c = ctrl``. The convs are 1x1 on feature vectors and 3x3 on feature maps
  (``kernel=0``: chosen from the input). Every ``shortcut`` layers the block's input is added to its
  output (a 1x1 projection where the channel count changes). Temporal dropout: in training, with
  probability ``temporal_dropout`` per sample and step, the control branch sees ``x.detach()`` (same
  value, no gradient through x there); never in eval. Batch norm statistics use real frames only.
  Head: spatial mean -> dropout -> Linear at every step.
* ``FrameNet``: a per-frame classifier (encoder -> MLP) applied at every step; with one frame per
  sequence it is the single-frame (apex) CNN the sequence models are compared with.

Frame encoders for raw frames (features in images mode) are the image registry's models, not copies:
``simple`` = the Deep-Emotion Simple-CNN's trunk (ferpipe.models.SimpleCNN, 1x48x48 -> 10x9x9),
``simple_fc`` = the same up to its fc1 (-> 50 x 1 x 1: LSTM-on-CNN trained end to end), ``conv`` =
three blocks of ferpipe.models.CompactVGG (width w, 2w, 4w; 48 -> 6 px). ``init_encoder`` starts a
simple / simple_fc encoder from a Simple-CNN checkpoint.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ferpipe.models import SEQUENCE_MODELS
from ferpipe.models.checkpoint import load_checkpoint, read_checkpoint_info
from ferpipe.models.deep_emotion import SimpleCNN
from ferpipe.models.vgg import CompactVGG

KINDS = SEQUENCE_MODELS
ENCODERS = ("none", "simple", "simple_fc", "conv")


# ---------------------------------------------------------------------------------------------
# padding helpers

def check_mask(mask: torch.Tensor) -> torch.Tensor:
    """Lengths [B] of a left-padded mask; ValueError if a row is empty or not left-padded."""
    lengths = mask.sum(1)
    if (lengths == 0).any():
        raise ValueError("every sequence needs at least one real frame (a mask row is all False)")
    T = mask.shape[1]
    expect = torch.arange(T, device=mask.device)[None, :] >= (T - lengths)[:, None]
    if not torch.equal(expect, mask.bool()):
        raise ValueError("mask must be left-padded: the real frames of a row are its last ones, contiguous")
    return lengths


def left_to_right(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Left-padded [B, T, ...] -> right-padded (real frames first)."""
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device)[None, :] + (T - lengths)[:, None]) % T
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


def right_to_left(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    T = x.shape[1]
    idx = (torch.arange(T, device=x.device)[None, :] - (T - lengths)[:, None]) % T
    return torch.gather(x, 1, idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x))


# ---------------------------------------------------------------------------------------------
# frame encoders

class SimpleTrunk(SimpleCNN):
    """The registry's Deep-Emotion Simple-CNN (``baseline``) without its classifier: 1 x 48 x 48 ->
    10 x 9 x 9 (its trunk); with ``fc`` also dropout -> flatten -> fc1 -> ReLU (-> 50 x 1 x 1: the
    Simple-CNN's fc1 features, the layer the LSTM-on-CNN sits on). The same layers and parameter names
    as the image model, so its checkpoints load (``init_encoder``)."""

    def __init__(self, in_ch: int = 1, fc: bool = False, in_size: int = 48, dropout: float = 0.5):
        super().__init__(num_classes=1, in_size=in_size, dropout=dropout, in_channels=in_ch)
        del self.fc2
        self.fc = bool(fc)
        if not self.fc:
            del self.fc1

    def forward(self, x):
        x = self.trunk(x)
        if self.fc:
            x = F.relu(self.fc1(self.dropout(x).flatten(1)))[:, :, None, None]
        return x


def make_encoder(kind: str, in_shape: tuple[int, int, int], width: int = 16) -> tuple[nn.Module | None, tuple]:
    """(encoder or None, its output shape [C, H, W])."""
    if kind in (None, "", "none"):
        return None, tuple(in_shape)
    if kind not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {kind!r}")
    if kind == "simple":
        enc = SimpleTrunk(in_shape[0], in_size=in_shape[1])
    elif kind == "simple_fc":
        enc = SimpleTrunk(in_shape[0], fc=True, in_size=in_shape[1])
    else:  # the registry's CompactVGG blocks: (conv3x3-BN-ReLU) x 2 + max-pool, widths w, 2w, 4w
        enc = CompactVGG(1, channels=[width, 2 * width, 4 * width], convs=2, in_channels=in_shape[0]).features
    with torch.no_grad():
        was = enc.training
        enc.eval()
        shape = tuple(enc(torch.zeros(1, *in_shape)).shape[1:])
        enc.train(was)
    return enc, shape


class _Base(nn.Module):
    def __init__(self, in_shape, num_outputs, encoder="none", encoder_width=16):
        super().__init__()
        if len(in_shape) != 3:
            raise ValueError(f"in_shape must be (C, H, W), got {in_shape}")
        self.in_shape = tuple(int(v) for v in in_shape)
        self.num_outputs = int(num_outputs)
        self.encoder, self.feat_shape = make_encoder(encoder, self.in_shape, encoder_width)

    def encode(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Run the frame encoder on the real frames only: [B, T, C, H, W] -> [B, T, C', H', W']."""
        if x.dim() != 5 or tuple(x.shape[2:]) != self.in_shape:
            raise ValueError(f"x must be [B, T, {', '.join(map(str, self.in_shape))}], got {tuple(x.shape)}")
        if self.encoder is None:
            return x * mask[:, :, None, None, None].to(x.dtype)
        B, T = mask.shape
        out = x.new_zeros(B, T, *self.feat_shape)
        out[mask] = self.encoder(x[mask])
        return out

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Many-to-one: the output at the last step [B, K]."""
        return self.steps(x, mask)[:, -1]

    def _mask(self, x, mask):
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return mask.bool()


# ---------------------------------------------------------------------------------------------
# LSTM

class LSTMNet(_Base):
    """LSTM-on-CNN: many-to-one LSTM over (encoded, flattened) frame features."""

    def __init__(self, in_shape, num_outputs, hidden: int = 256, depth: int = 1, dropout: float = 0.0,
                 encoder: str = "none", encoder_width: int = 16):
        super().__init__(in_shape, num_outputs, encoder, encoder_width)
        self.in_dim = math.prod(self.feat_shape)
        self.lstm = nn.LSTM(self.in_dim, hidden, num_layers=depth, batch_first=True,
                            dropout=dropout if depth > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, self.num_outputs)

    def steps(self, x, mask=None):
        mask = self._mask(x, mask)
        lengths = check_mask(mask)
        feats = self.encode(x, mask).flatten(2)
        right = left_to_right(feats, lengths)
        packed = pack_padded_sequence(right, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        y = self.head(self.drop(out))
        return right_to_left(y, lengths) * mask[..., None].to(y.dtype)


# ---------------------------------------------------------------------------------------------
# Deep RNN: context-bridge cells

class MaskedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from the rows where mask is True only."""

    def forward(self, x, mask=None):
        if mask is None or not self.training:
            return super().forward(x)
        out = torch.zeros_like(x)
        sel = x[mask]
        if sel.shape[0] * sel.shape[2] * sel.shape[3] > 1:
            out[mask] = super().forward(sel)
        elif sel.shape[0]:  # one value per channel: normalize with the running statistics
            out[mask] = F.batch_norm(sel, self.running_mean, self.running_var, self.weight, self.bias,
                                     False, 0.0, self.eps)
        return out


class CBMCell(nn.Module):
    """One context-bridge layer run over a whole (padded) sequence."""

    def __init__(self, in_ch: int, hidden: int, kernel: int = 1, temporal_dropout: float = 0.0):
        super().__init__()
        if not 0.0 <= temporal_dropout <= 1.0:
            raise ValueError(f"temporal_dropout must be in [0, 1], got {temporal_dropout}")
        pad = kernel // 2
        self.hidden, self.temporal_dropout = hidden, float(temporal_dropout)
        self.conv_data = nn.Conv2d(in_ch, hidden, kernel, padding=pad, bias=False)
        self.bn_data = MaskedBatchNorm2d(hidden)
        self.conv_ctrl = nn.Conv2d(in_ch + hidden, hidden, kernel, padding=pad, bias=False)
        self.bn_ctrl = MaskedBatchNorm2d(hidden)
        self.detached = 0  # how many (sample, step) control inputs were detached in the last forward

    def forward(self, x: torch.Tensor, mask: torch.Tensor, detach: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, C, H, W], mask [B, T] -> h [B, T, hidden, H, W] (zero at padded steps).

        ``detach`` bool [B, T] forces which control inputs are detached (tests); by default it is
        drawn with probability temporal_dropout in training and all False in eval.
        """
        B, T = mask.shape
        flat = x.reshape(B * T, *x.shape[2:])
        data = torch.tanh(self.bn_data(self.conv_data(flat), mask.reshape(-1))).view(B, T, self.hidden, *x.shape[3:])
        if detach is None:
            if self.training and self.temporal_dropout > 0:
                detach = torch.rand(B, T, device=x.device) < self.temporal_dropout
            else:
                detach = torch.zeros(B, T, dtype=torch.bool, device=x.device)
        self.detached = int((detach & mask).sum())
        c = x.new_zeros(B, self.hidden, *x.shape[3:])
        hs = []
        for t in range(T):
            xt = x[:, t]
            d = detach[:, t].view(B, 1, 1, 1)
            xc = torch.where(d, xt.detach(), xt) if bool(detach[:, t].any()) else xt
            ctrl = torch.sigmoid(self.bn_ctrl(self.conv_ctrl(torch.cat([xc, c], 1)), mask[:, t]))
            m = mask[:, t].view(B, 1, 1, 1)
            hs.append(torch.where(m, data[:, t] * ctrl, torch.zeros_like(ctrl)))
            c = torch.where(m, ctrl, c)
        return torch.stack(hs, 1)


class CBMNet(_Base):
    """Deep RNN of context-bridge cells with a shortcut every ``shortcut`` layers."""

    def __init__(self, in_shape, num_outputs, hidden: int = 64, depth: int = 15, shortcut: int = 5,
                 kernel: int = 0, temporal_dropout: float = 0.3, dropout: float = 0.5,
                 encoder: str = "none", encoder_width: int = 16):
        super().__init__(in_shape, num_outputs, encoder, encoder_width)
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        c, h, w = self.feat_shape
        self.kernel = int(kernel) or (1 if (h, w) == (1, 1) else 3)
        self.cells = nn.ModuleList(
            self.make_cell(c if i == 0 else hidden, hidden, self.kernel, temporal_dropout) for i in range(depth))
        self.shortcut = int(shortcut)
        self.shortcut_layers = [l for l in range(1, depth + 1) if self.shortcut and l % self.shortcut == 0]
        # the first block's input has c channels: project it to hidden for its shortcut
        self.proj = nn.Conv2d(c, hidden, 1, bias=False) if self.shortcut_layers and c != hidden else None
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, self.num_outputs)

    @staticmethod
    def make_cell(in_ch: int, hidden: int, kernel: int, temporal_dropout: float) -> nn.Module:
        return CBMCell(in_ch, hidden, kernel, temporal_dropout)

    def steps(self, x, mask=None):
        mask = self._mask(x, mask)
        check_mask(mask)
        h = self.encode(x, mask)
        block_in = h
        B, T = mask.shape
        for i, cell in enumerate(self.cells, start=1):
            h = cell(h, mask)
            if i in self.shortcut_layers:
                skip = block_in
                if skip.shape[2] != h.shape[2]:
                    skip = self.proj(skip.reshape(B * T, *skip.shape[2:])).view(B, T, *h.shape[2:])
                h = h + skip * mask[:, :, None, None, None].to(h.dtype)
                block_in = h
        y = self.head(self.drop(h.mean(dim=(3, 4))))
        return y * mask[..., None].to(y.dtype)


class ConvLSTMCell(nn.Module):
    """One ConvLSTM layer (Shi et al. 2015, no peepholes) over a whole left-padded sequence: gates from
    conv(x_t) + conv(h_prev); padded steps keep the state and output zero, so padding changes nothing."""

    def __init__(self, in_ch: int, hidden: int, kernel: int = 1):
        super().__init__()
        pad = kernel // 2
        self.hidden = hidden
        self.conv_x = nn.Conv2d(in_ch, 4 * hidden, kernel, padding=pad)
        self.conv_h = nn.Conv2d(hidden, 4 * hidden, kernel, padding=pad, bias=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x [B, T, C, H, W], mask [B, T] -> h [B, T, hidden, H, W] (zero at padded steps)."""
        B, T = mask.shape
        gates_x = self.conv_x(x.reshape(B * T, *x.shape[2:])).view(B, T, 4 * self.hidden, *x.shape[3:])
        h = x.new_zeros(B, self.hidden, *x.shape[3:])
        c = torch.zeros_like(h)
        hs = []
        for t in range(T):
            i, f, g, o = (gates_x[:, t] + self.conv_h(h)).chunk(4, 1)
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            m = mask[:, t].view(B, 1, 1, 1)
            c, h = torch.where(m, c_new, c), torch.where(m, h_new, h)
            hs.append(torch.where(m, h_new, torch.zeros_like(h_new)))
        return torch.stack(hs, 1)


class ConvLSTMNet(CBMNet):
    """The Deep RNN paper's comparison row: the same deep stack (depth, shortcuts, head) of ConvLSTM cells."""

    def __init__(self, in_shape, num_outputs, hidden: int = 64, depth: int = 15, shortcut: int = 5,
                 kernel: int = 0, dropout: float = 0.5, encoder: str = "none", encoder_width: int = 16):
        super().__init__(in_shape, num_outputs, hidden, depth, shortcut, kernel, 0.0, dropout, encoder, encoder_width)

    @staticmethod
    def make_cell(in_ch: int, hidden: int, kernel: int, temporal_dropout: float) -> nn.Module:
        return ConvLSTMCell(in_ch, hidden, kernel)


# ---------------------------------------------------------------------------------------------
# per-frame baseline

class FrameNet(_Base):
    """A classifier of single frames (encoder -> flatten -> dropout -> Linear-ReLU-Linear) at every step."""

    def __init__(self, in_shape, num_outputs, hidden: int = 50, dropout: float = 0.5,
                 encoder: str = "simple", encoder_width: int = 16):
        super().__init__(in_shape, num_outputs, encoder, encoder_width)
        self.drop = nn.Dropout(dropout)
        self.fc1 = nn.Linear(math.prod(self.feat_shape), hidden)
        self.head = nn.Linear(hidden, self.num_outputs)

    def steps(self, x, mask=None):
        mask = self._mask(x, mask)
        check_mask(mask)
        f = self.drop(self.encode(x, mask)).flatten(2)
        y = self.head(F.relu(self.fc1(f)))
        return y * mask[..., None].to(y.dtype)


# ---------------------------------------------------------------------------------------------
# registry (checkpoints: ferpipe.models.checkpoint, the image models' format)

def init_encoder(model: nn.Module, checkpoint) -> list[str]:
    """Copy a registry Simple-CNN checkpoint's trunk (conv1..conv4, norm) into the model's ``simple``
    encoder (an STN checkpoint's ``classifier.`` trunk too); returns the keys loaded. For fine-tuning a
    CNN of the training stage (e.g. trained on FER-2013) end to end inside a sequence model."""
    if not isinstance(getattr(model, "encoder", None), SimpleTrunk):
        raise ValueError("init_encoder needs a sequence model built with encoder='simple' or 'simple_fc'")
    payload = torch.load(checkpoint, map_location="cpu", weights_only=True)
    state = payload.get("state_dict", payload) if isinstance(payload, dict) else payload
    target = model.encoder.state_dict()
    new = {}
    for key, value in state.items():
        k = key.removeprefix("module.").removeprefix("classifier.")
        if k in target and target[k].shape == value.shape and not key.startswith("localization."):
            new[k] = value
    missing = {k for k in target if not k.endswith("num_batches_tracked")} - set(new)
    if missing:
        raise ValueError(f"{checkpoint}: not a Simple-CNN trunk for this encoder (missing {sorted(missing)})")
    model.encoder.load_state_dict({**target, **new})
    return sorted(new)


_CLASSES = {"lstm": LSTMNet, "cbm": CBMNet, "convlstm": ConvLSTMNet, "frame": FrameNet}


def build_sequence_model(kind: str, in_shape, num_outputs: int, **kw) -> nn.Module:
    """Build "lstm" | "cbm" | "frame" for inputs [C, H, W] per frame and num_outputs outputs."""
    if kind not in _CLASSES:
        raise ValueError(f"unknown sequence model {kind!r}; known: {', '.join(KINDS)}")
    return _CLASSES[kind](tuple(in_shape), int(num_outputs), **kw)


def load_sequence_model(path) -> tuple[nn.Module, dict]:
    """A train_sequence model from its checkpoint (the one checkpoint format, ferpipe.models.checkpoint);
    ValueError naming what the file is otherwise (e.g. the image training stage's checkpoint)."""
    info = read_checkpoint_info(path)  # CheckpointError (a ValueError) names a file that is no checkpoint
    if info["model"] not in KINDS:
        raise ValueError(f"{path} is an image model checkpoint ('{info['model']}', from the train stage); --test-only "
                         "needs a sequence model saved by train_sequence (--model-out, default data/sequences/model.pt)")
    return load_checkpoint(path, build=lambda kind, n, in_shape, **kw: build_sequence_model(kind, in_shape, n, **kw))
