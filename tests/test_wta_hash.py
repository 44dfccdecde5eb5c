"""The wta_hash substitute (Bakhtiary et al., arXiv 1504.07488): WTA codes against a loop over the
definition, candidate selection against brute-force collision counting, the layer against
nn.Linear (all outputs as candidates: equal forward and gradients; fewer: exact candidates, fill
elsewhere, zero gradients off the candidates), the table schedule, export, the rewrite end to end
with recall as its metric, and every kernel under the Triton interpreter against its reference."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fxopt
from fxopt import rules as rules_mod
from fxopt.codegen import registry
from fxopt.codegen.wta_hash import (
    band_tables, collision_counts, collision_counts_reference, dense_fallback, gathered_linear,
    gathered_linear_reference, select_reference, wta_codes, wta_codes_reference, wta_select,
)
from fxopt.errors import RuleError
from fxopt.substitutes import Decline, get
from fxopt.substitutes.wta_hash import WTAHashedLinear, exact, sampled_softmax_loss
from fxopt.validate import ErrorStats, RecallStats
from fxopt.wta import WTAHash, band_keys

from conftest import gpu_only, load_example


def _loop_codes(x: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """The definition, one window at a time: position of the first maximum among the K coordinates."""
    out = torch.zeros(x.shape[0], windows.shape[0], dtype=torch.long)
    for n in range(x.shape[0]):
        for l, window in enumerate(windows.tolist()):
            values = [x[n, i].item() for i in window]
            out[n, l] = values.index(max(values))
    return out


def _prototype_layer(classes=3000, dim=64, seed=0, **params) -> tuple[nn.Linear, torch.Tensor]:
    """A linear layer whose rows are unit prototypes, and 64 inputs near random rows."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    lin = nn.Linear(dim, classes)
    with torch.no_grad():
        lin.weight.copy_(protos)
        lin.bias.copy_(torch.randn(classes, generator=g) * 0.01)
    labels = torch.randint(0, classes, (64,), generator=g)
    x = protos[labels] + 0.3 * torch.randn(64, dim, generator=g) / math.sqrt(dim)
    return lin, x


# --- the hash family ------------------------------------------------------------------------------

def test_windows_are_k_windows_of_seeded_permutations():
    h = WTAHash(dim=20, k=4, num_hashes=12, bands=3, seed=7)
    assert h.windows.shape == (12, 4)
    for perm in h.windows.split(5):  # 20 // 4 = 5 windows per permutation, disjoint within it
        assert perm.flatten().unique().numel() == perm.numel()
    assert torch.equal(h.windows, WTAHash(20, 4, 12, 3, seed=7).windows)
    assert not torch.equal(h.windows, WTAHash(20, 4, 12, 3, seed=8).windows)
    assert h.buckets == 4 ** 4


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), dim=st.integers(4, 40), k=st.integers(2, 4), seed=st.integers(0, 2**16))
def test_codes_match_the_definition(n, dim, k, seed):
    h = WTAHash(dim, k, num_hashes=6, bands=2, seed=seed)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(wta_codes(x, h.windows), _loop_codes(x, h.windows))


def test_codes_depend_only_on_the_order_of_coordinates():
    """The property the paper relies on: WTA codes are invariant to any strictly increasing
    transform of the coordinates (scaling, shifts, exp)."""
    h = WTAHash(64, 8, 32, 8, seed=1)
    x = torch.randn(10, 64, dtype=torch.float64)
    for y in (3 * x + 1, torch.exp(x), x ** 3):
        assert torch.equal(h(x), h(y))


def test_band_keys_read_codes_as_base_k_numbers():
    codes = torch.tensor([[1, 2, 3, 0, 0, 1]])
    assert band_keys(codes, 4 ** torch.arange(3)).tolist() == [[1 + 2 * 4 + 3 * 16, 0 + 0 + 1 * 16]]


