"""EfficientNet with torchvision's module layout, so torchvision checkpoints load unchanged."""

import math

import torch
import torch.nn as nn


class StochasticDepth(nn.Module):
    """Drops whole residual branches per sample while training ("row" mode); identity in eval."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty_like(x[:, :1, :1, :1]).bernoulli_(keep)
        if keep > 0.0:
            mask = mask / keep
        return x * mask

    def extra_repr(self) -> str:
        return f"p={self.p}"


class ConvBNAct(nn.Sequential):
    """Conv2d (no bias, "same" padding) + BatchNorm2d, followed by SiLU when ``act`` is set."""

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(
                in_chans,
                out_chans,
                kernel_size,
                stride=stride,
                padding=(kernel_size - 1) // 2,
                groups=groups,
                bias=False,
            ),
            nn.BatchNorm2d(out_chans),
        ]
        if act:
            layers.append(nn.SiLU(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """Channel attention: global average, 1×1 conv down, SiLU, 1×1 conv up, sigmoid gate."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, 1)
        self.activation = nn.SiLU(inplace=True)
        self.scale_activation = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return x * self.scale_activation(scale)


class MBConv(nn.Module):
    """Inverted residual: optional 1×1 expansion, depthwise k×k, squeeze-excitation, 1×1 projection.

    The residual (with stochastic depth) is used when stride is 1 and the width is unchanged.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        expand_ratio: int,
        kernel_size: int,
        stride: int,
        stochastic_depth_prob: float,
    ) -> None:
        super().__init__()
        hidden = in_chans * expand_ratio
        layers: list[nn.Module] = []
        if hidden != in_chans:
            layers.append(ConvBNAct(in_chans, hidden, 1))
        layers += [
            ConvBNAct(hidden, hidden, kernel_size, stride=stride, groups=hidden),
            SqueezeExcitation(hidden, max(1, in_chans // 4)),
            ConvBNAct(hidden, out_chans, 1, act=False),
        ]
        self.block = nn.Sequential(*layers)
        self.use_residual = stride == 1 and in_chans == out_chans
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        if self.use_residual:
            out = x + self.stochastic_depth(out)
        return out


# (expand_ratio, kernel_size, stride, in_chans, out_chans, num_layers) per stage
B0_STAGES: list[tuple[int, int, int, int, int, int]] = [
    (1, 3, 1, 32, 16, 1),
    (6, 3, 2, 16, 24, 2),
    (6, 5, 2, 24, 40, 2),
    (6, 3, 2, 40, 80, 3),
    (6, 5, 1, 80, 112, 3),
    (6, 5, 2, 112, 192, 4),
    (6, 3, 1, 192, 320, 1),
]


class EfficientNet(nn.Module):
    """EfficientNet: 3×3/2 stem (features.0), MBConv stages (features.1-7), 1×1 head (features.8).

    Global average pooling and a dropout + linear classifier follow.
    """

    def __init__(
        self,
        stages: list[tuple[int, int, int, int, int, int]],
        in_chans: int = 3,
        num_classes: int = 1000,
        dropout: float = 0.2,
        stochastic_depth_prob: float = 0.2,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [ConvBNAct(in_chans, stages[0][3], 3, stride=2)]
        total_blocks = sum(stage[5] for stage in stages)
        block_id = 0
        for expand_ratio, kernel_size, stride, cin, cout, num_layers in stages:
            blocks: list[nn.Module] = []
            for i in range(num_layers):
                sd_prob = stochastic_depth_prob * block_id / total_blocks
                blocks.append(
                    MBConv(
                        cin if i == 0 else cout,
                        cout,
                        expand_ratio,
                        kernel_size,
                        stride if i == 0 else 1,
                        sd_prob,
                    )
                )
                block_id += 1
            layers.append(nn.Sequential(*blocks))
        last_chans = stages[-1][4]
        layers.append(ConvBNAct(last_chans, 4 * last_chans, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout, inplace=True), nn.Linear(4 * last_chans, num_classes)
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                init_range = 1.0 / math.sqrt(m.out_features)
                nn.init.uniform_(m.weight, -init_range, init_range)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def efficientnet_b0(in_chans: int = 3, num_classes: int = 1000) -> EfficientNet:
    """EfficientNet-B0: 16 MBConv blocks, 1280-channel head, dropout 0.2, stochastic depth 0.2."""
    return EfficientNet(B0_STAGES, in_chans, num_classes)
