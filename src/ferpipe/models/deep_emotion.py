"""Deep-Emotion classifier and (guided) spatial transformer, as used by Guided Spatial Transformers.

Architecture facts (DESIGN.md section 4.1), input [B, 1, 48, 48], no padding anywhere:

* ``SimpleCNN`` (the "Simple-CNN" / baseline classifier)::

      Conv(1->10,k3) ReLU Conv(10->10,k3) MaxPool2 ReLU Conv(10->10,k3) ReLU Conv(10->10,k3)
      BatchNorm(10) MaxPool2 ReLU Dropout(0.5) -> flatten 10*9*9=810 -> Linear(810,50) ReLU Linear(50,C)

  48 -> 46 -> 44 -> 22 -> 20 -> 18 -> 9, so 10*9*9 = 810 features.
  The original baseline called ``F.dropout`` unconditionally, so dropout stayed on at evaluation;
  that was a bug. Here it is an ``nn.Dropout``: active in ``train()``, off in ``eval()``.

* ``Localization`` (the STN's localization net)::

      Conv(1->8,k7) MaxPool2 ReLU Conv(8->10,k5) MaxPool2 ReLU -> 10*8*8=640 -> Linear(640,32) ReLU Linear(32,6)

  48 -> 42 -> 21 -> 17 -> 8, so 640 features. The last layer starts with zero weights and the
  identity affine bias [1, 0, 0, 0, 1, 0], so at initialization the transformer is the identity.
  ``bound`` > 0 (not in Guided-ST) keeps each of the 6 entries within ``bound`` of the identity:
  theta = I + bound * tanh((raw - I) / bound), the identity and its gradient at initialization
  unchanged. With 0.5 the sampled window is between half and 1.5 times the image, shifted by at most
  a quarter of it: it can no longer run off the image (the runaway that leaves the classifier only zero
  padding, README "Runs that never learn"). 0 = unbounded, as Guided-ST.

* ``STN``: theta = Localization(source) as a 2x3 affine matrix; the grid is
  ``F.affine_grid(theta, image.shape, align_corners=False)`` and the image is resampled with
  ``F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)``;
  the warped image goes to ``SimpleCNN``. With ``align_corners=False`` on both calls, the identity
  theta reproduces the image exactly (up to float rounding), which the tests check.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

STN_MODES = ("original", "guided")


def _check_image(name: str, x: torch.Tensor, in_size: int, channels: int = 1) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != channels:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a float tensor [B, {channels}, {in_size}, {in_size}], got {shape}")
    if tuple(x.shape[-2:]) != (in_size, in_size):
        raise ValueError(
            f"{name} must be {in_size}x{in_size} (the model was built with in_size={in_size}), "
            f"got {tuple(x.shape[-2:])}"
        )


class SimpleCNN(nn.Module):
    """The Deep-Emotion classifier ("Simple-CNN", registry name ``baseline``).

    ``forward(x, guide=None)``: x is [B, in_channels, in_size, in_size] float (1 gray, 3 RGB);
    ``guide`` is accepted and ignored, so every registry model is called the same way. Returns logits
    [B, num_classes].
    """

    head_path = "fc2"

    def __init__(self, num_classes: int, in_size: int = 48, dropout: float = 0.5, in_channels: int = 1):
        super().__init__()
        self.num_classes = int(num_classes)
        self.in_size = int(in_size)
        side = ((self.in_size - 4) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"in_size={in_size} is too small for SimpleCNN (needs >= 14)")
        self.features_dim = 10 * side * side
        self.in_channels = int(in_channels)
        self.conv1 = nn.Conv2d(self.in_channels, 10, kernel_size=3)
        self.conv2 = nn.Conv2d(10, 10, kernel_size=3)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.conv3 = nn.Conv2d(10, 10, kernel_size=3)
        self.conv4 = nn.Conv2d(10, 10, kernel_size=3)
        self.norm = nn.BatchNorm2d(10)
        self.pool4 = nn.MaxPool2d(2, 2)
        self.dropout = nn.Dropout(dropout)
        self.fc1 = nn.Linear(self.features_dim, 50)
        self.fc2 = nn.Linear(50, self.num_classes)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional part: [B, C, S, S] -> [B, 10, side, side] (before the dropout)."""
        x = F.relu(self.conv1(x))
        x = F.relu(self.pool2(self.conv2(x)))
        x = F.relu(self.conv3(x))
        return F.relu(self.pool4(self.norm(self.conv4(x))))

    def forward(self, x: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        _check_image("image", x, self.in_size, self.in_channels)
        x = self.dropout(self.trunk(x))
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


class Localization(nn.Module):
    """The STN localization net: [B, in_channels, in_size, in_size] -> theta [B, 2, 3].

    Its last layer (``fc_loc[2]``) starts at zero weights and the identity affine bias.
    """

    def __init__(self, in_size: int = 48, bound: float = 0.0, in_channels: int = 1):
        super().__init__()
        self.in_size = int(in_size)
        if bound < 0:
            raise ValueError(f"theta bound must be >= 0 (0 = unbounded), got {bound}")
        self.bound = float(bound)
        side = ((self.in_size - 6) // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"in_size={in_size} is too small for Localization (needs >= 20)")
        self.features_dim = 10 * side * side
        self.features = nn.Sequential(
            nn.Conv2d(int(in_channels), 8, kernel_size=7),
            nn.MaxPool2d(2, 2),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, 10, kernel_size=5),
            nn.MaxPool2d(2, 2),
            nn.ReLU(inplace=True),
        )
        self.fc_loc = nn.Sequential(
            nn.Linear(self.features_dim, 32),
            nn.ReLU(inplace=True),
            nn.Linear(32, 6),
        )
        self.reset_identity()

    def reset_identity(self) -> None:
        """Zero the last layer's weights and set its bias to the identity affine transform."""
        last = self.fc_loc[2]
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([1, 0, 0, 0, 1, 0], dtype=last.bias.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.features(x), 1)
        theta = self.fc_loc(x).view(-1, 2, 3)
        if self.bound > 0:
            eye = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=theta.dtype, device=theta.device)
            theta = eye + self.bound * torch.tanh((theta - eye) / self.bound)
        return theta


