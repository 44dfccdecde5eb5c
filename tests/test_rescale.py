"""Kernel rescaling: the resampling operators, the down/up rewrites on several conv configurations,
the spatial scaling property on smooth inputs, and the training schedule."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import rescale
from fxopt.errors import FxoptError


def gaussian_kernels(out_c: int, in_c: int, k: int, seed: int = 0) -> torch.Tensor:
    """Smooth kernels (random mixtures of wide Gaussians): what the scaling property is about."""
    g = torch.Generator().manual_seed(seed)
    r = torch.linspace(-1, 1, k)
    centre = torch.rand(out_c, in_c, 2, generator=g) * 0.6 - 0.3
    amp = torch.randn(out_c, in_c, 1, 1, generator=g)
    d2 = (r.view(1, 1, -1, 1) - centre[..., 0, None, None]) ** 2 + (r.view(1, 1, 1, -1) - centre[..., 1, None, None]) ** 2
    return amp * torch.exp(-d2 / 0.5) / k**2


@pytest.mark.parametrize("large,small", [(5, 3), (7, 5), (11, 7), (9, 5), (8, 4), (4, 2)])
def test_down_keeps_sums_and_up_is_its_right_inverse(large, small):
    d, u = rescale.downsample_matrix(large, small, 2), rescale.upsample_matrix(small, large, 2)
    assert torch.allclose(d.sum(0), torch.ones(large, dtype=d.dtype))  # every full tap is shared out whole
    assert torch.allclose(d @ u, torch.eye(small, dtype=u.dtype), atol=1e-10)  # ↓(↑(k)) = k


def test_down_matrix_is_the_tent_filter_at_stride_s():
    d = rescale.downsample_matrix(5, 3, 2)  # taps −2..2 → −1..1, at full offsets −2, 0, 2
    expected = torch.tensor([[1, 0.5, 0, 0, 0], [0, 0.5, 1, 0.5, 0], [0, 0, 0, 0.5, 1]], dtype=d.dtype)
    assert torch.allclose(d, expected)


@pytest.mark.parametrize("k,expected", [(7, 5), (5, 3), (11, 7), (3, 3), (1, 1), (4, 2), (9, 5)])
def test_kernel_sizes_at_half_resolution(k, expected):
    assert rescale.smaller_kernel(k, 2) == expected


class Convs(nn.Module):
    """Stride, padding (same and not), dilation, groups, rectangular kernels, pooling, fc after flatten."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 7, stride=2, padding=3)
        self.b = nn.Conv2d(8, 8, (5, 7), padding=(2, 3), groups=2)
        self.c = nn.Conv2d(8, 16, 5, padding=4, dilation=2)
        self.d = nn.Conv2d(16, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 16 * 16, 10)

    def forward(self, x):
        x = F.relu(self.a(x))
        x = F.relu(self.b(x))
        x = self.pool(F.relu(self.c(x)))
        x = F.relu(self.d(x))
        return self.fc(torch.flatten(x, 1))


def test_down_rewrites_geometry_and_records_each_layer():
    x = torch.randn(2, 3, 64, 64)
    low = rescale.down(Convs().eval(), (x,), 2)
    recs = {r.name: r for r in low.records}
    assert low.input_shapes == [(2, 3, 32, 32)]
    assert recs["a"].after == {"kernel": [5, 5], "stride": [2, 2], "padding": [2, 2], "dilation": [1, 1]}
    assert recs["b"].after["kernel"] == [3, 5] and recs["b"].after["padding"] == [1, 2]
    assert recs["c"].after["kernel"] == [3, 3] and recs["c"].after["padding"] == [2, 2]  # dilated 'same'
    assert low.model.get_submodule("b").groups == 2
    assert recs["d"].status == "kept" and "too small" in recs["d"].reason
    assert recs["fc"].kind == "linear-after-flatten" and recs["fc"].after == {"in_features": 1024, "map": [16, 8, 8]}
    assert low.model(torch.randn(5, 3, 32, 32)).shape == (5, 10)


