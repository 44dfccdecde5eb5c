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


class Bottleneck(nn.Module):
    def __init__(self, cin, width, stride):
        super().__init__()
        cout = width * 4
        self.body = nn.Sequential(
            nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
            nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.skip = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return torch.relu(self.body(x) + self.skip(x))


def resnet50_shaped(width: int = 8) -> nn.Module:
    """ResNet-50's topology ([3, 4, 6, 3] bottleneck blocks, 53 convolutions), narrow."""
    layers, cin = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], width
    for i, blocks in enumerate([3, 4, 6, 3]):
        for b in range(blocks):
            layers.append(Bottleneck(cin, width * 2 ** i, 2 if b == 0 and i else 1))
            cin = width * 2 ** i * 4
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)).eval()


def test_a_resnet50_report_stays_readable():
    import fxopt
    from fxopt.html import report_page
    from fxopt.rules import parse

    torch.manual_seed(0)
    rules = parse("version: 1\nrules:\n  - substitute: kron\n    match: {op: conv2d, name: '15.*'}\n"
                  "    params: {rank: full, max_flops_ratio: null}\n")
    result = fxopt.optimize(resnet50_shaped(), (torch.randn(1, 3, 64, 64),), rules, time_sites=False)
    applied = [s for s in result.report["sites"] if s["status"] == "applied"]
    assert len(result.report["sites"]) == 54 and len(applied) == 3  # the last block's three convs
    page = report_page(result.report)
    nodes = len(result.report["graphs"]["original"]["nodes"])
    drawn = page.count('class="node ') // 2  # per graph
    assert nodes > 150 and drawn < nodes / 2, (nodes, drawn)  # 189 nodes → 79 boxes
    assert page.count('href="#site-15.body.') >= 3  # the rewritten sites are drawn and linked
