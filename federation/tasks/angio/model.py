"""The angiography task's models: a small CNN, an MLP baseline and a ResNet, all made of
layers the encrypted engine supports.
"""

from __future__ import annotations

import torch
from torch import nn

_RESNET_DEFAULTS: dict[str, int] = {"channels": 8, "blocks": 1}


def _input_pool(image_size: int) -> nn.Module:
    """Average-pools the input to about 32x32 (identity for images that small already)."""
    pool = max(1, image_size // 32)
    return nn.AvgPool2d(pool) if pool > 1 else nn.Identity()


class ResidualBlock(nn.Module):
    """torchvision's BasicBlock at constant width: conv-bn-relu-conv-bn, plus the skip, relu."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + x)


class AngioResNet(nn.Module):
    """A small ResNet: pool to ~32x32 -> Conv(1->c, 5x5, stride 2) -> BN -> ReLU -> MaxPool(2)
    -> ``blocks`` x ResidualBlock(c) -> AvgPool(2) -> Linear (logits).

    At 64x64 with c = 8 and one block: 8x8 feature maps in the block, 2.4k parameters and
    0.13 MMAC per image like ``cnn``, but about 2.5x its encrypted cost (batch norm, ReLU and
    max-pooling at 16x16). Plain modules, so the engine traces it with torch.fx.
    """

    def __init__(
        self, image_size: int = 64, num_classes: int = 8, channels: int = 8, blocks: int = 1
    ) -> None:
        super().__init__()
        if channels < 1 or blocks < 0:
            raise ValueError(
                f"resnet needs channels >= 1 and blocks >= 0, got {channels}, {blocks}"
            )
        self.pool = _input_pool(image_size)
        self.conv1 = nn.Conv2d(1, channels, kernel_size=5, stride=2, padding=2, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        self.maxpool = nn.MaxPool2d(2)
        self.layer1 = nn.Sequential(*(ResidualBlock(channels) for _ in range(blocks)))
        self.avgpool = nn.AvgPool2d(2)
        with torch.no_grad():
            features = self.features(torch.zeros(1, 1, image_size, image_size)).shape[1]
        self.fc = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(self.pool(x)))))
        return torch.flatten(self.avgpool(self.layer1(x)), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def build_model(
    arch: str = "cnn", *, image_size: int = 64, num_classes: int = 8, **options: int
) -> nn.Module:
    """A small classifier made only of layers the encrypted engine supports.

    The input is first average-pooled to about 32x32: vessels at 64x64 are one or two pixels
    wide, and pooling keeps their contrast while quartering every later cost, which matters
    at ~8x under encryption. ``cnn``: Conv(1->8, 5x5, stride 2) -> Tanh -> AvgPool(2) ->
    Conv(8->16, 3x3) -> Tanh -> AvgPool(2) -> Linear (3.4k parameters and 0.13 MMAC per
    64x64 image). ``mlp``: pool to 8x8 -> Linear(64) -> Tanh -> Linear, a cheaper baseline.
    ``resnet``: :class:`AngioResNet` (ReLU, batch norm, max-pooling and a residual block; an
    ordinary ``nn.Module`` the engine traces), options ``channels`` and ``blocks``. Outputs
    are logits for softmax cross-entropy.
    """
    if arch not in ("cnn", "mlp", "resnet"):
        raise ValueError(f"unknown angio arch {arch!r}; choose 'cnn', 'mlp' or 'resnet'")
    allowed = set(_RESNET_DEFAULTS) if arch == "resnet" else set()
    unknown = set(options) - allowed
    if unknown:
        takes = ", ".join(["image_size", "num_classes", *sorted(allowed)])
        raise TypeError(
            f"unknown model.options for {arch!r}: {', '.join(sorted(unknown))} (it takes {takes})"
        )
    if arch == "resnet":
        settings = {**_RESNET_DEFAULTS, **options}
        return AngioResNet(
            image_size, num_classes, int(settings["channels"]), int(settings["blocks"])
        )
    pool = max(1, image_size // 32)
    head: list[nn.Module] = [nn.AvgPool2d(pool)] if pool > 1 else []
    if arch == "cnn":
        layers = head + [
            nn.Conv2d(1, 8, kernel_size=5, stride=2, padding=2),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Conv2d(8, 16, kernel_size=3, padding=1),
            nn.Tanh(),
            nn.AvgPool2d(2),
            nn.Flatten(),
        ]
    else:
        layers = head + [nn.AvgPool2d(4), nn.Flatten()]
    with torch.no_grad():
        features = nn.Sequential(*layers)(torch.zeros(1, 1, image_size, image_size)).shape[1]
    if arch == "mlp":
        layers += [nn.Linear(features, 64), nn.Tanh()]
        features = 64
    return nn.Sequential(*layers, nn.Linear(features, num_classes))
