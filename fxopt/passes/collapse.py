"""The collapse pass: attention modules whose projections were all left as they were go back to
being one call of the module (fxopt/attention.py opened them up for matching).

The user's module then runs as before, with PyTorch's fused eval fast path
(`_native_multi_head_attention`, `_transformer_encoder_layer_fwd`, nested tensors); a module with
at least one rewritten projection keeps the expanded graph, which is PyTorch's non-fused path.
"""

from __future__ import annotations

from typing import Iterable

from torch import fx

from ..attention import Region, collapse_region, open_region


def collapse(gm: fx.GraphModule, regions: Iterable[Region], rewritten: set[fx.Node]) -> tuple[fx.GraphModule, list[dict]]:
    """Collapse every region none of whose nodes a site rewrite replaced (`rewritten`: the nodes
    of the applied sites); a record per region says which way it went."""
    records = []
    for region in regions:
        touched = sorted({n.name for n in region.nodes if n in rewritten})
        if touched:
            open_region(gm, region)
        else:
            collapse_region(gm, region)
        records.append({"module": region.path, "type": region.module_type,
                        "expanded": bool(touched)})
    gm.graph.lint()
    gm.recompile()
    return gm, records
