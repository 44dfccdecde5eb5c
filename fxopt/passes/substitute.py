"""The substitute pass: put accepted substitutes into the graph.

A `module` site keeps its node; the module at its qualified path is swapped for the substitute,
so names in the rewritten model stay the user's (unless something else still uses that module:
then the call gets its own substitute under `fxopt_sites.`). `functional` and `matmul` sites have no module
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
    replaced: dict[fx.Node, fx.Node] = {}  # an earlier site's output → the node that replaced it
    for site, module in accepted:
        if site.form == "module" and _only_user(gm, site.output):
            _swap_module(gm, site.output.target, module)
            target = site.output.target
        elif site.form == "module":  # the module is shared: give this call its own substitute
            target = _site_target(site)
            gm.add_submodule(target, module)
            site.output.target = target
        else:
            target = _site_target(site)
            gm.add_submodule(target, module)
            with gm.graph.inserting_before(site.output):
                node = gm.graph.call_module(target, (replaced.get(site.input, site.input),))
            node.meta = dict(site.output.meta)
            site.output.replace_all_uses_with(node)
            replaced[site.output] = node
            for old in reversed(site.nodes):  # output first; a shared w.t() may stay for others
                if not old.users:
                    params = [n for n in old.all_input_nodes if n.op == "get_attr"]
                    gm.graph.erase_node(old)
                    for p in params:  # a parameter read only by this site is read no more
                        if not p.users:
                            gm.graph.erase_node(p)
        records.append({"site": site.key, "target": target, "module": type(module).__name__})
    gm.graph.lint()
    gm.recompile()
    return gm, records


def _site_target(site: Site) -> str:
    return f"{SITES_PREFIX}.{re.sub(r'[^0-9A-Za-z_]', '_', site.key)}"


def _only_user(gm: fx.GraphModule, call: fx.Node) -> bool:
    """True when no other live node calls this module or reads its parameters."""
    path = call.target
    for n in gm.graph.nodes:
        if n is call:
            continue
        if n.op == "call_module" and n.target == path:
            return False
        if n.op == "get_attr" and n.users and (n.target == path or n.target.startswith(path + ".")):
            return False
    return True


def _swap_module(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    gm.set_submodule(path, module)
