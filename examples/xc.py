"""An extreme-classification head: 512-d features → 32,768 classes, the shape WTA hashing is for.

The weights stand in for a trained classifier: each class row is a unit-norm prototype, classes come
in families of 100 that share a direction (cosine ≈ 0.9 to their family's centre), and an input is
its class's prototype plus noise (cosine ≈ 0.8 to it), so the dense layer's top class is the true
one and its runners-up are siblings. Seeded: the same file gives the same model and data.

    fxopt optimize examples/xc.py --rules wta_hash --out out/xc
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

CLASSES, DIM, FAMILY = 32_768, 512, 100
SPREAD, NOISE = 0.3, 0.7  # within-family offset, input noise (norms; the prototypes have norm 1)


def prototypes(classes: int = CLASSES, dim: int = DIM, seed: int = 0) -> torch.Tensor:
    """(classes, dim) unit rows: family centre + SPREAD · own direction, normalised."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(max(1, classes // FAMILY), dim, generator=g), dim=1)
    family = torch.randint(0, centres.shape[0], (classes,), generator=g)
    own = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    return F.normalize(centres[family] + SPREAD * own, dim=1)


def samples(protos: torch.Tensor, n: int, seed: int, zipf: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n inputs (n, dim) and their labels: a random class's prototype + NOISE · gaussian/√dim.
    Classes are uniform, or with `zipf` = s > 0 long-tailed as labels of extreme classification
    are: the class of rank r (in a fixed random order) has probability ∝ r^-s."""
    g = torch.Generator().manual_seed(seed)
    classes = protos.shape[0]
    if zipf > 0:
        ranked = torch.randperm(classes, generator=torch.Generator().manual_seed(classes))
        weights = torch.arange(1, classes + 1, dtype=torch.float64) ** -zipf
        labels = ranked[torch.multinomial(weights, n, replacement=True, generator=g)]
    else:
        labels = torch.randint(0, classes, (n,), generator=g)
    noise = torch.randn(n, protos.shape[1], generator=g) * (NOISE / math.sqrt(protos.shape[1]))
    return protos[labels] + noise, labels


def build_model() -> nn.Module:
    head = nn.Linear(DIM, CLASSES)
    with torch.no_grad():
        head.weight.copy_(prototypes() * 8)  # logits on the scale a trained head produces
        head.bias.zero_()
    return nn.Sequential(nn.LayerNorm(DIM, elementwise_affine=False), head).eval()


def example_inputs():
    return (samples(prototypes(), 16, seed=1)[0],)


def calibration_data():
    protos = prototypes()
    for seed in range(2, 6):
        yield (samples(protos, 64, seed)[0],)
