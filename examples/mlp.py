"""An MLP classifier: 784 → 512 → 512 → 10 (MNIST-sized), seeded random weights.

    fxopt optimize examples/mlp.py --rules kron --out out/mlp
"""

import torch
from torch import nn


def build_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    ).eval()


def example_inputs():
    return (torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(1)),)


def calibration_data():
    g = torch.Generator().manual_seed(2)
    for _ in range(4):
        yield (torch.randn(32, 1, 28, 28, generator=g),)
