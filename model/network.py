"""The network: a small VGG-style CNN sized for fast CPU inference on face crops.

Each stage is two 3x3 conv+BN+ReLU layers at one resolution, then a 2x2 max-pool; a global
average pool and one linear layer give the class logits. With the default widths it has about
0.6 M parameters and needs ~0.1 GFLOP per 64x64 image.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    ]


class GenderNet(nn.Module):
    """Stem (stride 2) followed by one stage per entry of `widths`, then pool and classify."""

    def __init__(
        self,
        stem_width: int = 24,
        widths: tuple[int, ...] | list[int] = (32, 64, 128, 256),
        num_classes: int = 2,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        layers = _conv_bn_relu(3, stem_width, stride=2)
        cin = stem_width
        for i, width in enumerate(widths):
            layers += _conv_bn_relu(cin, width) + _conv_bn_relu(width, width)
            if i < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            cin = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Merge every BatchNorm2d into the Conv2d just before it in a Sequential (eval mode only).

    The outputs stay the same up to rounding, and inference skips one pass over every feature map."""
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            if isinstance(seq[i], nn.Conv2d) and isinstance(seq[i + 1], nn.BatchNorm2d):
                seq[i], seq[i + 1] = fuse_conv_bn_eval(seq[i], seq[i + 1]), nn.Identity()
    return model


# Checkpoints name their architecture; loading looks it up here, so adding a network is one entry.
ARCHITECTURES: dict[str, type[nn.Module]] = {"GenderNet": GenderNet}
