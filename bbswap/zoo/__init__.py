"""The built-in zoo: backbones written in plain torch.

Every module in this package imports nothing but torch and the standard library, so
that the emitter can bundle a class's source into a standalone file verbatim.
The torchvision-compatible entries have exactly torchvision's state_dict layout, so
torchvision checkpoints load into them; ``densenet100`` has the layout of the
DenseNet-B used by the CAN handwritten-math recognizer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZooEntry:
    """A registered zoo backbone: where its builder lives and what it is."""

    name: str
    builder: str  # "module:function" inside bbswap.zoo
    family: str
    in_chans: int  # default input channels
    head: tuple[str, ...]  # top-level stages that form the classifier head
    description: str


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in (
        ZooEntry(
            "densenet100",
            "hmer:densenet100",
            "densenet",
            1,
            (),
            "DenseNet-B of the CAN math recognizer (growth 24, 3x16 bottlenecks), 684ch @ 1/16",
        ),
        ZooEntry(
            "resnet18",
            "resnet:resnet18",
            "resnet",
            3,
            ("avgpool", "fc"),
            "ResNet-18, torchvision layout",
        ),
        ZooEntry(
            "resnet34",
            "resnet:resnet34",
            "resnet",
            3,
            ("avgpool", "fc"),
            "ResNet-34, torchvision layout",
        ),
        ZooEntry(
            "resnet50",
            "resnet:resnet50",
            "resnet",
            3,
            ("avgpool", "fc"),
            "ResNet-50, torchvision layout",
        ),
        ZooEntry(
            "resnet101",
            "resnet:resnet101",
            "resnet",
            3,
            ("avgpool", "fc"),
            "ResNet-101, torchvision layout",
        ),
        ZooEntry(
            "resnet152",
            "resnet:resnet152",
            "resnet",
            3,
            ("avgpool", "fc"),
            "ResNet-152, torchvision layout",
        ),
        ZooEntry(
            "vgg16_bn",
            "vgg:vgg16_bn",
            "vgg",
            3,
            ("avgpool", "classifier"),
            "VGG-16 with batch norm, torchvision layout",
        ),
        ZooEntry(
            "mobilenet_v2",
            "mobilenet:mobilenet_v2",
            "mobilenet",
            3,
            ("classifier",),
            "MobileNetV2, torchvision layout",
        ),
        ZooEntry(
            "densenet121",
            "densenet:densenet121",
            "densenet",
            3,
            ("classifier",),
            "DenseNet-121, torchvision layout",
        ),
        ZooEntry(
            "convnext_tiny",
            "convnext:convnext_tiny",
            "convnext",
            3,
            ("avgpool", "classifier"),
            "ConvNeXt-Tiny, torchvision layout",
        ),
        ZooEntry(
            "efficientnet_b0",
            "efficientnet:efficientnet_b0",
            "efficientnet",
            3,
            ("avgpool", "classifier"),
            "EfficientNet-B0, torchvision layout",
        ),
    )
}
