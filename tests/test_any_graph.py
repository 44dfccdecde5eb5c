"""Rewriting and recovery training on every graph fxopt traces: layers whose output the model
never uses, and models that only torch.export can trace (Hugging Face-style encoders with token
ids and an attention mask), through every shipped rule set, with and without layer-wise training
and distillation. An internal error here is a bug."""

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import fxopt
from fxopt.console.cli import app
from fxopt.layerwise import Layerwise

SHIPPED = ("kron", "lowrank", "binary", "separable", "bottleneck", "wta_hash")  # rescale: `fxopt rescale`, test_rescale.py


class WithUnused(nn.Module):
    """Every kind of site, and of each one a copy whose output nothing returned depends on (an
    auxiliary head, a pooler the caller does not read)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.conv = nn.Conv2d(32, 32, 3, padding=1)
        self.aux_conv = nn.Conv2d(32, 32, 3, padding=1)  # unused
        self.fc = nn.Linear(32, 256)
        self.pool = nn.Linear(256, 256)  # unused
        self.head = nn.Linear(256, 8)

    def forward(self, x):
        h = torch.relu(self.conv(torch.relu(self.stem(x))))
        self.aux_conv(h).mean()  # computed, never returned
        h = torch.relu(self.fc(h.mean((2, 3))))
        torch.tanh(self.pool(h))  # computed, never returned
        return self.head(h)


@pytest.mark.parametrize("train", [False, True], ids=["plain", "trained"])
@pytest.mark.parametrize("ruleset", SHIPPED)
def test_unused_layers_go_through_every_shipped_rule_set(ruleset, train, tmp_path):
    torch.manual_seed(0)
    model = WithUnused().eval()
    x = torch.randn(2, 3, 8, 8)
    calib = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    config = Layerwise(steps=3, distill_steps=3) if train else None
    result = fxopt.optimize(model, (x,), ruleset, calibration=calib, layerwise=config, time_sites=False)
    sites = {s["key"]: s for s in result.report["sites"]}
    for dead in ("aux_conv", "pool"):
        assert sites[dead]["status"] == "unused", sites[dead]
        assert sites[dead]["reason"].startswith("its output is unused")
        assert sites[dead]["params_after"] == sites[dead]["params_before"]
    assert result.report["totals"]["unused"] == 2
    loaded = fxopt.load(result.save(tmp_path / "out"))
    torch.testing.assert_close(loaded(x), result.model(x), rtol=1e-5, atol=1e-5)


class Encoder(nn.Module):
    """A small BERT written the way Hugging Face writes it: the batch and sequence sizes unpacked
    from `input_ids.size()` (which makes symbolic_trace give up: torch.export traces it), an
    extended additive attention mask, q/k/v as separate linears, a pooler nobody reads when the
    caller takes the hidden states."""

    def __init__(self, vocab: int = 50, dim: int = 64, heads: int = 4, layers: int = 2):
        super().__init__()
        self.heads = heads
        self.embeddings = nn.Embedding(vocab, dim)
        self.position = nn.Embedding(32, dim)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "query": nn.Linear(dim, dim), "key": nn.Linear(dim, dim), "value": nn.Linear(dim, dim),
            "output": nn.Linear(dim, dim), "norm1": nn.LayerNorm(dim),
            "intermediate": nn.Linear(dim, 4 * dim), "out": nn.Linear(4 * dim, dim), "norm2": nn.LayerNorm(dim),
        }) for _ in range(layers))
        self.pooler = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        batch_size, seq_length = input_ids.size()
        positions = torch.arange(seq_length, device=input_ids.device).unsqueeze(0)
        h = self.embeddings(input_ids) + self.position(positions)
        extended = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            def split(t):
                return t.view(batch_size, seq_length, self.heads, -1).transpose(1, 2)

            q, k, v = split(layer["query"](h)), split(layer["key"](h)), split(layer["value"](h))
            scores = q @ k.transpose(-1, -2) / (q.shape[-1] ** 0.5) + extended
            context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch_size, seq_length, -1)
            h = layer["norm1"](h + layer["output"](context))
            h = layer["norm2"](h + layer["out"](nn.functional.gelu(layer["intermediate"](h))))
        pooled = torch.tanh(self.pooler(h[:, 0]))
        return {"last_hidden_state": h, "pooler_output": pooled}


class HiddenStates(nn.Module):
    """What a sentence-embedding user does: read `last_hidden_state`, mean-pool over the mask."""

    def __init__(self):
        super().__init__()
        self.encoder = Encoder()

    def forward(self, input_ids, attention_mask):
        h = self.encoder(input_ids, attention_mask)["last_hidden_state"]
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1)


def token_batch(n: int, seq: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 50, (n, seq), generator=g)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[n // 2:, seq - 3:] = 0  # some rows padded
    return ids, mask


def test_an_encoder_with_token_ids_and_a_mask_trains_and_distils():
    torch.manual_seed(0)
    model = HiddenStates().eval()
    calib = [token_batch(4, 12, s) for s in range(3)]
    rules = fxopt.rules.parse("version: 1\nrules:\n  - {substitute: lowrank, match: {op: linear}, "
                              "params: {rank: 8, max_flops_ratio: null}}\n", "r.yaml")
    result = fxopt.optimize(model, token_batch(2, 12, 9), rules, calibration=calib,
                            layerwise=Layerwise(steps=20, lr=3e-3, distill_steps=20, distill_lr=1e-3),
                            time_sites=False)
    assert result.report["trace"]["method"] == "export"
    sites = {s["key"]: s for s in result.report["sites"]}
    assert sites["encoder.pooler"]["status"] == "unused"
    trained = [s for s in sites.values() if s["status"] == "applied"]
    assert len(trained) == 12
    for s in trained:
        lw = s["layerwise"]
        assert lw["steps"] == 20 and lw["loss_after"] < lw["loss_before"] and len(lw["curve"]) == 20
    distill = result.report["training"]["distill"]
    assert distill["steps"] == 20 and distill["loss_after"] < distill["loss_before"]
    assert len(distill["curve"]) == 20
    assert not model.training and all(not m.training for m in model.modules())


def test_the_command_distils_an_export_traced_model(write, tmp_path):
    """`fxopt optimize --layerwise-steps --distill-steps` on a model only torch.export traces."""
    model = write("encoder.py", f"""
        import sys
        sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})
        import torch
        from test_any_graph import HiddenStates, token_batch

        def build_model():
            torch.manual_seed(0)
            return HiddenStates().eval()

        def example_inputs():
            return token_batch(2, 12, 9)

        def calibration_data():
            for seed in range(3):
                yield token_batch(4, 12, seed)
    """)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["optimize", str(model), "--rules", "kron", "--layerwise-steps", "5",
                                      "--distill-steps", "5", "--no-time-sites", "--out", str(out)])
    assert result.exit_code == 0, result.stderr
    assert "internal error" not in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["distill"]["steps"] == 5 and len(report["training"]["distill"]["curve"]) == 5
    assert "Distillation: 5 steps" in (out / "report.md").read_text()
    assert 'id="plot-loss"' in (out / "report.html").read_text()
