"""Train the weights that examples/digits.py ships (examples/digits.safetensors).

Data: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 scanned 8×8
images, 10 classes), pixels scaled to [0, 1], split by examples/digits.py's `split()` (fixed,
stratified: 1,347 training and 450 held-out images). The MLP is trained with AdamW on the training
images only; the held-out images are what `evaluate()` measures.

    python examples/digits_train.py            # writes examples/digits.safetensors (about a minute)
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits import WEIGHTS, MLP, accuracy, build_model, split  # noqa: E402


def train(epochs: int = 60, batch: int = 64, lr: float = 1e-3, seed: int = 0) -> MLP:
    torch.manual_seed(seed)
    (x, y), (xt, yt) = split()
    model = MLP()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for epoch in range(epochs):
        model.train()
        for idx in torch.randperm(len(x)).split(batch):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        if epoch % 10 == 9 or epoch == epochs - 1:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, held-out accuracy {accuracy(model, xt, yt):.2f} %")
    return model


if __name__ == "__main__":
    model = train()
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items()}, str(WEIGHTS),  # fp16: 1.1 MB
              metadata={"data": "sklearn.datasets.load_digits, examples/digits.py split()",
                        "script": "examples/digits_train.py"})
    WEIGHTS.chmod(0o644)
    (_, _), (xt, yt) = split()
    print(f"wrote {WEIGHTS}; the shipped model (fp16 weights, run in fp32): "
          f"held-out accuracy {accuracy(build_model(), xt, yt):.2f} %")
