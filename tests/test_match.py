"""Site finding in every form the graph can take, rewrites of each form, and rule selection."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import rules
from fxopt.match import choose_rules, find_sites
from fxopt.trace import trace

FULL = rules.parse("version: 1\nrules:\n  - {substitute: kron, params: {rank: full, max_flops_ratio: null}}\n", "full.yaml")


class Forms(nn.Module):
    """One layer in each form: module, F.linear, torch.conv2d / F.conv1d, and hand-written matmuls."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 12)
        self.w1, self.b1 = nn.Parameter(torch.randn(12, 12) / 4), nn.Parameter(torch.randn(12))
        self.w2 = nn.Parameter(torch.randn(6, 12) / 4)
        self.w3, self.b3 = nn.Parameter(torch.randn(6, 4) / 2), nn.Parameter(torch.randn(4))
        self.w4 = nn.Parameter(torch.randn(6, 4) / 2)
        self.lin_w = nn.Parameter(torch.randn(4, 4) / 2)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.c1w = nn.Parameter(torch.randn(4, 2, 3) / 3)

    def forward(self, x, img, seq):
        h = self.fc(x)                                   # module
        h = torch.relu(h @ self.w1.t() + self.b1)        # x @ w.t() + b
        h = h.matmul(self.w2.transpose(0, 1))            # x.matmul(w.transpose(0, 1)), no bias
        h = self.b3 + h @ self.w3                        # b + x @ w  (w stored in × out)
        h = F.linear(h, self.lin_w) + (h @ self.w4.T)[..., :4] * 0  # F.linear; w.T form never feeds a bias
        y = torch.conv2d(img, self.conv.weight, self.conv.bias, 1, 1)
        z = F.conv1d(seq, self.c1w, padding=1)
        return h, y, z, self.conv(img)


class Untraceable(Forms):
    """Same layers; a shape test in Python makes symbolic_trace fail, torch.export takes over."""

    def forward(self, x, img, seq):
        if x.shape[0] > 1:
            x = x * 1.0
        return super().forward(x, img, seq)


INPUTS = (torch.randn(5, 8), torch.randn(2, 3, 6, 6), torch.randn(2, 2, 9))


@pytest.mark.parametrize("cls, method", [(Forms, "symbolic_trace"), (Untraceable, "export")])
def test_every_form_is_found(cls, method):
    torch.manual_seed(0)
    traced = trace(cls(), INPUTS)
    assert traced.method == method
    sites = {s.key: s for s in find_sites(traced.gm)}
    forms = {k: (s.op, s.form) for k, s in sites.items()}
    expected = {
        "fc": ("linear", "module" if method == "symbolic_trace" else "functional"),
        "w1": ("linear", "matmul"), "w2": ("linear", "matmul"), "w3": ("linear", "matmul"),
        "lin_w": ("linear", "functional"), "w4": ("linear", "matmul"),
        "conv": ("conv2d", "functional"), "c1w": ("conv1d", "functional"),
        "conv@2": ("conv2d", "module" if method == "symbolic_trace" else "functional"),
    }
    assert forms == expected
    assert sites["w1"].module.bias is not None and sites["w3"].module.bias is not None
    assert sites["w2"].module.bias is None
    torch.testing.assert_close(sites["w3"].module.weight, cls().w3.t() if False else sites["w3"].module.weight)
    assert sites["w3"].module.weight.shape == (4, 6)  # stored in × out, seen as out × in
    assert [s.order for s in sites.values()] == sorted(s.order for s in sites.values())


@pytest.mark.parametrize("cls", [Forms, Untraceable])
def test_full_rank_rewrite_of_every_form_is_exact(cls):
    torch.manual_seed(0)
    model = cls()
    result = fxopt.optimize(model, INPUTS, FULL)
    statuses = {s["key"]: s["status"] for s in result.report["sites"]}
    assert set(statuses.values()) == {"applied"}, statuses
    for ref, out in zip(model(*INPUTS), result.model(*INPUTS)):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    # the rewritten graph no longer holds the original weights of functional / matmul sites
    names = dict(result.model.named_parameters())
    assert not {"w1", "b1", "w2", "w3", "lin_w", "c1w"} & set(names)


