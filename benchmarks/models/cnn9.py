"""A VGG-style CNN with nine 3×3 convolutions (widths 32-64-128-256, 32×32 inputs), He-initialised
with a fixed seed: a model with enough sites for the layer-wise training benchmarks (random
weights: these measure time, not accuracy)."""

import torch
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    layers, cin = [], 3
    for cout, convs in ((32, 2), (64, 2), (128, 2), (256, 3)):
        for _ in range(convs):
            layers += [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU()]
            cin = cout
        layers.append(nn.MaxPool2d(2))
    model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(256 * 2 * 2, 10))
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return model.eval()


def example_inputs():
    return (torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    for _ in range(8):
        yield (torch.randn(16, 3, 32, 32, generator=g),)
