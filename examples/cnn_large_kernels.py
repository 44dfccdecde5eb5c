"""An OverFeat-style CNN whose spatial kernels are all large enough to rescale (7×7/2, 5×5, 5×5,
max pooling, a linear head reading the flattened feature map), seeded weights, 64×64 inputs.

    fxopt rescale examples/cnn_large_kernels.py --factor 2 --out out/cnn-low
"""

import torch
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 32, 7, stride=2, padding=3), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(64, 64, 5, padding=2), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
    ).eval()


def example_inputs():
    return (torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1)),)