def test_rescaled_layers_follow_the_spatial_scaling_property_on_smooth_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 7, padding=3), nn.ReLU(), nn.Conv2d(6, 6, 5, stride=2, padding=2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(gaussian_kernels(6, 3, 7))
        model[2].weight.copy_(gaussian_kernels(6, 6, 5, seed=1))
    x = torch.randn(2, 3, 64, 64)
    low = rescale.down(model, (x,), 2)
    rescale.check(model, low, (x,))
    errors = [r.error for r in low.records if r.status == "rescaled"]
    assert len(errors) == 2 and max(errors) < 0.1, errors  # the second layer's input is relu(·): less smooth


def test_up_of_down_is_identity_on_kernels_that_up_can_make():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 64, 64)
    model = Convs().eval()
    low = rescale.down(model, (x,), 2)
    full = rescale.up(low, like=model)
    again = rescale.down(full, (x,), 2)
    for (k, a), (_, b) in zip(low.model.state_dict().items(), again.model.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    # and for the full model: once projected, ↑↓ changes nothing
    assert torch.allclose(rescale.up(again, like=model)(x), full(x), atol=1e-5)


def test_down_then_up_of_an_untrained_model_is_close_on_smooth_inputs():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 7, padding=3), nn.ReLU(), nn.Conv2d(8, 8, 5, padding=2)).eval()
    with torch.no_grad():
        model[0].weight.copy_(gaussian_kernels(8, 3, 7))
        model[2].weight.copy_(gaussian_kernels(8, 8, 5, seed=3))
    x = torch.randn(2, 3, 48, 48)
    report = rescale.check(model, rescale.down(model, (x,), 2), (x,))
    assert report["round_trip_rel_l2"] < 0.05
    assert report["low_resolution_rel_l2"] is not None


def test_bad_factor_and_untraceable_model_fail_clearly():
    x = torch.randn(1, 3, 16, 16)
    with pytest.raises(FxoptError, match="factor must be greater than 1"):
        rescale.down(nn.Conv2d(3, 3, 5), (x,), 1)

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(FxoptError, match="cannot trace Branchy"):
        rescale.down(Branchy(), (x,), 2)


def test_rule_file_selects_layers_and_its_min_kernel():
    x = torch.randn(2, 3, 64, 64)
    only_b = fxopt.rules.parse_rescale("version: 1\nrescale:\n  - match: {op: conv2d, name: b}\n")
    low = rescale.down(Convs().eval(), (x,), 2, rules=only_b)
    assert [r.name for r in low.records if r.status == "rescaled" and r.kind == "conv"] == ["b"]
    assert {r.name: r.reason for r in low.records}["a"] == "rescale1: name 'a' matches none of b"
    high = fxopt.rules.parse_rescale("version: 1\nrescale:\n  - min_kernel: 9\n")
    low = rescale.down(Convs().eval(), (x,), 2, rules=high)
    assert all(r.status == "kept" and "min_kernel 9" in r.reason for r in low.records if r.kind == "conv")


@pytest.mark.parametrize("text,where,message", [
    ("version: 1\nrescale:\n  - min_kernel: 1\n", (3, 17), "min_kernel must be ≥ 2"),
    ("version: 1\nrescale:\n  - match: {op: linear}\n", (3, 12), "resizes conv2d kernels only"),
    ("version: 1\nrescale:\n  - substitute: kron\n", (3, 5), "unknown key 'substitute' in rescale rule #1"),
    ("version: 1\nrules:\n  - substitute: kron\n", (2, 1), "run `fxopt optimize MODEL.py --rules r.yaml`"),
    ("version: 1\nrescale: []\n", (2, 10), "rescale must be a non-empty list"),
])
def test_rescale_rule_errors_name_file_line_column(text, where, message):
    with pytest.raises(fxopt.errors.RuleError) as info:
        fxopt.rules.parse_rescale(text, "r.yaml")
    assert (info.value.line, info.value.column) == where and message in str(info.value), str(info.value)


def test_optimize_refuses_a_rescale_rule_file_at_once_with_the_command_to_use():
    with pytest.raises(fxopt.errors.RuleError, match=r"rescale:\d+:1: kernel rescaling is not a per-layer substitute.*"
                                                      r"fxopt rescale MODEL.py --factor N"):
        fxopt.optimize(nn.Sequential(nn.Conv2d(3, 8, 5)).eval(), (torch.randn(1, 3, 16, 16),), "rescale")


