"""A trained digit classifier with its held-out accuracy: fxopt's demo (`make demo`).

An MLP (64 → 512 → 512 → 512 → 10, ReLU) trained on scikit-learn's bundled handwritten digits
by examples/digits_train.py, its weights shipped next to this file as safetensors. `evaluate()`
measures accuracy on 450 held-out images that training never saw, so `fxopt optimize` reports
the accuracy of the saved model next to the original's, and examples/digits.yaml bounds it.

    fxopt optimize examples/digits.py --rules examples/digits.yaml --out out/digits
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

WEIGHTS = Path(__file__).with_name("digits.safetensors")
WIDTH = 512


class MLP(nn.Module):
    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(64, width), nn.Linear(width, width)
        self.fc3, self.head = nn.Linear(width, width), nn.Linear(width, 10)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.head(x)


def split() -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """(train images, labels), (held-out images, labels): a fixed stratified split of the digits."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target)
    xa, xb, ya, yb = train_test_split(x, y, test_size=450, stratify=y, random_state=0)
    return (xa, ya), (xb, yb)


def build_model() -> MLP:
    from safetensors.torch import load_file

    model = MLP()
    model.load_state_dict({k: v.float() for k, v in load_file(str(WEIGHTS)).items()})  # stored as fp16
    return model.eval()


def example_inputs():
    return (split()[0][0][:256],)


def calibration_data():
    """Training images only (the held-out ones are evaluate()'s)."""
    x = split()[0][0]
    for i in range(256, len(x) - 255, 256):
        yield (x[i:i + 256],)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item() * 100


def evaluate(model: nn.Module) -> dict[str, float]:
    """Top-1 accuracy (%) on the 450 held-out digits."""
    _, (x, y) = split()
    return {"accuracy": accuracy(model, x, y)}
