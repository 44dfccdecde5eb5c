"""WTA-hashed output layers (Bakhtiary, Lapedriza & Masip, "Speeding Up Neural Networks for Large
Scale Classification using WTA Hashing", arXiv 1504.07488), the `wta_hash` substitute.

A linear layer with very many outputs (classes) computes, for each input, only the outputs that
can win: Winner-Takes-All hash codes of the input and of every weight row (fxopt.wta) select a
candidate set of rows, those sharing the most hash bands with the input, up to `candidates` per
input. Their logits are exact (x · w_c + b_c); every other output gets `fill` (−inf by default, so
a softmax gives it probability 0 and argmax never picks it). Cost per input: hashing (L·K
compares), the lookup, and c·D multiply-adds instead of C·D.

Training touches only candidate rows: `sampled_softmax_loss` scores the candidates plus the true
labels, and the weight and bias gradients are sparse, one row per (input, candidate)
(`fxopt::gathered_linear`), for `torch.optim.SGD` or `torch.optim.SparseAdam`; never a dense
(C, D) gradient. The hash tables follow the weights: every `rebuild_every` training steps the rows
touched since the last rebuild are rehashed and the tables rebuilt (that cost lands in the training
step that triggers it, so timing a run counts it); in eval mode any change of the weights since the
last build (an optimizer step, `load_state_dict`) triggers a full rebuild before the next forward.

What the tables hash per class is `index`: its weight row ("weights", the paper's way), or the
running mean of the inputs labelled with it ("inputs": `observe`, called by `sampled_softmax_loss`
in training steps; call it yourself if you train with another loss). Train with "inputs":
training pushes a row away from the direction its class shares with its confusers, so a trained
row stops ranking its coordinates like its inputs and a weight index loses the true class.

`exact = True` (or `exact(model)`, a context manager) computes the dense layer instead: the
reference to compare against. With `candidates ≥ out_features` every row is a candidate and the
layer equals the dense one (forward and gradients, to float rounding). An input that shares no band
with any row is computed densely rather than returned as all-`fill` (`fxopt::dense_fallback`).

    >>> head = WTAHashedLinear.from_original(nn.Linear(512, 100_000), k=8, num_hashes=128, bands=32,
    ...                                       candidates=128)            # doctest: +SKIP
    >>> loss = sampled_softmax_loss(head, hidden, labels)                 # doctest: +SKIP
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.codegen.wta_hash import band_tables, dense_fallback, gathered_linear, uses_tables, wta_select
from fxopt.wta import WTAHash, band_shape, hash_rows

from . import (Decline, Param, Substitute, SubstituteSpec, int_in, non_negative_int, number_in, one_of, optional,
               positive_int, register)


INDEXES = ("weights", "inputs")


class WTAHashedLinear(Substitute):
    """A linear layer that computes only the outputs whose WTA hash bands collide with the input's."""

    validated_by = "recall"  # fxopt.validate: recall of the dense top-k, not SQNR (the rest is `fill`)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int = 8, num_hashes: int = 128,
                 bands: int = 32, candidates: int = 128, bucket_cap: int | None = 256, rebuild_every: int = 50,
                 fill: float = -math.inf, seed: int = 0, index: str = "weights", index_rate: float = 1 / 64,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        h = WTAHash(in_features, k, num_hashes, bands, seed)
        self.k, self.num_hashes, self.bands, self.seed, self.buckets = k, num_hashes, bands, seed, h.buckets
        self.candidates, self.bucket_cap, self.rebuild_every, self.fill = candidates, bucket_cap, rebuild_every, fill
        if index not in INDEXES:
            raise ValueError(f"index={index!r}: expected one of {', '.join(INDEXES)}")
        if not 0 < index_rate <= 1:
            raise ValueError(f"index_rate={index_rate} must lie in (0, 1]")
        self.index, self.index_rate = index, index_rate
        self.synchronized = False  # set by fxopt.distributed.data_parallel: rebuilds agree across processes
        self.exact = False
        self.rebuilds = 0
        # Derived from the weights and the seed, so not saved in a state_dict; the tables are
        # buffers so that they move with .to() and are captured by torch.export.
        buffer = lambda name, t: self.register_buffer(name, t, persistent=False)  # noqa: E731
        buffer("windows", h.windows.to(device))
        buffer("powers", h.powers.to(device))
        buffer("row_keys", torch.zeros(out_features, bands, dtype=torch.int32, device=device))
        buffer("order", torch.zeros(0, dtype=torch.int32, device=device))
        buffer("starts", torch.zeros(0, dtype=torch.long, device=device))
        buffer("dirty", torch.zeros(out_features, dtype=torch.bool, device=device))
        if index == "inputs":  # learnt from the labels, so saved with the weights
            self.register_buffer("centroids", torch.zeros(out_features, in_features, device=device, dtype=dtype))
            self.register_buffer("seen", torch.zeros(out_features, dtype=torch.long, device=device))
        self._steps = 0
        self._version = None  # weight._version when the tables were last built

    @classmethod
    def from_original(cls, linear: nn.Linear, **params: Any) -> "WTAHashedLinear":
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device=w.device, dtype=w.dtype,
                    **params)
        with torch.no_grad():
            layer.weight.copy_(w)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.rebuild()
        return layer

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, bias={self.bias is not None}, k={self.k}, "
                f"num_hashes={self.num_hashes}, bands={self.bands}, candidates={self.candidates}, index={self.index}")

    def flops(self, input_shape: torch.Size, output_shape: torch.Size) -> int:
        """c·D multiply-adds per input for the candidates (hashing and the lookup are compares and
        reads, not counted: fxopt's FLOPs count only matmuls)."""
        inputs = math.prod(input_shape[:-1])
        return 2 * inputs * min(self.candidates, self.out_features) * self.in_features

    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """(N, bands) bucket keys of the rows of x (N, in_features)."""
        return hash_rows(x, self.windows, self.powers)

    # --- tables ----------------------------------------------------------------------------------

    def index_vectors(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """What the tables hash for each output row (all, or `rows`): its weight row, or with
        `index="inputs"` the running mean of the inputs labelled with it (its weight row until it
        has been seen)."""
        w = self.weight.detach()
        if self.index == "weights":
            return w if rows is None else w[rows]
        if rows is None:
            return torch.where(self.seen[:, None] > 0, self.centroids, w)
        return torch.where(self.seen[rows, None] > 0, self.centroids[rows], w[rows])

    @torch.no_grad()
    def observe(self, x: torch.Tensor, target: torch.Tensor) -> None:
        """`index="inputs"`: fold a labelled batch into the class centroids. A class's centroid
        moves to its batch mean at rate max(n_batch / n_seen, index_rate): the plain mean of
        everything seen while that is short, an exponential moving average after (features of a
        network in training drift). Its row is rehashed at the next scheduled rebuild."""
        if self.index != "inputs" or _tracing():
            return
        x, target = x.detach().reshape(-1, self.in_features), target.reshape(-1)
        classes, inverse, counts = target.unique(return_inverse=True, return_counts=True)
        sums = x.new_zeros(classes.shape[0], self.in_features).index_add_(0, inverse, x)
        self.seen[classes] += counts
        rate = torch.clamp(counts / self.seen[classes], min=self.index_rate).to(x.dtype)[:, None]
        self.centroids[classes] += rate * (sums / counts[:, None].to(x.dtype) - self.centroids[classes])
        self.dirty[classes] = True

    @torch.no_grad()
    def rebuild(self, full: bool = True) -> None:
        """Rehash the rows (all, or those touched by training since the last rebuild) and rebuild
        the tables."""
        w = self.weight.detach()
        if full or self._version is None:
            self.row_keys.copy_(self.keys(self.index_vectors()))
        else:
            if self.synchronized:  # training across processes (fxopt.distributed): the same rows everywhere
                from fxopt.distributed import union_across_processes

                union_across_processes(self.dirty)
            rows = self.dirty.nonzero().squeeze(1)
            if rows.numel():
                self.row_keys[rows] = self.keys(self.index_vectors(rows)).to(torch.int32)
        if uses_tables(w):  # elsewhere collisions are counted densely, with no tables
            self.order, self.starts = band_tables(self.row_keys, self.buckets)
        self.dirty.zero_()
        self._steps, self._version = 0, self.weight._version
        self.rebuilds += 1

    def _refresh(self, training: bool) -> None:
        """The schedule: rehash what training touched every `rebuild_every` steps; in eval, rebuild
        everything when the weights changed since the last build."""
        if _tracing():
            return  # a traced graph uses the tables as they are
        if training:
            if self._steps >= self.rebuild_every:
                self.rebuild(full=False)
            self._steps += 1
        elif self.weight._version != self._version:
            self.rebuild()

    def parameters_for_gradients(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) as the gathered product reads them: their row gradients are sparse, or,
        across processes (`synchronized`), dense, which DDP can all-reduce."""
        if not self.synchronized:
            return self.weight, self.bias
        return _DenseGradient.apply(self.weight), None if self.bias is None else _DenseGradient.apply(self.bias)

    def training_step(self) -> bool:
        """This call is part of a training step: it counts towards the rebuild schedule and the rows
        it scores will be updated."""
        return self.training and torch.is_grad_enabled()

    def _touch(self, rows: torch.Tensor) -> None:
        """These rows get gradients: rehash them at the next scheduled rebuild."""
        if not _tracing():
            self.dirty[rows.reshape(-1)] = True

    # --- candidates and logits -------------------------------------------------------------------

    def select(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate rows of each input row of x (N, in_features): `rows` (N, c) int64, best first,
        and `valid` (N, c) bool (an input with fewer candidates has an invalid tail)."""
        self._refresh(self.training_step())
        n, c = x.shape[0], self.out_features
        if self.candidates >= c:  # every row: the layer is the dense one
            rows = torch.arange(c, device=x.device).expand(n, c)
            return rows, torch.ones(n, c, dtype=torch.bool, device=x.device)
        return wta_select(self.keys(x.detach()), self.row_keys, self.order, self.starts, self.buckets,
                          self.candidates, self.bucket_cap)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exact:
            return F.linear(x, self.weight, self.bias)
        x2 = x.reshape(-1, self.in_features)
        rows, valid = self.select(x2)
        if self.training_step():
            self._touch(rows[valid])
        logits = gathered_linear(x2, *self.parameters_for_gradients(), rows)
        c = self.out_features
        # Invalid entries go to a sink column that is cut off, so no output is written twice.
        out = x2.new_full((x2.shape[0], c + 1), self.fill).scatter_(1, rows.masked_fill(~valid, c), logits)
        out, missing = out[:, :c], ~valid[:, 0]
        if _tracing() or missing.any():  # eager skips the op (and its copy of the output) when it has nothing to do
            out = dense_fallback(out, x2, self.weight, self.bias, missing)
        return out.reshape(*x.shape[:-1], c)


class _DenseGradient(torch.autograd.Function):
    """Identity whose backward turns a sparse gradient dense."""

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        return t.view_as(t)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.to_dense() if grad.is_sparse else grad


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.compiler.is_exporting()


def sampled_softmax_loss(layer: WTAHashedLinear, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over each input's candidate rows and its true label (the sampled softmax the
    paper trains with): equals `F.cross_entropy(layer(x), target)` where the label is a candidate,
    and scores the label against the candidates where it is not. Mean over the inputs."""
    x2, target = x.reshape(-1, layer.in_features), target.reshape(-1)
    if layer.training_step():
        layer.observe(x2, target)
    if layer.exact:
        return F.cross_entropy(F.linear(x2, layer.weight, layer.bias), target)
    rows, valid = layer.select(x2)
    rows = torch.cat([target[:, None], rows], 1)
    keep = torch.cat([torch.ones_like(valid[:, :1]), valid & (rows[:, 1:] != target[:, None])], 1)
    if layer.training_step():
        layer._touch(rows[keep])
    logits = gathered_linear(x2, *layer.parameters_for_gradients(), rows).masked_fill(~keep, -math.inf)
    return F.cross_entropy(logits, torch.zeros_like(target))


@contextmanager
def exact(model: nn.Module, on: bool = True) -> Iterator[None]:
    """Every WTA-hashed layer of `model` computes its dense outputs inside the block."""
    layers = [m for m in model.modules() if isinstance(m, WTAHashedLinear)]
    before = [m.exact for m in layers]
    for m in layers:
        m.exact = on
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.exact = was


# --- the substitute spec -----------------------------------------------------------------------

def _fill(value: Any) -> float:
    if isinstance(value, str) and value.strip().lower() in ("-inf", "-.inf"):
        return -math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"expected a number or -inf, got {value!r}")
    return float(value)


def _check(given: Mapping[str, Any]) -> None:
    p = {param.name: param.default for param in SPEC.params} | dict(given)
    band_shape(p["k"], p["num_hashes"], p["bands"])


def _build(module: nn.Module, params: Mapping[str, Any]) -> nn.Module:
    if not isinstance(module, nn.Linear):
        raise Decline(f"{type(module).__name__} is not a linear layer")
    if params["candidates"] * 4 > module.out_features:
        raise Decline(f"candidates={params['candidates']} is over a quarter of out_features={module.out_features}: "
                      "no saving to be had")
    if params["k"] > module.in_features:
        raise Decline(f"WTA window k={params['k']} is wider than in_features={module.in_features}")
    return WTAHashedLinear.from_original(module, **params)


SPEC = register(SubstituteSpec(
    name="wta_hash",
    summary="WTA-hashed output layer: only the rows whose hash bands collide with the input are computed",
    ops=("linear",),
    params=(
        Param("k", "WTA window: each code is the argmax of k permuted coordinates", int_in(2)),
        Param("num_hashes", "WTA codes per vector (L)", positive_int),
        Param("bands", "LSH bands; each band is num_hashes/bands codes, k^(num_hashes/bands) buckets", positive_int),
        Param("candidates", "rows computed per input: those sharing the most bands", positive_int),
        Param("bucket_cap", "rows read from one bucket at most (null: all)", optional(positive_int)),
        Param("rebuild_every", "training steps between table rebuilds", positive_int),
        Param("fill", "value of the outputs not computed (-inf for softmax/argmax)", _fill),
        Param("seed", "seed of the hash permutations", non_negative_int),
        Param("index", "what the tables hash per class: its weight row (weights) or, once training has shown "
              "it labelled inputs, their running mean (inputs)", one_of(INDEXES)),
        Param("index_rate", "index=inputs: smallest rate at which a class's mean follows its inputs",
              number_in(0.0, 1.0, high_open=False)),
    ),
    build=_build,
    defaults=WTAHashedLinear.__init__,
    exact=None,  # computing every output saves nothing, and build declines it: no exact setting
    check=_check,
))