def test_rescale_command_writes_a_loadable_low_resolution_model_and_its_report(tmp_path):
    from typer.testing import CliRunner

    from fxopt.console.cli import app

    model = tmp_path / "m.py"
    model.write_text("import torch\nfrom torch import nn\n"
                     "model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),\n"
                     "                      nn.Flatten(), nn.Linear(8 * 32 * 32, 10)).eval()\n"
                     "def example_inputs():\n    return (torch.randn(2, 3, 32, 32),)\n")
    out = tmp_path / "low"
    result = CliRunner().invoke(app, ["rescale", str(model), "--factor", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["input_shapes"] == [[2, 3, 16, 16]]
    assert json.loads((out / "manifest.json").read_text())["input_shapes"] == [[2, 3, 16, 16]]
    layers = {layer["name"]: layer for layer in report["layers"]}
    assert layers["0"]["status"] == "rescaled" and layers["0"]["after"]["kernel"] == [3, 3]
    assert layers["0"]["error"] < 0.1  # the spatial scaling property on smooth inputs
    assert layers["2"]["status"] == "kept" and "too small" in layers["2"]["reason"]
    assert layers["4"]["status"] == "rescaled" and layers["4"]["after"]["in_features"] == 8 * 16 * 16
    loaded = fxopt.load(out)
    assert loaded(torch.randn(5, 3, 16, 16)).shape == (5, 10)  # batch stays dynamic
    assert "| 2 | conv | kept |" in (out / "report.md").read_text()
    bad = CliRunner().invoke(app, ["rescale", str(model), "--factor", "1", "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "factor must be greater than 1" in bad.output
    tokens = tmp_path / "tokens.py"  # not an image model: one clear line, not an internal error
    tokens.write_text("import torch\nfrom torch import nn\nmodel = nn.Sequential(nn.Linear(16, 16), nn.LayerNorm(16))\n"
                      "def example_inputs():\n    return (torch.randn(2, 8, 16),)\n")
    bad = CliRunner().invoke(app, ["rescale", str(tokens), "--out", str(tmp_path / "y")])
    assert bad.exit_code == 2 and "expects image batches (N, C, H, W)" in bad.output, bad.output
    assert not (tmp_path / "y").exists()


def test_schedule_trains_low_then_full_and_times_each_phase():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 2, (16,))
    seen = []

    def train_epoch(m, scale, epoch):
        xs = rescale.downsample_input(x, scale) if scale != 1 else x
        seen.append((epoch, tuple(xs.shape[2:]), tuple(m.get_submodule("0").kernel_size)))
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        F.cross_entropy(m(xs), y).backward()
        opt.step()

    full, phases, low = rescale.schedule(model, (x,), 2, 2, 1, train_epoch)
    assert seen == [(0, (16, 16), (3, 3)), (1, (16, 16), (3, 3)), (2, (32, 32), (5, 5))]
    assert [p.name for p in phases] == ["low", "full"] and all(p.seconds > 0 for p in phases)
    assert full[0].weight.shape == model[0].weight.shape and not torch.equal(full[0].weight, model[0].weight)


def test_recalibrate_re_estimates_batch_norm_statistics_on_full_resolution_inputs():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(32, 3, 16, 16)
    low = rescale.down(model, (x,), 2)
    low.model.train()
    with torch.no_grad():  # statistics of the low-resolution maps
        for _ in range(20):
            low.model(rescale.downsample_input(x, 2))
    full = rescale.up(low, like=model).eval()
    batches = [x[:16], x[16:]]
    with torch.no_grad():
        maps = full[0](x)
    assert not torch.allclose(full[1].running_var, maps.var((0, 2, 3)), rtol=0.05)
    assert rescale.recalibrate(full, batches) is full and not full.training
    torch.testing.assert_close(full[1].running_mean, maps.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    # a plain mean of the per-batch (unbiased) variances
    per_batch = torch.stack([maps[:16].var((0, 2, 3)), maps[16:].var((0, 2, 3))]).mean(0)
    torch.testing.assert_close(full[1].running_var, per_batch, rtol=1e-4, atol=1e-5)
    assert full[1].momentum == 0.1
    plain = nn.Sequential(nn.Conv2d(3, 4, 3))
    before = plain[0].weight.clone()
    rescale.recalibrate(plain, batches)
    assert torch.equal(plain[0].weight, before)


def test_schedule_recalibrates_the_carried_up_model_when_given_batches():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    x = torch.randn(8, 3, 16, 16)
    full, _, _ = rescale.schedule(model, (x,), 2, 1, 0, lambda m, scale, epoch: m.train()(rescale.downsample_input(x, 2)),
                                  bn_batches=[x])
    with torch.no_grad():
        torch.testing.assert_close(full[1].running_mean, full[0](x).mean((0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_training_on_in_train_mode_ends_with_the_same_model_with_or_without_recalibration():
    """Why the benchmark's final accuracies do not depend on `bn_images`: train-mode batch norm
    normalises with each batch's own statistics and momentum replaces the running ones."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, 2))
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 2, (16,))
    low = rescale.down(model, (x,), 2)
    with torch.no_grad():
        low.model.train()(rescale.downsample_input(x, 2))
    ends = []
    for recalibrated in (False, True):
        full = rescale.up(low, like=model)
        if recalibrated:
            rescale.recalibrate(full, [x + 1.0])  # statistics far from the training batches'
        opt = torch.optim.SGD(full.parameters(), lr=0.1)
        full.train()
        for _ in range(200):
            loss = F.cross_entropy(full(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        ends.append(full)
    for a, b in zip(ends[0].parameters(), ends[1].parameters()):
        assert torch.equal(a, b)  # the same steps, bit for bit
    torch.testing.assert_close(ends[0][1].running_mean, ends[1][1].running_mean, rtol=0, atol=1e-6)  # 0.9^200 of it left
