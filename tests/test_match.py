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


# --- the other spellings of a linear layer ------------------------------------------------------

class Conv1D(nn.Module):
    """Hugging Face's GPT-2 `Conv1D`, as that library writes it: weight stored in × out."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) / nx ** 0.5)
        self.bias = nn.Parameter(torch.randn(nf) / 10)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Spellings(nn.Module):
    """A linear layer in each form real code writes besides nn.Linear / F.linear."""

    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(24, 8)                                            # torch.addmm(b, x, W)
        self.w_in, self.b_in = nn.Parameter(torch.randn(24, 16) / 5), nn.Parameter(torch.randn(16) / 10)
        self.w_shared = nn.Parameter(torch.randn(16, 16) / 4)                   # bmm against one matrix
        self.w_bad, self.b_bad = nn.Parameter(torch.randn(16, 16) / 4), nn.Parameter(torch.randn(16) / 10)
        self.w_oi = nn.Parameter(torch.randn(12, 16) / 4)                       # einsum, out × in
        self.w_io = nn.Parameter(torch.randn(12, 12) / 4)                       # einsum, in × out
        self.w_first = nn.Parameter(torch.randn(10, 12) / 4)                    # einsum, weight first

    def forward(self, x):
        h = self.c_attn(x)
        h = h @ self.w_in + self.b_in                                           # x @ W + b, W in × out
        h = torch.bmm(h, self.w_shared.t().unsqueeze(0).expand(h.shape[0], -1, -1))
        h = torch.baddbmm(self.b_bad, h, self.w_bad.expand(h.size(0), 16, 16))
        h = torch.einsum("...i,oi->...o", h, self.w_oi)
        h = torch.einsum("bsi,io->bso", h, self.w_io)
        return torch.einsum("oi,bsi->bso", self.w_first, h)


class UntraceableSpellings(Spellings):
    def forward(self, x):
        if x.shape[-1] > 1:
            x = x * 1.0
        return super().forward(x)


SPELLINGS = {"c_attn": (24, 8), "w_in": (16, 24), "w_shared": (16, 16), "w_bad": (16, 16), "w_oi": (12, 16),
             "w_io": (12, 12), "w_first": (10, 12)}


@pytest.mark.parametrize("cls, method", [(Spellings, "symbolic_trace"), (UntraceableSpellings, "export")])
def test_every_spelling_of_a_linear_is_a_site(cls, method):
    torch.manual_seed(0)
    m = cls()
    traced = trace(m, (torch.randn(3, 5, 8),))
    assert traced.method == method
    sites = {s.key: s for s in find_sites(traced.gm)}
    assert {k: tuple(s.module.weight.shape) for k, s in sites.items()} == SPELLINGS
    assert all(s.op == "linear" and s.form == "matmul" for s in sites.values())
    torch.testing.assert_close(sites["c_attn"].module.weight, m.c_attn.weight.t())  # seen as out × in
    torch.testing.assert_close(sites["w_shared"].module.weight, m.w_shared)
    torch.testing.assert_close(sites["w_bad"].module.weight, m.w_bad.t())
    torch.testing.assert_close(sites["w_io"].module.weight, m.w_io.t())
    assert sites["c_attn"].module.bias is not None and sites["w_bad"].module.bias is not None
    assert sites["c_attn"].params == ("c_attn.weight", "c_attn.bias")


@pytest.mark.parametrize("cls", [Spellings, UntraceableSpellings])
def test_every_spelling_rewrites_exactly_saves_and_loads(cls, tmp_path):
    torch.manual_seed(0)
    m = cls()
    x = torch.randn(3, 5, 8)
    result = fxopt.optimize(m, (x,), FULL, time_sites=False)
    assert {s["key"]: s["status"] for s in result.report["sites"]} == {k: "applied" for k in SPELLINGS}
    loaded = fxopt.load(result.save(tmp_path / "out"))
    other = torch.randn(6, 5, 8)
    for candidate in (result.model, loaded):
        torch.testing.assert_close(candidate(x), m(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(candidate(other), m(other), rtol=0, atol=1e-5)
    assert not {"c_attn.weight", "w_in", "w_shared", "w_bad", "w_oi", "w_io", "w_first"} & set(
        dict(result.model.named_parameters()))


@pytest.mark.parametrize("substitute, params", [
    ("kron", "{rank: full, max_flops_ratio: null}"),
    ("lowrank", "{max_flops_ratio: null}"),
    ("binary", "{mode: ternary}"),
])
def test_each_linear_substitute_applies_to_every_spelling(substitute, params):
    torch.manual_seed(0)
    m = Spellings()
    ruleset = rules.parse(f"version: 1\nrules:\n  - {{substitute: {substitute}, params: {params}}}\n", "t.yaml")
    result = fxopt.optimize(m, (torch.randn(3, 5, 8),), ruleset, time_sites=False)
    statuses = {s["key"]: s["status"] for s in result.report["sites"]}
    assert statuses == {k: "applied" for k in SPELLINGS}, [s["reason"] for s in result.report["sites"]]
    out = result.model(torch.randn(3, 5, 8))
    assert out.shape == (3, 5, 10) and torch.isfinite(out).all()


def test_wta_hash_applies_to_a_gpt2_style_head():
    """A wide output layer written as Conv1D (addmm, weight in × out) feeding the output."""
    torch.manual_seed(0)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(32, 32)
            self.lm_head = Conv1D(4096, 32)

        def forward(self, x):
            return self.lm_head(torch.relu(self.body(x)))

    ruleset = rules.parse("version: 1\nrules:\n  - {substitute: wta_hash, match: {op: linear, out_features: {min: 4096},"
                          " feeds: [output]}, params: {candidates: 1024}}\n", "t.yaml")
    result = fxopt.optimize(Head(), (torch.randn(4, 32),), ruleset, time_sites=False)
    sites = {s["key"]: s for s in result.report["sites"]}
    assert sites["lm_head"]["substitute"] == "wta_hash" and sites["lm_head"]["status"] == "applied"
    assert sites["lm_head"]["error"]["computed_share"] <= 0.25


def test_unrecognised_products_of_parameters_are_reported_as_not_seen():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.rnn = nn.LSTM(8, 8, batch_first=True)
            self.w_mv = nn.Parameter(torch.randn(8, 8))
            self.w_rows = nn.Parameter(torch.randn(8, 8))
            self.emb = nn.Embedding(10, 8)

        def forward(self, x, ids):
            h = self.fc(x) + self.emb(ids)
            h, _ = self.rnn(h)
            h = torch.einsum("bsi,ij,bsj->bs", h, self.w_mv, h)  # a bilinear form, not a linear layer
            return h + torch.mv(self.w_rows, x[0, 0]).sum()

    m = Odd().eval()
    result = fxopt.optimize(m, (torch.randn(2, 3, 8), torch.randint(0, 10, (2, 3))), FULL, time_sites=False)
    assert [s["key"] for s in result.report["sites"]] == ["fc"]
    missed = {n["param"]: n for n in result.report["not_seen"]}
    assert set(missed) == {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "w_mv", "w_rows"}
    assert missed["rnn.weight_ih_l0"]["op"] == "LSTM" and "does not open" in missed["rnn.weight_ih_l0"]["reason"]
    assert missed["w_rows"]["op"] == "mv"
    from fxopt.report import markdown

    assert "## Not seen" in markdown(result.report) and "`w_mv`" in markdown(result.report)
