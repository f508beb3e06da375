"""VGG-16 with batch norm, with torchvision's state_dict layout."""

import torch
import torch.nn as nn

# Configuration "D": output channels of each 3×3 conv, "M" for a 2×2 max pool.
VGG16_CFG: list[int | str] = [
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
]  # fmt: skip


def make_features(cfg: list[int | str], in_chans: int) -> nn.Sequential:
    """Build the feature stack: each int is a 3×3 conv + BN + ReLU, each "M" a 2×2/2 max pool."""
    layers: list[nn.Module] = []
    channels = in_chans
    for v in cfg:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            out = int(v)
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """Conv-BN-ReLU feature stack, 7×7 adaptive average pool and a three-layer MLP head."""

    def __init__(
        self, cfg: list[int | str], in_chans: int = 3, num_classes: int = 1000, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = make_features(cfg, in_chans)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16_bn(in_chans: int = 3, num_classes: int = 1000) -> VGG:
    """VGG-16 with batch norm."""
    return VGG(VGG16_CFG, in_chans, num_classes)
