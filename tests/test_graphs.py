"""Report graphs: summaries of fx graphs, node matching, collapsing, and both drawing engines."""

import shutil

import pytest
import torch
from torch import fx, nn

from fxopt import graphs


def chain(n_relu: int) -> fx.GraphModule:
    layers = [nn.Linear(8, 8)] + [nn.ReLU() for _ in range(n_relu)] + [nn.Linear(8, 2)]
    return fx.symbolic_trace(nn.Sequential(*layers))


def test_summary_match_and_collapse():
    a = graphs.summarize(chain(5), {"_0": "0"})
    assert [n["op"] for n in a["nodes"]][:2] == ["placeholder", "call_module"]
    assert a["nodes"][1]["site"] == "0" and a["nodes"][1]["label"] == "0: Linear"
    ga = graphs.to_nx(a)
    gb = graphs.to_nx(graphs.summarize(chain(5)))
    assert graphs.match(ga, gb) == {n: n for n in ga}
    small = graphs.collapse(ga, keep={"_0"})
    collapsed = [n for n in small if small.nodes[n]["op"] == "collapsed"]
    assert len(collapsed) == 1 and small.nodes[collapsed[0]]["label"] == "6 unchanged nodes"  # 5 ReLUs + head
    assert small.number_of_nodes() == 4  # input, site, collapsed run, output


def test_match_follows_structure_when_names_differ():
    a = graphs.to_nx({"nodes": [{"name": "x", "op": "placeholder", "target": "x", "label": "x"},
                                {"name": "relu", "op": "call_function", "target": "relu", "label": "relu"}],
                      "edges": [["x", "relu"]]})
    b = graphs.to_nx({"nodes": [{"name": "x", "op": "placeholder", "target": "x", "label": "x"},
                                {"name": "relu_1", "op": "call_function", "target": "relu", "label": "relu"}],
                      "edges": [["x", "relu_1"]]})
    assert graphs.match(a, b) == {"x": "x", "relu": "relu_1"}


@pytest.mark.parametrize("engine", ["layered", "dot"])
def test_both_engines_draw_every_node_and_link_sites(engine):
    if engine == "dot" and not shutil.which("dot"):
        pytest.skip("graphviz is not installed")
    g = graphs.to_nx(graphs.summarize(chain(1), {"_0": "0"}))
    out = graphs.svg(g, "graph-x", engine=engine)
    assert out.startswith("<svg") and 'id="graph-x"' in out
    assert 'href="#site-0"' in out or "xlink:href=\"#site-0\"" in out
    for label in ("0: Linear", "1: ReLU", "2: Linear"):
        assert label in out
