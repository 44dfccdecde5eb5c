"""The substitute pass: put accepted substitutes into the graph.

A `module` site keeps its node; the module at its qualified path is swapped for the substitute,
so names in the rewritten model stay the user's. `functional` and `matmul` sites have no module
of their own: their nodes are replaced by one `call_module` node on a new submodule under
`fxopt_sites.` (parameters they no longer use are dropped by `cleanup`).
"""

from __future__ import annotations

import re
from typing import Sequence

from torch import fx, nn

from ..match import Site

SITES_PREFIX = "fxopt_sites"


def substitute(gm: fx.GraphModule, accepted: Sequence[tuple[Site, nn.Module]]) -> tuple[fx.GraphModule, list[dict]]:
    """Rewrite `gm` in place with each (site, substitute); returns it and a record per site."""
    records = []
    for site, module in accepted:
        if site.form == "module":
            _swap_module(gm, site.output.target, module)
            target = site.output.target
        else:
            target = f"{SITES_PREFIX}.{re.sub(r'[^0-9A-Za-z_]', '_', site.key)}"
            gm.add_submodule(target, module)
            with gm.graph.inserting_before(site.output):
                node = gm.graph.call_module(target, (site.input,))
            node.meta = dict(site.output.meta)
            site.output.replace_all_uses_with(node)
            for old in reversed(site.nodes):  # output first; a shared w.t() may stay for others
                if not old.users:
                    gm.graph.erase_node(old)
        records.append({"site": site.key, "target": target, "module": type(module).__name__})
    gm.graph.lint()
    gm.recompile()
    return gm, records


def _swap_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(gm.get_submodule(parent) if parent else gm, child, module)
