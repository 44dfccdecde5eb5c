"""Layer-wise training: on fixed seeds, each substitute's error against its original layer is
lower after training than after its SVD-type initialisation; distillation lowers the end-to-end
error; the user's model is never touched."""

import copy

import pytest
import torch
from torch import nn

import fxopt
from fxopt.layerwise import Layerwise
from fxopt.rules import parse


def structured(n, dim, g, basis):
    """Inputs on a low-dimensional subspace plus noise, as real activations are."""
    return torch.randn(n, basis.shape[0], generator=g) @ basis + 0.05 * torch.randn(n, dim, generator=g)


def mlp_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    g = torch.Generator().manual_seed(1)
    basis = torch.randn(8, 64, generator=g)
    return model, (structured(16, 64, g, basis),), [(structured(64, 64, g, basis),) for _ in range(6)]


def cnn_setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 5)).eval()
    g = torch.Generator().manual_seed(1)
    smooth = lambda n: nn.functional.avg_pool2d(torch.randn(n, 3, 16, 16, generator=g), 3, 1, 1)  # noqa: E731
    return model, (smooth(4),), [(smooth(8),) for _ in range(4)]


RULES = {
    "kron": ("mlp", "substitute: kron\n    match: {op: linear, exclude: {last: true}}\n    params: {rank: 1}"),
    "lowrank": ("mlp", "substitute: lowrank\n    match: {exclude: {last: true}}\n    params: {rank: 4}"),
    "separable": ("cnn", "substitute: separable\n    match: {exclude: {first: true}}"),
    "bottleneck": ("cnn", "substitute: bottleneck\n    match: {exclude: {first: true}}\n    params: {reduction: 4}"),
}


def ruleset(body: str):
    return parse(f"version: 1\nrules:\n  - {body}\n")


@pytest.mark.parametrize("name", sorted(RULES))
def test_training_lowers_every_site_error_below_its_initialisation(name):
    kind, body = RULES[name]
    model, example, calib = (mlp_setup if kind == "mlp" else cnn_setup)()
    result = fxopt.optimize(model, example, ruleset(body), calibration=calib,
                            layerwise=Layerwise(steps=60, lr=3e-3), time_sites=False)
    trained = [s for s in result.report["sites"] if s["layerwise"]]
    assert len(trained) == 2
    for s in trained:
        assert s["status"] == "applied"
        assert s["error"]["rel_l2"] < 0.97 * s["error_init"]["rel_l2"], s
        assert s["layerwise"]["loss_after"] < s["layerwise"]["loss_before"]
    assert result.report["training"]["layerwise_steps"] == 60


def test_distillation_lowers_end_to_end_error_and_leaves_the_users_model_alone():
    model, example, calib = mlp_setup()
    before = copy.deepcopy(model.state_dict())
    rules = ruleset(RULES["kron"][1])
    plain = fxopt.optimize(model, example, rules, calibration=calib, layerwise=Layerwise(steps=30, lr=3e-3),
                           time_sites=False)
    distilled = fxopt.optimize(model, example, rules, calibration=calib, time_sites=False,
                               layerwise=Layerwise(steps=30, lr=3e-3, distill_steps=60, distill_lr=1e-3))
    d = distilled.report["training"]["distill"]
    assert d["steps"] == 60 and d["loss_after"] < d["loss_before"]
    assert distilled.report["end_to_end"]["rel_l2"] < plain.report["end_to_end"]["rel_l2"]
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # left in the mode it was in


def test_no_training_without_steps_and_bad_settings():
    model, example, calib = mlp_setup()
    result = fxopt.optimize(model, example, ruleset(RULES["kron"][1]), calibration=calib, time_sites=False)
    assert all(s["layerwise"] is None and s["error_init"] is None for s in result.report["sites"])
    assert "layerwise" not in [s["name"] for s in result.report["stages"]]
    with pytest.raises(ValueError, match="unknown layer-wise loss"):
        Layerwise(steps=1, loss="l1")
    with pytest.raises(ValueError):
        Layerwise(steps=-1)


def test_cosine_loss_trains_too():
    model, example, calib = mlp_setup()
    result = fxopt.optimize(model, example, ruleset(RULES["lowrank"][1]), calibration=calib, time_sites=False,
                            layerwise=Layerwise(steps=40, lr=3e-3, loss="cosine"))
    for s in result.report["sites"]:
        if s["layerwise"]:
            assert s["layerwise"]["loss"] == "cosine"
            assert s["error"]["cosine"] > s["error_init"]["cosine"]


