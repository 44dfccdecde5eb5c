"""The gate: a rule's `require_speedup` keeps the original layer where the substitute is not
faster, and says so; every applied site's latency is in the report."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt.errors import RuleError
from fxopt.rules import parse


def model_and_input():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval(), (torch.randn(32, 64),)


def rules(extra: str, params: str = "{rank: full, max_flops_ratio: null}"):
    return parse(f"version: 1\nrules:\n  - substitute: kron\n    params: {params}\n{extra}")


def test_a_substitute_that_slows_its_layer_down_is_gated_and_reported():
    # full-rank Kronecker sums of a 64×64 weight cost 16× the dense FLOPs: never 1.2× faster
    model, x = model_and_input()
    result = fxopt.optimize(model, x, rules("    require_speedup: 1.2\n"))
    sites = result.report["sites"]
    assert [s["status"] for s in sites] == ["gated", "gated"]
    for s in sites:
        assert s["latency"]["speedup"] < 1.2 and s["latency"]["original_us"] > 0
        assert s["reason"].startswith("gate:") and "original kept" in s["reason"]
        assert s["params_after"] == s["params_before"] and s["module_after"] == "unchanged"
    assert result.report["totals"]["gated"] == 2 and result.report["totals"]["applied"] == 0
    assert not any(type(m).__name__.startswith("Kron") for m in result.model.modules())
    torch.testing.assert_close(result.program.module()(*x), model(*x))
    assert "gated 2" in fxopt.report.markdown(result.report)


def test_a_met_requirement_keeps_the_substitute_with_its_timing():
    model, x = model_and_input()
    result = fxopt.optimize(model, x, rules("    require_speedup: 0.001\n"))
    assert [s["status"] for s in result.report["sites"]] == ["applied", "applied"]
    assert all(s["latency"]["substitute_us"] > 0 for s in result.report["sites"])


def test_ungated_sites_are_timed_and_slower_ones_flagged():
    model, x = model_and_input()
    result = fxopt.optimize(model, x, rules(""))
    sites = result.report["sites"]
    assert all(s["status"] == "applied" and s["latency"] for s in sites)
    slower = [s["key"] for s in sites if s["latency"]["speedup"] < 1]
    assert result.report["totals"]["slower"] == slower
    untimed = fxopt.optimize(model, x, rules(""), time_sites=False)
    assert all(s["latency"] is None for s in untimed.report["sites"])


@pytest.mark.parametrize("value, message", [("0", "must be > 0"), ("-1.5", "must be > 0"), ("fast", "must be a float")])
def test_require_speedup_errors_name_the_line(value, message):
    with pytest.raises(RuleError, match=rf"<rules>:5:\d+: .*{message}"):
        rules(f"    require_speedup: {value}\n", params="{rank: 1}")


def _scripted(monkeypatch, script):
    """median_seconds returns the scripted figures in turn (an injected slow run), the last forever."""
    from fxopt import timing

    calls = iter(script)
    last = [script[-1]]

    def fake(fn, args, min_run_time):
        try:
            last[0] = next(calls)
        except StopIteration:
            pass
        return last[0]
    monkeypatch.setattr(timing, "median_seconds", fake)


def test_an_injected_slow_run_is_retimed_and_does_not_decide_the_site(monkeypatch):
    # rounds alternate original, substitute: the first attempt's second original round is 50x slow
    first = [1e-3, 1e-3, 50e-3, 1e-3, 1e-3, 1e-3]  # original 1 ms, substitute 1 ms, with one outlier
    _scripted(monkeypatch, first + [1e-3] * 60)
    from fxopt.timing import measure

    t = measure({"original": lambda x: x, "substitute": lambda x: x}, (torch.zeros(1),), 3, 0.01)
    assert t.retimed == 1 and t.unreliable is None and t.seconds["original"] == 1e-3


def test_a_figure_that_stays_inconsistent_is_marked_unreliable(monkeypatch):
    _scripted(monkeypatch, [1e-3, 1e-3, 9e-3, 1e-3] * 40)
    model, x = model_and_input()
    result = fxopt.optimize(model, x, rules("", "{compression: 4}"))
    lat = [s["latency"] for s in result.report["sites"] if s["latency"]]
    assert lat and all("varied" in s["unreliable"] and s["retimed"] == 2 for s in lat)
    assert "unreliable" in fxopt.report.markdown(result.report)


def test_a_speedup_far_beyond_the_flop_ratio_is_retimed(monkeypatch):
    from fxopt.gate import site_latency
    from fxopt.match import find_sites
    from fxopt.trace import trace

    model, x = model_and_input()
    site = find_sites(trace(model, x).gm)[0]
    # the substitute timed 100x faster at first (an outlier), then as fast as the original
    _scripted(monkeypatch, [1e-3, 1e-5] * 3 + [1e-3] * 60)
    lat = site_latency(site, site.module, flop_ratio=2.0)
    assert lat["retimed"] == 1 and lat["speedup"] == 1.0 and "unreliable" not in lat
