"""The CIFAR-style ResNet of He et al. (2016), §4.2: ``depth = 6n + 2``.

Three stages of ``n`` basic blocks with 16, 32 and 64 filters on 32x32 inputs (stride 2
at the start of stages 2 and 3), global average pooling and a linear classifier.
Shortcuts that change shape are a 1x1 conv + BN (option B), so every conv is followed by
its own BatchNorm and the tracer maps all of them. ResNet-20/32/44/56/110 are
``cifar_resnet(20)`` ... ``cifar_resnet(110)``; build one from the CLI as ``cifar:resnet32``.
"""
from __future__ import annotations


import torch
from torch import nn

__all__ = ["cifar_resnet", "CifarResNet", "BasicBlock"]


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``."""
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x if self.downsample is None else self.downsample(x)
        return self.act(out + sc)


class CifarResNet(nn.Module):
    """``stem`` (conv3x3 16 + BN + ReLU), ``layer1..3``, ``fc``; stages are the blocks of docs/method.md §0."""

    def __init__(self, depth: int = 32, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth: must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        widths = [width, 2 * width, 4 * width]
        cin, stages = width, []
        for i, w in enumerate(widths):
            blocks = [BasicBlock(cin if j == 0 else w, w, stride=2 if (i > 0 and j == 0) else 1) for j in range(n)]
            stages.append(nn.Sequential(*blocks))
            cin = w
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]
        self.pretrained_cfg = {"input_size": (in_chans, 32, 32)}  # what trace() uses by default
        self.fc = nn.Linear(widths[-1], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def get_classifier(self) -> nn.Module:
        """The classifier (``fc``), as timm's ``get_classifier``."""
        return self.fc

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map after ``layer3`` (before pooling), as timm's ``forward_features``."""
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]``: features, global average pooling, ``fc``."""
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def cifar_resnet(depth: int = 32, num_classes: int = 10, in_chans: int = 3) -> CifarResNet:
    """ResNet-``depth`` for 32x32 images (He et al. 2016, §4.2); ``depth`` = 6n + 2."""
    return CifarResNet(depth=depth, num_classes=num_classes, in_chans=in_chans)
