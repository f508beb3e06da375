"""ConvNeXt with torchvision's module layout, so torchvision checkpoints load unchanged."""

import torch
import torch.nn as nn
import torch.nn.functional as F


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


class Permute(nn.Module):
    """Permutes the dimensions of its input."""

    def __init__(self, dims: list[int]) -> None:
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(self.dims)


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class CNBlock(nn.Module):
    """ConvNeXt block: depthwise 7×7, LayerNorm, MLP ×4 with GELU, layer scale, residual."""

    def __init__(self, dim: int, layer_scale: float, stochastic_depth_prob: float) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim),
            Permute([0, 2, 3, 1]),
            nn.LayerNorm(dim, eps=1e-6),
            nn.Linear(dim, 4 * dim),
            nn.GELU(),
            nn.Linear(4 * dim, dim),
            Permute([0, 3, 1, 2]),
        )
        self.layer_scale = nn.Parameter(torch.ones(dim, 1, 1) * layer_scale)
        self.stochastic_depth = StochasticDepth(stochastic_depth_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.stochastic_depth(self.layer_scale * self.block(x))


class ConvNeXt(nn.Module):
    """ConvNeXt: a 4×4/4 patchify stem, four stages of CNBlocks joined by 2×2/2 downsamplers.

    ``features`` holds the stem at index 0, then alternately a stage and a downsampler.
    """

    def __init__(
        self,
        dims: list[int],
        depths: list[int],
        in_chans: int = 3,
        num_classes: int = 1000,
        stochastic_depth_prob: float = 0.1,
        layer_scale: float = 1e-6,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [
            nn.Sequential(
                nn.Conv2d(in_chans, dims[0], kernel_size=4, stride=4),
                LayerNorm2d(dims[0], eps=1e-6),
            )
        ]
        total_blocks = sum(depths)
        block_id = 0
        for i, (dim, depth) in enumerate(zip(dims, depths, strict=True)):
            blocks: list[nn.Module] = []
            for _ in range(depth):
                sd_prob = stochastic_depth_prob * block_id / (total_blocks - 1.0)
                blocks.append(CNBlock(dim, layer_scale, sd_prob))
                block_id += 1
            layers.append(nn.Sequential(*blocks))
            if i + 1 < len(dims):
                layers.append(
                    nn.Sequential(
                        LayerNorm2d(dim, eps=1e-6),
                        nn.Conv2d(dim, dims[i + 1], kernel_size=2, stride=2),
                    )
                )
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            LayerNorm2d(dims[-1], eps=1e-6), nn.Flatten(1), nn.Linear(dims[-1], num_classes)
        )

        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(x)


def convnext_tiny(in_chans: int = 3, num_classes: int = 1000) -> ConvNeXt:
    """ConvNeXt-Tiny: widths 96-768, depths 3-3-9-3, stochastic depth 0.1."""
    return ConvNeXt([96, 192, 384, 768], [3, 3, 9, 3], in_chans, num_classes)