def test_collision_probability_rises_with_similarity():
    h = WTAHash(256, 4, 256, 256, seed=0)  # one code per band: per-code collision rates
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 256, generator=g)
    near = x + 0.3 * torch.randn(200, 256, generator=g)
    far = torch.randn(200, 256, generator=g)
    rate_near = (h(x) == h(near)).float().mean().item()
    rate_far = (h(x) == h(far)).float().mean().item()
    assert rate_far == pytest.approx(1 / 4, abs=0.02)  # independent vectors: 1/K
    assert rate_near > 0.7


def test_bad_hash_shapes_are_refused():
    with pytest.raises(ValueError, match="multiple of bands"):
        WTAHash(64, 4, 10, 3)
    with pytest.raises(ValueError, match="buckets per band"):
        WTAHash(64, 16, 64, 2)


# --- candidate selection -------------------------------------------------------------------------

def _brute_force_counts(qkeys, row_keys):
    return (qkeys[:, None, :] == row_keys[None, :, :]).sum(-1)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 300), n=st.integers(1, 8), budget=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_selection_returns_the_rows_with_most_shared_bands(rows, n, budget, seed):
    g = torch.Generator().manual_seed(seed)
    buckets, bands = 6, 5
    row_keys = torch.randint(0, buckets, (rows, bands), generator=g, dtype=torch.int32)
    qkeys = torch.randint(0, buckets, (n, bands), generator=g)
    order, starts = band_tables(row_keys, buckets)
    picked, valid = select_reference(qkeys, rows, order, starts, buckets, budget, None)
    counts = _brute_force_counts(qkeys, row_keys)
    for q in range(n):
        hits = counts[q][counts[q] > 0].sort(descending=True).values
        assert valid[q].sum().item() == min(budget, hits.numel())
        chosen = picked[q][valid[q]]
        assert chosen.unique().numel() == chosen.numel()
        # ranked best first, and no better row left out
        assert torch.equal(counts[q][chosen], hits[:chosen.numel()])


def test_bucket_cap_bounds_the_rows_read_per_bucket():
    row_keys = torch.zeros(50, 1, dtype=torch.int32)  # every row in bucket 0 of the one band
    order, starts = band_tables(row_keys, 4)
    picked, valid = select_reference(torch.zeros(1, 1, dtype=torch.long), 50, order, starts, 4, 40, 10)
    assert valid.sum().item() == 10 and sorted(picked[valid].tolist()) == list(range(10))


# --- the gathered matmul and its sparse gradients ------------------------------------------------

def test_gathered_linear_is_x_dot_gathered_rows_with_sparse_gradients():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=g, requires_grad=True)
    w = nn.Parameter(torch.randn(30, 16, generator=g))
    b = nn.Parameter(torch.randn(30, generator=g))
    rows = torch.randint(0, 30, (4, 7), generator=g)
    out = gathered_linear(x, w, b, rows)
    dense = x @ w.t() + b
    torch.testing.assert_close(out, dense.gather(1, rows))
    upstream = torch.randn(4, 7, generator=g)
    (out * upstream).sum().backward()
    assert w.grad.layout == torch.sparse_coo and b.grad.layout == torch.sparse_coo
    x2, w2, b2 = (t.detach().clone().requires_grad_() for t in (x, w, b))
    ((x2 @ w2.t() + b2).gather(1, rows) * upstream).sum().backward()
    torch.testing.assert_close(w.grad.to_dense(), w2.grad)
    torch.testing.assert_close(b.grad.to_dense(), b2.grad)
    torch.testing.assert_close(x.grad, x2.grad)


