"""The seed write-up's modified ResNet-50, re-typed as a test fixture (not a test file).

The write-up (a Chinese blog post on replacing CAN's DenseNet-B encoder with a
ResNet-50) ends with the full code of the network it trained. This is that code with
only cosmetic changes (``super().__init__()``, an unused loop variable renamed); the
structure, module names and forward are the seed's:

- ``Bottleneck`` ends its forward with ``Dropout(p=0.2)`` after the final ReLU;
- ``conv1`` takes 1 input channel;
- ``layer2`` is built with ``stride=1`` (so the output is at 1/16, not 1/32), and
  keeps its 1x1-conv + BN shortcut because the channel count changes;
- ``avgpool`` and ``fc`` are still constructed but never called;
- ``layer5 = Conv2d(2048, 684, 1, bias=False)`` and ``mybn1 = BatchNorm2d(684)`` end
  the forward, giving CAN's 684 channels.

``recipes/seed-hmer-resnet50.toml`` applied to the zoo's ``resnet50`` must compute
exactly this network; see ``tests/test_seed_recipe.py``.
"""

from __future__ import annotations

import torch.nn as nn


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.dropout = nn.Dropout(p=0.2)

    def forward(self, x):
        residual = x

        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)

        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)

        out = self.conv3(out)
        out = self.bn3(out)

        if self.downsample is not None:
            residual = self.downsample(x)

        out += residual
        out = self.relu(out)
        out = self.dropout(out)  # 20% not updated

        return out


class ResNet50(nn.Module):
    def __init__(self, block, layers, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=1)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self.layer5 = nn.Conv2d(2048, 684, kernel_size=1, bias=False)
        self.mybn1 = nn.BatchNorm2d(684)  # normalisation

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(
                    self.inplanes,
                    planes * block.expansion,
                    kernel_size=1,
                    stride=stride,
                    bias=False,
                ),
                nn.BatchNorm2d(planes * block.expansion),
            )

        layers = []
        layers.append(block(self.inplanes, planes, stride, downsample))
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))

        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)

        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.layer5(x)
        x = self.mybn1(x)
        return x


def seed_resnet50() -> ResNet50:
    """The seed's network as it built it: ``ResNet50(Bottleneck, [3, 4, 6, 3])``."""
    return ResNet50(Bottleneck, [3, 4, 6, 3])


# How the seed's state_dict keys map onto the patched zoo model's: conv1..layer4 keep
# their names, the appended projection is ``proj`` / ``proj_bn``; fc is never used.
SEED_TO_PATCHED = {"layer5.": "proj.", "mybn1.": "proj_bn."}
SEED_UNUSED = ("fc.",)


def patched_state_dict(seed_state: dict) -> dict:
    """The seed's state_dict renamed for the recipe-patched zoo ResNet-50."""
    out = {}
    for key, value in seed_state.items():
        if key.startswith(SEED_UNUSED):
            continue
        for old, new in SEED_TO_PATCHED.items():
            if key.startswith(old):
                key = new + key[len(old) :]
        out[key] = value
    return out
