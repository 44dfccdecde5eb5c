"""Real Hugging Face architectures, built from their configs (random weights, no download): every
linear layer is a site named by its module path, an exact rewrite computes what the model did,
and layer-wise training and distillation run on them. Slow; skipped without `transformers`."""

import pytest
import torch
from torch import nn

import fxopt
from fxopt import rules
from fxopt.layerwise import Layerwise

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow

FULL = rules.parse("version: 1\nrules:\n  - {substitute: kron, params: {rank: full, max_flops_ratio: null}}\n",
                   "full.yaml")


def gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def bert():
    return transformers.BertModel(transformers.BertConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
                                                          intermediate_size=128, vocab_size=100))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=100, bos_token_id=0, eos_token_id=0, pad_token_id=0))


class Wrap(nn.Module):
    """What a user's model file returns: logits (or hidden states) from token ids and a mask."""

    def __init__(self, model):
        super().__init__()
        self.m = model

    def forward(self, input_ids, attention_mask):
        out = self.m(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits if hasattr(out, "logits") else out.last_hidden_state


def tokens(n=2, seq=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, seq, dtype=torch.long)
    mask[-1, -2:] = 0
    return torch.randint(0, 100, (n, seq), generator=g), mask


def linear_layers(model):
    return {f"m.{name}" for name, m in model.named_modules()
            if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


@pytest.mark.parametrize("build", [gpt2, bert, llama])
def test_every_linear_layer_is_a_site_and_an_exact_rewrite_is_exact(build, tmp_path):
    torch.manual_seed(0)
    model = Wrap(build()).eval()
    result = fxopt.optimize(model, tokens(), FULL, time_sites=False)
    sites = {s["key"]: s for s in result.report["sites"]}
    expected = linear_layers(model.m)
    if build is bert:  # the pooler: BertModel computes it, the caller reads last_hidden_state
        assert sites["m.pooler.dense"]["status"] == "unused"
        expected.discard("m.pooler.dense")
    assert {k for k, s in sites.items() if s["status"] == "applied"} == expected
    assert result.report["not_seen"] == []
    loaded = fxopt.load(result.save(tmp_path / "out"))
    other = tokens(n=3, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(*other), model(*other), rtol=1e-4, atol=1e-4)


def test_layerwise_training_and_distillation_on_bert():
    torch.manual_seed(0)
    model = Wrap(bert()).eval()
    ruleset = rules.parse("version: 1\nrules:\n  - {substitute: lowrank, match: {op: linear}, "
                          "params: {rank: 8, max_flops_ratio: null}}\n", "r.yaml")
    result = fxopt.optimize(model, tokens(), ruleset, calibration=[tokens(4, 8, s) for s in range(2, 5)],
                            layerwise=Layerwise(steps=10, distill_steps=10), time_sites=False)
    assert result.report["trace"]["method"] == "export"
    distill = result.report["training"]["distill"]
    assert distill["steps"] == 10 and distill["loss_after"] < distill["loss_before"]