def test_ops_pass_opcheck():
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g), torch.randn(20, generator=g)
    rows = torch.randint(0, 20, (3, 5), generator=g)
    torch.library.opcheck(gathered_linear, (x.requires_grad_(), w, b, rows),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(wta_codes, (x, WTAHash(8, 2, 4, 2).windows))
    row_keys = torch.randint(0, 4, (20, 2), generator=g, dtype=torch.int32)
    order, starts = band_tables(row_keys, 4)
    torch.library.opcheck(wta_select, (row_keys[:3].long(), row_keys, order, starts, 4, 5, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(collision_counts, (row_keys[:3], row_keys))


# --- the layer -----------------------------------------------------------------------------------

def test_all_outputs_as_candidates_equal_the_dense_layer_forward_and_gradients():
    lin, x = _prototype_layer(classes=40, dim=16)
    layer = WTAHashedLinear.from_original(lin, k=4, num_hashes=8, bands=4, candidates=40).train()
    target = torch.randint(0, 40, (x.shape[0],))
    out = layer(x)
    torch.testing.assert_close(out, lin(x), rtol=1e-5, atol=1e-5)
    F.cross_entropy(out, target).backward()
    F.cross_entropy(lin(x), target).backward()
    torch.testing.assert_close(layer.weight.grad.to_dense(), lin.weight.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad.to_dense(), lin.bias.grad, rtol=1e-5, atol=1e-6)
    layer.zero_grad()
    sampled_softmax_loss(layer, x, target).backward()  # the sampled softmax over every row is the full one
    torch.testing.assert_close(layer.weight.grad.to_dense(), lin.weight.grad, rtol=1e-5, atol=1e-6)


def test_candidates_are_exact_the_rest_is_fill_and_gets_no_gradient():
    lin, x = _prototype_layer()
    layer = WTAHashedLinear.from_original(lin, k=8, num_hashes=64, bands=16, candidates=32).train()
    rows, valid = layer.select(x)
    out = layer(x)
    ref = lin(x).detach()
    computed = torch.zeros_like(out, dtype=torch.bool)
    computed[torch.arange(x.shape[0])[:, None].expand_as(rows)[valid], rows[valid]] = True
    torch.testing.assert_close(out[computed], ref[computed], rtol=1e-5, atol=1e-5)
    assert (out[~computed] == -math.inf).all()
    assert (computed.sum(1) <= 32).all()
    out.masked_fill(~computed, 0).sum().backward()
    grad = layer.weight.grad.to_dense()
    touched = torch.zeros(lin.out_features, dtype=torch.bool)
    touched[rows[valid]] = True
    assert (grad[~touched] == 0).all() and (grad[touched].abs().sum(1) > 0).all()


def test_sampled_softmax_touches_only_candidates_and_labels():
    lin, x = _prototype_layer()
    layer = WTAHashedLinear.from_original(lin, k=8, num_hashes=64, bands=16, candidates=16).train()
    labels = torch.randint(0, lin.out_features, (x.shape[0],))
    rows, valid = layer.select(x)
    sampled_softmax_loss(layer, x, labels).backward()
    allowed = torch.zeros(lin.out_features, dtype=torch.bool)
    allowed[rows[valid]] = True
    allowed[labels] = True
    assert (layer.weight.grad.to_dense()[~allowed] == 0).all()
    assert (layer.weight.grad.to_dense()[labels].abs().sum(1) > 0).all()


def test_recall_of_the_dense_argmax_on_prototype_data():
    lin, x = _prototype_layer()
    layer = WTAHashedLinear.from_original(lin, k=8, num_hashes=128, bands=32, candidates=32).eval()
    with torch.no_grad():
        out, ref = layer(x), lin(x)
    assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    assert torch.isfinite(out).sum(1).max() <= 32


def test_exact_switch_computes_the_dense_layer():
    lin, x = _prototype_layer(classes=500)
    model = nn.Sequential(WTAHashedLinear.from_original(lin, candidates=16)).eval()
    with torch.no_grad(), exact(model):
        assert torch.equal(model(x), lin(x))
    assert not model[0].exact and not torch.isfinite(model(x)).all()


def test_an_input_without_candidates_is_computed_densely():
    lin, x = _prototype_layer(classes=500)
    layer = WTAHashedLinear.from_original(lin, candidates=16).eval()
    layer.starts.zero_()  # every bucket empty: nothing collides
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x))
    out = dense_fallback(torch.zeros(2, 3), torch.ones(2, 4), torch.ones(3, 4), None, torch.tensor([False, True]))
    assert out.tolist() == [[0, 0, 0], [4, 4, 4]]


def test_tables_follow_training_and_weight_changes():
    lin, x = _prototype_layer(classes=600)
    layer = WTAHashedLinear.from_original(lin, k=8, num_hashes=64, bands=16, candidates=16, rebuild_every=3).train()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    labels = torch.randint(0, 600, (x.shape[0],))
    stale = layer.row_keys.clone()
    for _ in range(3):
        opt.zero_grad()
        sampled_softmax_loss(layer, x, labels).backward()
        opt.step()
    touched = layer.dirty.clone()
    assert touched.any() and layer.rebuilds == 1
    layer.select(x)  # the 4th step rehashes the touched rows first
    assert layer.rebuilds == 2 and not layer.dirty.any()
    assert torch.equal(layer.row_keys, layer.keys(layer.weight.detach()).int())
    assert torch.equal(layer.row_keys[~touched], stale[~touched])
    # in eval, any change of the weights (here a load) rebuilds everything before the next forward
    with torch.no_grad():
        layer.weight.copy_(torch.randn_like(layer.weight))
    layer.eval()(x)
    assert torch.equal(layer.row_keys, layer.keys(layer.weight.detach()).int())


def test_export_keeps_the_tables():
    lin, x = _prototype_layer(classes=500)
    layer = WTAHashedLinear.from_original(lin, candidates=16).eval()
    program = torch.export.export(layer, (x,))
    with torch.no_grad():
        assert torch.equal(program.module()(x), layer(x))


def test_training_with_hashing_learns_like_dense_training():
    """Both ways, from the same start, the same steps, on classes in families that share a
    direction (the hard case: training pushes a row away from its siblings' shared direction, so
    the row stops ranking its coordinates like its inputs do). With an index of each class's
    input mean, accuracy through the index stays within 2 points of dense training; an index of
    the weight rows falls well behind (the benchmark does this at 100k classes)."""
    classes, dim, family = 2000, 64, 20
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(classes // family, dim, generator=g), dim=1)
    own = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    protos = F.normalize(centres[torch.arange(classes) // family] + 0.5 * own, dim=1)

    def batch(n, gen):
        y = torch.randint(0, classes, (n,), generator=gen)
        return protos[y] + 0.5 * torch.randn(n, dim, generator=gen) / math.sqrt(dim), y

    torch.manual_seed(0)  # the initialisation, whatever ran before
    init = nn.Linear(dim, classes, bias=False)
    dense = copy.deepcopy(init)
    hashed = {index: WTAHashedLinear.from_original(init, k=4, num_hashes=96, bands=32, candidates=32,
                                                   rebuild_every=20, index=index).train()
              for index in ("weights", "inputs")}
    opts = [torch.optim.SGD(m.parameters(), lr=300.0) for m in (dense, *hashed.values())]
    data = torch.Generator().manual_seed(1)
    for _ in range(400):
        x, y = batch(64, data)
        for opt in opts:
            opt.zero_grad()
        F.cross_entropy(dense(x), y).backward()
        for layer in hashed.values():
            sampled_softmax_loss(layer, x, y).backward()
        for opt in opts:
            opt.step()
    x, y = batch(4000, torch.Generator().manual_seed(2))
    with torch.no_grad():
        acc = {name: (m.eval()(x).argmax(1) == y).float().mean().item()
               for name, m in (("dense", dense), *hashed.items())}
    assert acc["dense"] > 0.95
    assert acc["inputs"] >= acc["dense"] - 0.02, acc
    assert acc["weights"] < acc["dense"] - 0.08, acc


def test_input_index_hashes_each_class_mean_of_its_inputs():
    lin, x = _prototype_layer(classes=600)
    layer = WTAHashedLinear.from_original(lin, k=8, num_hashes=64, bands=16, candidates=16, rebuild_every=2,
                                          index="inputs", index_rate=0.25).train()
    # until a class has been seen, its key is its weight row's
    assert torch.equal(layer.row_keys, layer.keys(lin.weight.detach()).int())
    y = torch.tensor([5, 5, 7] + [9] * 61)
    sampled_softmax_loss(layer, x, y)
    torch.testing.assert_close(layer.centroids[5], x[:2].mean(0))  # first sight: the plain mean
    torch.testing.assert_close(layer.centroids[7], x[2])
    assert layer.seen[[5, 7, 9]].tolist() == [2, 1, 61] and layer.dirty[[5, 7, 9]].all()
    before = layer.centroids.clone()
    sampled_softmax_loss(layer, x[:1], torch.tensor([5]))  # rate max(1 / 3, 0.25)
    torch.testing.assert_close(layer.centroids[5], before[5] + (x[0] - before[5]) / 3)
    for _ in range(9):
        sampled_softmax_loss(layer, x[:1], torch.tensor([7]))  # the rate bottoms out at index_rate
    c = before[7]
    for n in range(2, 11):
        c = c + max(1 / n, 0.25) * (x[0] - c)
    torch.testing.assert_close(layer.centroids[7], c)
    layer.rebuild(full=False)
    expect = layer.keys(torch.where(layer.seen[:, None] > 0, layer.centroids, lin.weight.detach())).int()
    assert torch.equal(layer.row_keys, expect)
    # learnt state: saved and loaded with the weights; nothing moves outside training
    clone = WTAHashedLinear(64, 600, k=8, num_hashes=64, bands=16, candidates=16, index="inputs")
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.centroids, layer.centroids) and torch.equal(clone.seen, layer.seen)
    seen = layer.seen.clone()
    with torch.no_grad():
        sampled_softmax_loss(layer, x, y)
    layer.eval()(x)
    assert torch.equal(layer.seen, seen)
    assert torch.equal(layer.row_keys, expect)


def test_weight_index_keeps_no_centroids_and_bad_index_values_are_refused():
    layer = WTAHashedLinear(16, 300, k=4, num_hashes=8, bands=4)
    assert "centroids" not in layer.state_dict()
    with pytest.raises(ValueError, match="index='rows'"):
        WTAHashedLinear(16, 300, index="rows")
    with pytest.raises(ValueError, match="index_rate"):
        WTAHashedLinear(16, 300, index="inputs", index_rate=0)
    spec = get("wta_hash")
    assert spec.parse_params({"index": "inputs"})["index"] == "inputs"
    with pytest.raises(ValueError, match="expected one of weights, inputs"):
        spec.parse_params({"index": "labels"})


# --- the rewrite ---------------------------------------------------------------------------------

def test_spec_declines_what_it_cannot_speed_up():
    spec = get("wta_hash")
    params = spec.parse_params({"candidates": 64})
    with pytest.raises(Decline, match="quarter"):
        spec.build(nn.Linear(16, 100), params)
    with pytest.raises(ValueError, match="multiple of bands"):
        spec.parse_params({"num_hashes": 30, "bands": 4})
    assert spec.parse_params({"fill": "-inf"})["fill"] == -math.inf


def _head_model():
    lin, x = _prototype_layer(classes=5000)
    return nn.Sequential(nn.Identity(), lin).eval(), x


def test_optimize_applies_the_rule_with_recall_as_the_check(tmp_path):
    model, x = _head_model()
    result = fxopt.optimize(model, (x,), "wta_hash")
    (site,) = result.report["sites"]
    assert site["status"] == "applied" and site["substitute"] == "wta_hash"
    assert site["error"]["recall_at_1"] >= 0.9 and "sqnr_db" not in site["error"]
    assert site["flops_after"] * 10 < site["flops_before"]
    e2e = result.report["end_to_end"]
    assert e2e["top1_agreement"] >= 0.9 and not e2e["violations"]
    loaded = fxopt.load(result.save(tmp_path / "out"))
    with torch.no_grad():
        assert (loaded(x).argmax(1) == model(x).argmax(1)).float().mean() >= 0.9


def test_low_recall_is_rolled_back(tmp_path):
    model, x = _head_model()
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\nrules:\n  - name: h\n    match: {op: linear}\n    substitute: wta_hash\n"
                     "    params: {k: 2, num_hashes: 2, bands: 1, candidates: 4}\n    tolerance: {recall_at_1: 0.99}\n")
    (site,) = fxopt.optimize(model, (x,), rules).report["sites"]
    assert site["status"] == "rolled_back" and "recall_at_1" in site["reason"]


def test_the_rule_matches_only_layers_feeding_a_softmax_argmax_or_the_output(tmp_path):
    lin, x = _prototype_layer(classes=5000)
    model = nn.Sequential(lin, nn.ReLU()).eval()  # a ReLU would read −inf as a number
    (site,) = fxopt.optimize(model, (x,), "wta_hash").report["sites"]
    assert site["status"] == "skipped" and "not softmax/log_softmax" in site["reason"]
    model = nn.Sequential(lin, nn.Softmax(dim=-1)).eval()
    (site,) = fxopt.optimize(model, (x,), "wta_hash").report["sites"]
    assert site["status"] == "applied"


def test_rule_file_errors_name_the_position(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: h\n    match: {op: linear, feeds: [relu]}\n    substitute: wta_hash\n")
    with pytest.raises(RuleError, match=r"bad.yaml:4:.*unknown consumer 'relu'"):
        rules_mod.load(bad)
    bad.write_text("version: 1\nrules:\n  - name: h\n    match: {op: linear}\n    substitute: wta_hash\n"
                   "    tolerance: {recall_at_1: 1.5}\n")
    with pytest.raises(RuleError, match=r"bad.yaml:6:.*out of range"):
        rules_mod.load(bad)


def test_the_example_reaches_full_recall():
    ex = load_example("xc")
    model, (x,) = ex.build_model(), ex.example_inputs()
    result = fxopt.pipeline.rewrite(model, (x,), "wta_hash")
    (site,) = result.report["sites"]
    assert site["status"] == "applied" and site["error"]["recall_at_1"] >= 0.95


# --- validation metrics --------------------------------------------------------------------------

def test_recall_stats_count_the_dense_top_k_among_exact_outputs():
    ref = torch.tensor([[5.0, 4, 3, 2, 1, 0], [0, 1, 2, 3, 4, 5]])
    out = torch.tensor([[5.0, -math.inf, 3, -math.inf, 1, -math.inf], [-math.inf] * 5 + [5.0]])
    s = RecallStats()
    s.update(ref, out)
    m = s.metrics()
    assert m["recall_at_1"] == 1.0
    assert m["recall_at_5"] == pytest.approx((3 / 5 + 1 / 5) / 2)
    assert m["computed_share"] == pytest.approx((3 / 6 + 1 / 6) / 2)


def test_error_stats_with_a_fill_keep_top1_and_drop_the_dense_metrics():
    s = ErrorStats()
    s.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[-math.inf, 2.0]]), classifier=True)
    assert s.metrics() == {"top1_agreement": 1.0}
    tol = rules_mod.Tolerance(sqnr_db=10.0)
    assert tol.violations(s.metrics()) == ["sqnr_db not measured (needs outputs without a −inf fill)"]
    s = ErrorStats()
    s.update(torch.tensor([[1.0, 2.0]]), torch.tensor([[float("nan"), 2.0]]), classifier=True)
    assert math.isnan(s.metrics()["sqnr_db"])


