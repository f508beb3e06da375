"""DenseNet-B encoder of the CAN handwritten-math recognizer, with CAN's state_dict layout.

Each layer registers its BatchNorm before the conv it follows, as CAN does; that order fixes
the order of the checkpoint keys. The pools stay functional calls, as in CAN.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class DenseBottleneck(nn.Module):
    """1×1 conv to 4·growth and 3×3 conv to growth (each BN-ReLU-dropout), concatenated to x."""

    def __init__(self, in_chans: int, growth_rate: int, use_dropout: bool) -> None:
        super().__init__()
        inter_chans = 4 * growth_rate
        self.bn1 = nn.BatchNorm2d(inter_chans)
        self.conv1 = nn.Conv2d(in_chans, inter_chans, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(growth_rate)
        self.conv2 = nn.Conv2d(inter_chans, growth_rate, kernel_size=3, padding=1, bias=False)
        self.dropout = nn.Dropout(p=0.2) if use_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x)), inplace=True))
        out = self.dropout(F.relu(self.bn2(self.conv2(out)), inplace=True))
        return torch.cat((x, out), 1)


class DenseTransition(nn.Module):
    """1×1 conv (BN-ReLU-dropout) followed by a 2×2 average pool that rounds odd sizes up."""

    def __init__(self, in_chans: int, out_chans: int, use_dropout: bool) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(out_chans)
        self.conv1 = nn.Conv2d(in_chans, out_chans, kernel_size=1, bias=False)
        self.dropout = nn.Dropout(p=0.2) if use_dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dropout(F.relu(self.bn1(self.conv1(x)), inplace=True))
        return F.avg_pool2d(out, 2, ceil_mode=True)


class DenseNet100(nn.Module):
    """7×7/2 conv, ReLU, 2×2 max pool, then three dense blocks joined by two transitions.

    Output stride 16 (odd sizes round up); with the defaults the output has 684 channels.
    """

    def __init__(
        self,
        in_chans: int = 1,
        growth_rate: int = 24,
        reduction: float = 0.5,
        use_dropout: bool = True,
        num_blocks: int = 16,
    ) -> None:
        super().__init__()
        chans = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_chans, chans, kernel_size=7, stride=2, padding=3, bias=False)
        self.dense1 = self._dense_block(chans, growth_rate, num_blocks, use_dropout)
        chans += num_blocks * growth_rate
        out_chans = math.floor(chans * reduction)
        self.trans1 = DenseTransition(chans, out_chans, use_dropout)
        chans = out_chans
        self.dense2 = self._dense_block(chans, growth_rate, num_blocks, use_dropout)
        chans += num_blocks * growth_rate
        out_chans = math.floor(chans * reduction)
        self.trans2 = DenseTransition(chans, out_chans, use_dropout)
        chans = out_chans
        self.dense3 = self._dense_block(chans, growth_rate, num_blocks, use_dropout)

    @staticmethod
    def _dense_block(
        in_chans: int, growth_rate: int, num_blocks: int, use_dropout: bool
    ) -> nn.Sequential:
        return nn.Sequential(
            *(
                DenseBottleneck(in_chans + i * growth_rate, growth_rate, use_dropout)
                for i in range(num_blocks)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.conv1(x), inplace=True)
        out = F.max_pool2d(out, 2, ceil_mode=True)
        out = self.trans1(self.dense1(out))
        out = self.trans2(self.dense2(out))
        return self.dense3(out)


def densenet100(
    in_chans: int = 1,
    growth_rate: int = 24,
    reduction: float = 0.5,
    use_dropout: bool = True,
    num_blocks: int = 16,
) -> DenseNet100:
    """CAN's DenseNet-100 encoder (3 dense blocks of ``num_blocks`` bottlenecks), no classifier."""
    return DenseNet100(in_chans, growth_rate, reduction, use_dropout, num_blocks)