def test_distillation_with_per_site_targets_pulls_every_layer_towards_its_original():
    """`distill_sites`: each substitute's output inside the rewritten model is also pulled to its
    original layer's output on the same batch (the reference graph's run)."""
    model, example, calib = mlp_setup()
    rules = parse("version: 1\nrules:\n  - {substitute: lowrank, match: {op: linear}, "
                  "params: {rank: 2, max_flops_ratio: null}}\n", "r.yaml")

    def run(weight):
        torch.manual_seed(0)
        return fxopt.optimize(model, example, rules, calibration=calib, time_sites=False,
                              layerwise=Layerwise(distill_steps=60, distill_lr=3e-3, distill_sites=weight))

    def layer_error(result):
        """Mean over layers of ‖substitute's output in the rewritten model − original layer's output‖² / ‖…‖²."""
        ours = [m for m in result.model.modules() if type(m).__name__ == "LowRankLinear"]
        theirs = [m for m in model if isinstance(m, nn.Linear)]
        got: dict = {}
        hooks = [m.register_forward_hook(lambda mod, a, out, k=(side, i): got.__setitem__(k, out))
                 for side, mods in (("ours", ours), ("theirs", theirs)) for i, m in enumerate(mods)]
        errors = []
        with torch.no_grad():
            for (x,) in calib:
                model(x), result.model(x)
                errors += [((got["ours", i] - got["theirs", i]).square().sum() / got["theirs", i].square().sum()).item()
                           for i in range(len(theirs))]
        for h in hooks:
            h.remove()
        return sum(errors) / len(errors)

    plain, per_site = run(0.0), run(1.0)
    d = per_site.report["training"]["distill"]
    assert d["sites_weight"] == 1.0 and d["site_loss_after"] < d["site_loss_before"]
    assert "site_loss_after" not in plain.report["training"]["distill"]
    assert layer_error(per_site) < layer_error(plain)


def test_distillation_leaves_a_wta_hash_head_as_built_and_trains_the_rest():
    """A wta_hash head fills all but its candidates with −inf: distillation neither trains it (its
    outputs are measured by recall) nor compares the fill; the layers before it still train, and a
    model whose only substitute is such a head says in its report why nothing was distilled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 4096)).eval()
    g = torch.Generator().manual_seed(1)
    calib = [(torch.randn(32, 64, generator=g),) for _ in range(3)]
    head = "  - {match: {op: linear, out_features: {min: 4096}}, substitute: wta_hash, params: {k: 8, num_hashes: 64, " \
           "bands: 16, candidates: 512}}\n"
    hidden = "  - {match: {op: linear, out_features: {max: 256}}, substitute: lowrank, params: {rank: 8}}\n"
    layerwise = Layerwise(distill_steps=20, distill_lr=1e-3)
    both = fxopt.optimize(model, calib[0], parse("version: 1\nrules:\n" + head + hidden), calibration=calib,
                          time_sites=False, layerwise=layerwise)
    assert {s["substitute"]: s["status"] for s in both.report["sites"]} == {"lowrank": "applied", "wta_hash": "applied"}
    d = both.report["training"]["distill"]
    assert d["steps"] == 20 and d["loss_after"] < d["loss_before"] and torch.isfinite(torch.tensor(d["loss_after"]))
    only_head = fxopt.optimize(model, calib[0], parse("version: 1\nrules:\n" + head), calibration=calib,
                               time_sites=False, layerwise=layerwise)
    assert only_head.report["training"]["distill"]["steps"] == 0
    assert "wta_hash heads are left as built" in only_head.report["training"]["distill"]["reason"]


def test_streaming_recordings_train_the_same_as_kept_ones(monkeypatch):
    """Beyond the cache budget the sites' values are recorded again at every step and all sites
    step together, and distillation runs the original at every step; within it they are kept and
    each site trains alone through its steps. The trained substitutes are the same either way."""
    import fxopt.layerwise as layerwise

    model, example, calib = mlp_setup()
    rules = ruleset(RULES["lowrank"][1])

    def trained():
        result = fxopt.optimize(model, example, rules, calibration=calib, time_sites=False,
                                layerwise=Layerwise(steps=12, lr=3e-3, distill_steps=9, distill_sites=0.5))
        assert result.report["training"]["distill"]["steps"] == 9
        return result.model.state_dict()

    kept = trained()
    monkeypatch.setattr(layerwise, "CACHE_BYTES", 1)
    streamed = trained()
    assert kept.keys() == streamed.keys()
    for k in kept:
        torch.testing.assert_close(streamed[k], kept[k], rtol=1e-6, atol=1e-7)
    recorded = layerwise.record(*_graph_and_candidates(model, example, rules), calib)
    assert not recorded.kept_whole() and recorded.store["streaming"]


def _graph_and_candidates(model, example, rules):
    from fxopt import pipeline
    from fxopt.match import find_sites
    from fxopt.trace import trace

    traced = trace(model, example, "m")
    _, candidates = pipeline.build(pipeline.choose_rules(find_sites(traced.gm), rules))
    return traced.gm, candidates