# --- kernels under the interpreter (CPU) and for real (GPU) --------------------------------------

@pytest.mark.parametrize("n,dim,k,hashes", [(1, 8, 2, 4), (5, 37, 4, 9), (19, 64, 8, 24)])
def test_codes_kernel_matches_reference(n, dim, k, hashes):
    h = WTAHash(dim, k, hashes, 1 if hashes == 9 else hashes // 4 or 1, seed=n)
    x = torch.randn(n, dim, generator=torch.Generator().manual_seed(n))
    with registry.use_backend("triton"):
        got = wta_codes(x, h.windows)
    assert torch.equal(got, wta_codes_reference(x, h.windows))


@pytest.mark.parametrize("n,rows,bands", [(1, 5, 1), (6, 37, 3), (17, 70, 8)])
def test_collision_kernel_matches_reference(n, rows, bands):
    g = torch.Generator().manual_seed(rows)
    row_keys = torch.randint(0, 3, (rows, bands), generator=g, dtype=torch.int32)
    qkeys = torch.randint(0, 3, (n, bands), generator=g, dtype=torch.int32)
    with registry.use_backend("triton"):
        got = collision_counts(qkeys, row_keys)
    assert torch.equal(got, collision_counts_reference(qkeys, row_keys))
    assert torch.equal(got, _brute_force_counts(qkeys, row_keys).int())


def test_selection_on_the_triton_path_ranks_like_the_tables():
    g = torch.Generator().manual_seed(3)
    row_keys = torch.randint(0, 5, (60, 4), generator=g, dtype=torch.int32)
    qkeys = torch.randint(0, 5, (7, 4), generator=g)
    order, starts = band_tables(row_keys, 5)
    ref_rows, ref_valid = select_reference(qkeys, 60, order, starts, 5, 10, None)
    with registry.use_backend("triton"):
        rows, valid = wta_select(qkeys, row_keys, order, starts, 5, 10, None)
    counts = _brute_force_counts(qkeys, row_keys)
    assert torch.equal(valid, ref_valid)
    assert torch.equal(counts.gather(1, rows) * valid, counts.gather(1, ref_rows) * ref_valid)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,dim,rows,cand,bias", [(1, 8, 10, 3, True), (5, 37, 50, 21, False), (3, 130, 40, 33, True)])
def test_gathered_kernels_match_reference(n, dim, rows, cand, bias, dtype):
    g = torch.Generator().manual_seed(dim)
    x = torch.randn(n, dim, generator=g).to(dtype)
    w = torch.randn(rows, dim, generator=g).to(dtype)
    b = torch.randn(rows, generator=g).to(dtype) if bias else None
    idx = torch.randint(0, rows, (n, cand), generator=g)
    upstream = torch.randn(n, cand, generator=g).to(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-2, "atol": 1e-2}
    with registry.use_backend("triton"):
        xt = x.clone().requires_grad_()
        out = gathered_linear(xt, w, b, idx)
        out.backward(upstream)
    xr = x.float().clone().requires_grad_()
    ref = gathered_linear_reference(xr, w.float(), b.float() if bias else None, idx)
    ref.backward(upstream.float())
    torch.testing.assert_close(out.float(), ref, **tol)
    torch.testing.assert_close(xt.grad.float(), xr.grad, **tol)


@gpu_only
def test_layer_on_gpu_matches_the_cpu_tables_path():
    lin, x = _prototype_layer(classes=20000, dim=256)
    cpu = WTAHashedLinear.from_original(lin, candidates=64).eval()
    gpu = WTAHashedLinear.from_original(lin.cuda(), candidates=64).eval()
    with torch.no_grad():
        out_c, out_g = cpu(x), gpu(x.cuda()).cpu()
        ref = lin.cpu()(x)
    for out in (out_c, out_g):
        assert (out.argmax(1) == ref.argmax(1)).float().mean() >= 0.95
    computed = torch.isfinite(out_g)
    torch.testing.assert_close(out_g[computed], ref[computed], rtol=1e-4, atol=1e-4)