class STN(nn.Module):
    """Spatial transformer in front of ``SimpleCNN``.

    Modes:

    * ``"original"``: the localization net sees the image, the grid samples the image, the
      classifier sees the warped image. ``guide`` is ignored (registry name ``original``).
    * ``"guided"``: the localization net sees the *guide map* (landmark drawing, soft map,
      dilation, saliency ...), the grid samples the image, the classifier sees the warped image.
      A missing guide raises ``ValueError``. Registry names ``landmarks``, ``soft``,
      ``dilation``, ``saliency``.

    The "sampler variants" of Guided Spatial Transformers (``patches``, ``weighted``) are the
    same module in ``"guided"`` mode: the *image* passed to forward is the collage (binary-mask
    patches or soft-weighted collage), and the guide is the landmark drawing. Nothing in the
    network differs; only the inputs do (see ``ferpipe.models.MODEL_SPECS``).

    Sampling: ``affine_grid`` + ``grid_sample``, bilinear, zero padding, ``align_corners=False``.
    ``theta_bound``: see ``Localization`` (0 = unbounded, Guided-ST; training sets train.stn_bound).
    ``in_channels``: the image's (1 gray, 3 RGB); a guide map has one channel.
    """

    head_path = "classifier.fc2"

    def __init__(self, num_classes: int, mode: str = "original", in_size: int = 48, dropout: float = 0.5,
                 theta_bound: float = 0.0, in_channels: int = 1):
        super().__init__()
        if mode not in STN_MODES:
            raise ValueError(f"STN mode must be one of {STN_MODES}, got {mode!r}")
        self.mode = mode
        self.num_classes = int(num_classes)
        self.in_size = int(in_size)
        self.in_channels = int(in_channels)
        # the localization net sees the image (original) or the one-channel guide map (guided)
        self.localization = Localization(in_size, bound=theta_bound,
                                         in_channels=self.in_channels if mode == "original" else 1)
        self.classifier = SimpleCNN(num_classes, in_size=in_size, dropout=dropout, in_channels=self.in_channels)

    def _source(self, image: torch.Tensor, guide: torch.Tensor | None) -> torch.Tensor:
        _check_image("image", image, self.in_size, self.in_channels)
        if self.mode == "original":
            return image
        if guide is None:
            raise ValueError(
                "STN in 'guided' mode needs a guide map: call forward(image, guide) with guide "
                f"[B, 1, {self.in_size}, {self.in_size}]"
            )
        _check_image("guide", guide, self.in_size)
        if guide.shape[0] != image.shape[0]:
            raise ValueError(f"guide batch {guide.shape[0]} != image batch {image.shape[0]}")
        return guide

    def theta(self, image: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """The affine transforms [B, 2, 3] the localization net predicts."""
        return self.localization(self._source(image, guide))

    def warp(self, image: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        """The image as the classifier sees it (resampled by the predicted transform)."""
        theta = self.theta(image, guide)
        grid = F.affine_grid(theta, list(image.shape), align_corners=False)
        return F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def forward(self, image: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.warp(image, guide))
