"""The network: a small VGG-style CNN sized for fast CPU inference on face crops.

Each stage is two 3x3 conv+BN+ReLU layers at one resolution, then a 2x2 max-pool (all but the
last); a global average pool and one linear layer give the class logits. With the default widths it has about
1.2 M parameters and needs ~0.12 GFLOP per 64x64 image (a multiply-add counted as two).
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
        stem_width: int = 32,
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


class ConvReLU(nn.Module):
    """Inference only: a convolution and the ReLU after it, in one oneDNN call where torch has
    that (x86 and ARM CPU builds): it saves a pass over the feature map that costs a third as
    much as the convolution itself. Elsewhere, and for bfloat16 on a CPU whose oneDNN has no
    bfloat16 kernels (no AVX-512), the plain two steps."""

    fused = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    fused_bfloat16 = fused and torch.ops.mkldnn._is_mkldnn_bf16_supported()

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.conv
        if self.fused and x.device.type == "cpu" and (x.dtype != torch.bfloat16 or self.fused_bfloat16):
            return torch.ops.mkldnn._convolution_pointwise(
                x, c.weight, c.bias, c.padding, c.stride, c.dilation, c.groups, "relu", [], ""
            )
        return torch.relu(c(x))


def fuse_for_inference(module: nn.Module) -> nn.Module:
    """For inference (eval mode): fold each BatchNorm2d into the Conv2d before it, and join a
    Conv2d with the ReLU after it. The outputs stay the same up to rounding."""
    if isinstance(module, nn.Sequential):
        layers: list[nn.Module] = []
        for layer in (fuse_for_inference(m) for m in module):
            if isinstance(layer, nn.BatchNorm2d) and layers and isinstance(layers[-1], nn.Conv2d):
                layers[-1] = fuse_conv_bn_eval(layers[-1], layer)
            elif isinstance(layer, nn.ReLU) and layers and isinstance(layers[-1], nn.Conv2d):
                layers[-1] = ConvReLU(layers[-1])
            else:
                layers.append(layer)
        return nn.Sequential(*layers)
    for name, child in module.named_children():
        setattr(module, name, fuse_for_inference(child))
    return module


# Checkpoints name their architecture; loading looks it up here, so adding a network is one entry.
ARCHITECTURES: dict[str, type[nn.Module]] = {"GenderNet": GenderNet}