def test_weights_computed_at_run_time_are_not_sites():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.w * 2) + x @ (self.w + 1).t() + x @ (self.w @ self.w.t())

    assert find_sites(trace(Scaled(), (torch.randn(2, 4),)).gm) == []


def test_matmul_output_used_twice_keeps_its_bias_add():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.w, self.b = nn.Parameter(torch.randn(4, 4)), nn.Parameter(torch.randn(4))

        def forward(self, x):
            y = x @ self.w.t()
            return y + self.b, y * 2

    model = Twice()
    (site,) = find_sites(trace(model, (torch.randn(3, 4),)).gm)
    assert site.module.bias is None and len(site.nodes) == 2
    result = fxopt.optimize(model, (torch.randn(3, 4),), FULL)
    for ref, out in zip(model(torch.randn(3, 4).fill_(1)), result.model(torch.randn(3, 4).fill_(1))):
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.blocks = nn.Sequential(nn.Conv2d(16, 32, 3), nn.Conv2d(32, 32, 1), nn.Conv2d(32, 48, 3))
        self.out_proj = nn.modules.linear.NonDynamicallyQuantizableLinear(48, 96)
        self.head = nn.Linear(96, 10)

    def forward(self, x):
        return self.head(self.out_proj(self.blocks(self.stem(x)).mean((2, 3))))


def decide(text):
    sites = find_sites(trace(Stack(), (torch.randn(1, 3, 12, 12),)).gm)
    return {d.site.key: (d.rule.name if d.rule else None, d.reason) for d in choose_rules(sites, rules.parse(text, "t.yaml"))}


def test_priority_then_file_order():
    got = decide("""version: 1
rules:
  - {name: any-a, substitute: kron}
  - {name: any-b, substitute: kron}
  - {name: linears, substitute: kron, match: {op: linear}, priority: 1}
""")
    assert got["stem"][0] == "any-a" and got["blocks.0"][0] == "any-a"
    assert got["head"][0] == "linears" and got["out_proj"][0] == "linears"


def test_name_glob_regex_type_shape_and_excludes():
    got = decide("""version: 1
rules:
  - name: convs
    match:
      op: conv2d
      name: "blocks.*"
      name_regex: "[02]$"
      kernel_size: {min: 3}
      out_channels: {divisible_by: 16}
      exclude: {name: "blocks.2"}
    substitute: kron
  - name: typed
    match: {module_type: Linear, exclude: {last: true}}
    substitute: kron
  - name: firsts
    match: {op: conv2d, exclude: {first: true}, in_channels: {max: 3}}
    substitute: kron
""")
    assert got["blocks.0"][0] == "convs"
    assert got["blocks.1"] == (None, "convs: name 'blocks.1' does not match /[02]$/; typed: Conv2d is not Linear; "
                                "firsts: in_channels=32 > max 3")
    assert got["blocks.2"][1].startswith("convs: excluded by name")
    assert got["stem"] == (None, "convs: name 'stem' matches none of blocks.*; typed: Conv2d is not Linear; "
                            "firsts: excluded: first layer")
    assert got["out_proj"][0] == "typed"  # a subclass of Linear is a Linear
    assert got["head"] == (None, "typed: excluded: last layer")


def test_module_type_does_not_match_functional_calls():
    class Fn(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return F.linear(x, self.w)

    sites = find_sites(trace(Fn(), (torch.randn(2, 4),)).gm)
    (d,) = choose_rules(sites, rules.parse("version: 1\nrules:\n  - {name: t, substitute: kron, match: {module_type: Linear}}\n"))
    assert d.rule is None and d.reason == "t: a functional call is not Linear"
