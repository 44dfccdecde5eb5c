"""The freeze pass: substitutes that train in one form and deploy in another switch to the
deployable one (`substitutes.deployable`; binary: latent fp weights → 1-bit packed words).

The deployable form computes what the training form computes in eval mode (which is what
per-site validation measured); the gate timed the deployable form, end_to_end measures the
frozen model, and the training stages (layer-wise, distill) are over.
"""

from __future__ import annotations

from torch import fx, nn

from ..substitutes import deployable


def freeze(gm: fx.GraphModule, placed: list[dict]) -> tuple[fx.GraphModule, dict[str, nn.Module]]:
    """Swap each placed substitute (`placed`: the substitute pass's records) for its deployable
    form; returns the graph and, per site key, the module now in it (only those that changed)."""
    frozen = {}
    for p in placed:
        module = gm.get_submodule(p["target"])
        final = deployable(module)
        if final is module:
            continue
        gm.set_submodule(p["target"], final)
        frozen[p["site"]] = final
    gm.graph.lint()
    gm.recompile()
    return gm, frozen
