"""A deterministic image-classification task with real spatial structure, generated here (no
download): ten classes of shapes and textures on noisy, smoothly varying backgrounds.

    disk · ring · square · square outline · triangle · plus · cross (×) · horizontal stripes ·
    vertical stripes · checkerboard

Each image draws its class's shape at a random position, size (a third to two thirds of the
image), small rotation (±20°, so × and + stay apart), foreground and background colour, then adds
a low-frequency colour field and white noise. Telling the classes apart needs local edges and
textures combined over space, which is what convolutions learn; the noise keeps the task from
being trivially separable. Same seed, same images, at any resolution.

    >>> x, y = make_shapes(1000, size=32, seed=0)      # x: (1000, 3, 32, 32) float32, y: (1000,)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

CLASSES = ("disk", "ring", "square", "outline", "triangle", "plus", "cross", "hstripes", "vstripes", "checker")


def _masks(label: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """Soft-edged masks (N, H, W) of each image's class shape in its rotated coordinates."""
    r = r[:, None, None]
    f = freq[:, None, None]
    rad = (u.square() + v.square()).sqrt()
    box = torch.maximum(u.abs(), v.abs())
    du, dv = (u + v) / math.sqrt(2), (u - v) / math.sqrt(2)  # 45° turn for the cross
    bar = 0.28 * r
    inside_box = box < r
    shapes = torch.stack([
        rad < r,
        (rad - 0.75 * r).abs() < 0.22 * r,
        box < 0.85 * r,
        (box - 0.75 * r).abs() < 0.18 * r,
        (v > -0.5 * r) & (v < r - math.sqrt(3) * u.abs()),
        ((u.abs() < bar) & (v.abs() < r)) | ((v.abs() < bar) & (u.abs() < r)),
        ((du.abs() < bar) & (dv.abs() < r)) | ((dv.abs() < bar) & (du.abs() < r)),
        inside_box & (torch.sin(v * f) > 0),
        inside_box & (torch.sin(u * f) > 0),
        inside_box & (torch.sin(u * f) * torch.sin(v * f) > 0),
    ], dim=1)  # (N, 10, H, W)
    return shapes[torch.arange(len(label)), label].float()


def make_shapes(n: int, size: int = 32, seed: int = 0, noise: float = 0.15) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (3 × size × size, roughly zero-mean) and their labels, balanced over the classes."""
    g = torch.Generator().manual_seed(seed)
    label = torch.arange(n) % len(CLASSES)
    label = label[torch.randperm(n, generator=g)]
    rnd = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    r = (0.17 + 0.17 * rnd(n)) * size  # shape radius: a third to two thirds of the image across
    cx = (0.5 + (rnd(n) - 0.5) * 0.4) * size
    cy = (0.5 + (rnd(n) - 0.5) * 0.4) * size
    theta = (rnd(n) - 0.5) * math.radians(40)
    freq = (2 * math.pi) / (r * (0.55 + 0.3 * rnd(n)))  # stripe period: about two thirds of the radius
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    mask = _masks(label, u, v, r, freq)
    mask = F.avg_pool2d(mask[:, None], 3, 1, 1)  # soft edges, as a camera blurs them
    bg, fg = rnd(n, 3, 1, 1), rnd(n, 3, 1, 1)
    fg = torch.where((fg - bg).abs().sum(1, keepdim=True) < 0.6, 1 - fg, fg)  # keep the shape visible
    field = F.interpolate(rnd(n, 3, 4, 4) - 0.5, size=(size, size), mode="bilinear", align_corners=False)
    x = bg + (fg - bg) * mask + 0.25 * field + noise * torch.randn(n, 3, size, size, generator=g)
    return ((x - 0.5) / 0.5).float(), label
