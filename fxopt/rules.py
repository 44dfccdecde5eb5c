"""Rule files (YAML, schema version 1) → frozen dataclasses.

A rule file names which layers to rewrite and with what; it holds no code (docs/architecture.md, principle 1):

    version: 1
    rules:
      - name: kron-big-linears
        match:
          op: linear                       # linear | conv1d | conv2d, or a list
          module_type: Linear              # class name (subclasses match); module calls only
          name: "blocks.*"                 # glob(s) on the qualified name
          name_regex: "^blocks\\.[0-9]+\\.fc"
          in_features: {min: 64, divisible_by: 4}
          out_features: {min: 64}          # conv: in_channels, out_channels, kernel_size
          exclude: {first: true, last: true, name: ["head"]}
          feeds: [softmax, output]         # every user of the output is one of these (see match.CONSUMERS)
        substitute: kron
        params: {compression: 8}
        tolerance: {sqnr_db: 3.0}          # max_abs, rel_l2 (≤) · sqnr_db, cosine, recall_at_1/5 (≥)
        require_speedup: 1.2               # keep only if the layer runs ≥ 1.2× faster (measured)
        priority: 0                        # highest wins when several rules match a site
    end_to_end:                            # whole-model checks; --strict fails when one is violated
      top1_agreement: 0.9                  # output tolerances, as a rule's (against the original's outputs)
      metrics: {accuracy: {max_drop: 1.0}} # the model file's evaluate(): max_drop (higher is better) or max_rise
      enforce: true                        # roll back the most harmful sites until every bound holds

A rescale rule file (`fxopt rescale`, fxopt/rescale.py) holds `rescale:` instead of `rules:`, each
entry with `name`, `match`, `min_kernel` and `priority`; either command refuses the other's file
with a line that says which command to use.

Every error names `file:line:column` (positions come from `yaml.compose`, which keeps them).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from . import substitutes
from .errors import RuleError
from .match import CONSUMERS
from .substitutes import OPS

SCHEMA_VERSION = 1
LINEAR_KEYS = ("in_features", "out_features")
CONV_KEYS = ("in_channels", "out_channels", "kernel_size")
METRICS = {"max_abs": "max", "rel_l2": "max", "sqnr_db": "min", "cosine": "min", "top1_agreement": "min",
           "recall_at_1": "min", "recall_at_5": "min"}
# top1_agreement is end to end only; recall_at_k is per site, for substitutes that compute only some
# outputs (wta_hash)
SITE_METRICS = ("max_abs", "rel_l2", "sqnr_db", "cosine", "recall_at_1", "recall_at_5")


@dataclass(frozen=True)
class Bound:
    """A shape predicate: min ≤ value ≤ max and value % divisible_by == 0."""

    min: int | None = None
    max: int | None = None
    divisible_by: int | None = None

    def reason(self, key: str, value: int) -> str | None:
        """Why `value` fails this bound, or None when it passes."""
        if self.min is not None and value < self.min:
            return f"{key}={value} < min {self.min}"
        if self.max is not None and value > self.max:
            return f"{key}={value} > max {self.max}"
        if self.divisible_by is not None and value % self.divisible_by:
            return f"{key}={value} not divisible by {self.divisible_by}"
        return None


@dataclass(frozen=True)
class Exclude:
    first: bool = False  # the first linear/conv site of the graph, in execution order
    last: bool = False  # the last one
    names: tuple[str, ...] = ()
    name_regex: str | None = None


@dataclass(frozen=True)
class Match:
    ops: tuple[str, ...] = OPS
    module_types: tuple[str, ...] = ()
    names: tuple[str, ...] = ()
    name_regex: str | None = None
    shape: tuple[tuple[str, Bound], ...] = ()
    exclude: Exclude = Exclude()
    feeds: tuple[str, ...] = ()  # consumer kinds (match.CONSUMERS); empty: any


@dataclass(frozen=True)
class Tolerance:
    """Per-site acceptance thresholds; unset metrics are not checked."""

    max_abs: float | None = None
    rel_l2: float | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    top1_agreement: float | None = None
    recall_at_1: float | None = None
    recall_at_5: float | None = None

    def violations(self, error: dict[str, float | None]) -> list[str]:
        out = []
        for metric, kind in METRICS.items():
            limit, value = getattr(self, metric), error.get(metric)
            if limit is None:
                continue
            if metric not in error:  # not measurable here (e.g. SQNR of outputs filled with −inf)
                degenerate = error.get("degenerate_reference")
                out.append(f"{metric} not meaningful: the reference output is {degenerate}" if degenerate else
                           f"{metric} not measured (needs {_MEASURED_BY[metric]})")
                continue
            if value is None:  # sqnr of an exact match is None (infinite): passes a minimum
                continue
            if (kind == "max" and value > limit) or (kind == "min" and value < limit):
                op = ">" if kind == "max" else "<"
                out.append(f"{metric} {value:.4g} {op} {limit:g}")
        return out

    def slack(self, error: dict[str, float | None]) -> dict[str, float]:
        """Per set metric, how far the value is inside its limit (negative: violated), over the limit
        for the error sizes (max_abs, rel_l2) and in the metric's own units otherwise; a metric not
        measured is −inf, an exact match's SQNR (None) +inf."""
        out = {}
        for metric, limit in self.as_dict().items():
            value = error.get(metric)
            if value is None or math.isnan(value):
                out[metric] = math.inf if metric in error and value is None else -math.inf
                continue
            scale = max(abs(limit), 1e-9) if metric in ("max_abs", "rel_l2") else 1.0
            out[metric] = (limit - value if METRICS[metric] == "max" else value - limit) / scale
        return out

    def as_dict(self) -> dict[str, float]:
        return {k: getattr(self, k) for k in METRICS if getattr(self, k) is not None}


_SPARSE = "a substitute that computes only some outputs (wta_hash)"
_MEASURED_BY = {m: "outputs without a −inf fill" for m in ("max_abs", "rel_l2", "sqnr_db", "cosine")} | {
    "top1_agreement": "a classifier-shaped output (N × C)", "recall_at_1": _SPARSE, "recall_at_5": _SPARSE}


@dataclass(frozen=True)
class Rule:
    name: str
    match: Match
    substitute: str
    params: tuple[tuple[str, Any], ...]
    tolerance: Tolerance
    priority: int
    index: int  # position in the file; breaks priority ties (earlier wins)
    where: str  # "file:line"
    require_speedup: float | None = None  # the gate: original time / substitute time, at least

    @property
    def param_dict(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class MetricBound:
    """A bound on a metric of the user's `evaluate()`: how far it may move the wrong way, in the
    metric's own units (`max_drop`: higher is better, e.g. accuracy; `max_rise`: lower is better,
    e.g. perplexity or loss)."""

    name: str
    limit: float
    higher_is_better: bool
    where: str  # "file:line" of the bound, for errors

    def worse(self, before: float, after: float) -> float:
        """How far the metric moved the wrong way (NaN when it was not measured)."""
        return before - after if self.higher_is_better else after - before

    def slack(self, before: float, after: float) -> float:
        """The allowance left, over the allowance (negative: violated; −inf: not measured)."""
        worse = self.worse(before, after)
        return -math.inf if math.isnan(worse) else (self.limit - worse) / max(self.limit, 1e-9)

    def violation(self, before: float, after: float) -> str | None:
        worse = self.worse(before, after)
        if math.isnan(worse) or worse > self.limit:
            key = "max_drop" if self.higher_is_better else "max_rise"
            return f"{self.name} {before:.4g} → {after:.4g} ({after - before:+.4g}), beyond {key} {self.limit:g}"
        return None


@dataclass(frozen=True)
class RuleSet:
    source: str
    rules: tuple[Rule, ...] = field(default_factory=tuple)
    end_to_end: Tolerance = Tolerance()  # checked on the whole model's outputs (`--strict`)
    metrics: tuple[MetricBound, ...] = ()  # bounds on the user's evaluate() metrics
    enforce: bool = False  # roll back the most harmful sites until every end-to-end bound holds


# --- reading YAML nodes with positions ---------------------------------------------------

class _Reader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, node: yaml.Node, message: str) -> RuleError:
        mark = node.start_mark
        return RuleError(self.source, mark.line + 1, mark.column + 1, message)

    def mapping(self, node: yaml.Node, what: str, allowed: tuple[str, ...] | None,
                required: tuple[str, ...] = ()) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        """A mapping's entries by key; `allowed` None: any string key."""
        if not isinstance(node, yaml.MappingNode):
            raise self.fail(node, f"{what} must be a mapping")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, value in node.value:
            name = key.value if isinstance(key, yaml.ScalarNode) else None
            if name is None and allowed is None:
                raise self.fail(key, f"keys of {what} must be names")
            if allowed is not None and name not in allowed:
                raise self.fail(key, f"unknown key {name!r} in {what} (allowed: {', '.join(allowed)})")
            if name in out:
                raise self.fail(key, f"duplicate key {name!r} in {what}")
            out[name] = (key, value)
        for name in required:
            if name not in out:
                raise self.fail(node, f"{what} is missing required key {name!r}")
        return out

    def plain(self, node: yaml.Node) -> Any:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)

    def scalar(self, node: yaml.Node, what: str, kind: type) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a {kind.__name__}")
        value = self.plain(node)
        if kind is float and isinstance(value, str):  # PyYAML reads 1e-3 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
            raise self.fail(node, f"{what} must be a {kind.__name__}, got {value!r}")
        return value

    def strings(self, node: yaml.Node, what: str) -> tuple[str, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        return tuple(self.scalar(item, what, str) for item in items)

    def regex(self, node: yaml.Node, what: str) -> str:
        pattern = self.scalar(node, what, str)
        try:
            re.compile(pattern)
        except re.error as exc:
            raise self.fail(node, f"{what} is not a valid regular expression: {exc}") from None
        return pattern


def _bound(r: _Reader, node: yaml.Node, key: str) -> Bound:
    fields = r.mapping(node, key, ("min", "max", "divisible_by"))
    values = {}
    for name, (_, value) in fields.items():
        values[name] = r.scalar(value, f"{key}.{name}", int)
        if values[name] < (1 if name == "divisible_by" else 0):
            raise r.fail(value, f"{key}.{name} must be {'positive' if name == 'divisible_by' else '≥ 0'}")
    if values.get("min") is not None and values.get("max") is not None and values["min"] > values["max"]:
        raise r.fail(node, f"{key}: min {values['min']} > max {values['max']}")
    return Bound(**values)


def _exclude(r: _Reader, node: yaml.Node) -> Exclude:
    fields = r.mapping(node, "exclude", ("first", "last", "name", "name_regex"))
    return Exclude(
        first=r.scalar(fields["first"][1], "exclude.first", bool) if "first" in fields else False,
        last=r.scalar(fields["last"][1], "exclude.last", bool) if "last" in fields else False,
        names=r.strings(fields["name"][1], "exclude.name") if "name" in fields else (),
        name_regex=r.regex(fields["name_regex"][1], "exclude.name_regex") if "name_regex" in fields else None,
    )


def _match(r: _Reader, node: yaml.Node) -> Match:
    allowed = ("op", "module_type", "name", "name_regex", "exclude", "feeds") + LINEAR_KEYS + CONV_KEYS
    fields = r.mapping(node, "match", allowed)
    ops = OPS
    if "op" in fields:
        ops = r.strings(fields["op"][1], "match.op")
        for op in ops:
            if op not in OPS:
                raise r.fail(fields["op"][1], f"unknown op {op!r} (known: {', '.join(OPS)})")
    shape = []
    for key in LINEAR_KEYS + CONV_KEYS:
        if key in fields:
            family = ("linear",) if key in LINEAR_KEYS else ("conv1d", "conv2d")
            if not set(ops) & set(family):
                raise r.fail(fields[key][0], f"{key} applies to {'/'.join(family)}, but the rule matches only {', '.join(ops)}")
            shape.append((key, _bound(r, fields[key][1], key)))
    return Match(
        ops=ops,
        module_types=r.strings(fields["module_type"][1], "match.module_type") if "module_type" in fields else (),
        names=r.strings(fields["name"][1], "match.name") if "name" in fields else (),
        name_regex=r.regex(fields["name_regex"][1], "match.name_regex") if "name_regex" in fields else None,
        shape=tuple(shape),
        exclude=_exclude(r, fields["exclude"][1]) if "exclude" in fields else Exclude(),
        feeds=_feeds(r, fields["feeds"][1]) if "feeds" in fields else (),
    )


def _feeds(r: _Reader, node: yaml.Node) -> tuple[str, ...]:
    kinds = r.strings(node, "match.feeds")
    for kind in kinds:
        if kind not in CONSUMERS:
            raise r.fail(node, f"unknown consumer {kind!r} in match.feeds (known: {', '.join(CONSUMERS)})")
    return kinds


def _tolerance(r: _Reader, node: yaml.Node, what: str, metrics: tuple[str, ...]) -> Tolerance:
    return _tolerance_fields(r, r.mapping(node, what, metrics), what)


def _tolerance_fields(r: _Reader, fields: dict[str, tuple[yaml.Node, yaml.Node]], what: str) -> Tolerance:
    """A Tolerance from a mapping's entries already read (metric name → (key, value) nodes)."""
    values = {k: r.scalar(v, f"{what}.{k}", float) for k, (_, v) in fields.items()}
    for k, (_, v) in fields.items():
        if k in ("max_abs", "rel_l2") and values[k] < 0 or k == "cosine" and not -1 <= values[k] <= 1 \
                or k in ("top1_agreement", "recall_at_1", "recall_at_5") and not 0 <= values[k] <= 1:
            raise r.fail(v, f"{what}.{k} out of range: {values[k]:g}")
    return Tolerance(**values)


def _params(r: _Reader, node: yaml.Node | None, spec: substitutes.SubstituteSpec) -> dict[str, Any]:
    if node is None:
        return spec.parse_params({})
    fields = r.mapping(node, f"params of {spec.name!r}", tuple(p.name for p in spec.params))
    for name, (_, value) in fields.items():  # each value alone first, to point at the bad one
        try:
            spec.param(name).parse(r.plain(value))
        except ValueError as exc:
            raise r.fail(value, f"params.{name}: {exc.args[0]}") from None
    try:
        return spec.parse_params({name: r.plain(value) for name, (_, value) in fields.items()})
    except (ValueError, KeyError) as exc:
        raise r.fail(node, f"params: {exc.args[0]}") from None


def _rule(r: _Reader, node: yaml.Node, index: int) -> Rule:
    allowed = ("name", "match", "substitute", "params", "tolerance", "require_speedup", "priority")
    fields = r.mapping(node, f"rule #{index + 1}", allowed, required=("substitute",))
    sub_node = fields["substitute"][1]
    try:
        spec = substitutes.get(r.scalar(sub_node, "substitute", str))
    except KeyError as exc:
        raise r.fail(sub_node, exc.args[0]) from None
    match = _match_within(r, fields, spec.ops, lambda bad: f"substitute {spec.name!r} cannot replace {bad}")
    params = _params(r, fields["params"][1] if "params" in fields else None, spec)
    speedup = None
    if "require_speedup" in fields:
        speedup = r.scalar(fields["require_speedup"][1], "require_speedup", float)
        if not speedup > 0:
            raise r.fail(fields["require_speedup"][1], f"require_speedup must be > 0, got {speedup:g}")
    return Rule(
        name=_name(r, fields, f"rule{index + 1}"),
        match=match,
        substitute=spec.name,
        params=tuple(params.items()),
        tolerance=_tolerance(r, fields["tolerance"][1], "tolerance", SITE_METRICS) if "tolerance" in fields else Tolerance(),
        priority=_priority(r, fields),
        index=index,
        where=f"{r.source}:{node.start_mark.line + 1}",
        require_speedup=speedup,
    )


def _match_within(r: _Reader, fields: dict, ops: tuple[str, ...], refuse) -> Match:
    """An entry's `match:`, its ops narrowed to `ops` when none are given; `refuse(bad ops)` is the
    message when it names others."""
    match = _match(r, fields["match"][1]) if "match" in fields else Match()
    if len(match.ops) == len(OPS):  # no op given: whatever the entry can act on
        return replace(match, ops=ops)
    bad = set(match.ops) - set(ops)
    if bad:
        raise r.fail(fields["match"][1], refuse(", ".join(sorted(bad))))
    return match


def _name(r: _Reader, fields: dict, default: str) -> str:
    return r.scalar(fields["name"][1], "name", str) if "name" in fields else default


def _priority(r: _Reader, fields: dict) -> int:
    return r.scalar(fields["priority"][1], "priority", int) if "priority" in fields else 0


RESCALE_HINT = ("kernel rescaling is not a per-layer substitute: it rewrites the whole model for inputs N times "
                "smaller, to train there first; run `fxopt rescale MODEL.py --factor N --rules {source} --out DIR`")


def _root(r: _Reader, text: str, required: tuple[str, ...]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """The top-level mapping of a rule file (`required`: `version` and its list key), version checked."""
    try:
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        raise RuleError(r.source, line, col, f"invalid YAML: {exc.problem or exc.context}") from None
    if root is None:
        raise RuleError(r.source, 1, 1, "empty rule file")
    fields = r.mapping(root, "the rule file", ("version", "rules", "end_to_end", "rescale"))
    if "version" not in fields:
        raise r.fail(root, "the rule file is missing required key 'version'")
    version_node = fields["version"][1]
    if r.scalar(version_node, "version", int) != SCHEMA_VERSION:
        raise r.fail(version_node, f"unsupported schema version (this fxopt reads version {SCHEMA_VERSION})")
    if "rescale" in fields and "rescale" not in required:
        raise r.fail(fields["rescale"][0], RESCALE_HINT.format(source=r.source))
    if "rules" in fields and "rules" not in required:
        raise r.fail(fields["rules"][0], "a file of substitution rules, not of rescale rules: run "
                                         f"`fxopt optimize MODEL.py --rules {r.source}`")
    for key in required:
        if key not in fields:
            raise r.fail(root, f"the rule file is missing required key {key!r}")
    return fields


def _list(r: _Reader, node: yaml.Node, what: str, read) -> tuple:
    """The entries of a rule list, each read by `read(node, index)`; names must be unique."""
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise r.fail(node, f"{what} must be a non-empty list")
    entries = tuple(read(item, i) for i, item in enumerate(node.value))
    seen = {}
    for entry, item in zip(entries, node.value):
        if entry.name in seen:
            raise r.fail(item, f"duplicate rule name {entry.name!r} (first at {seen[entry.name].where})")
        seen[entry.name] = entry
    return entries


def parse(text: str, source: str = "<rules>") -> RuleSet:
    """Parse rule-file text; raises RuleError naming source:line:column."""
    r = _Reader(source)
    fields = _root(r, text, ("version", "rules"))
    rules = _list(r, fields["rules"][1], "rules", lambda node, i: _rule(r, node, i))
    if "end_to_end" not in fields:
        return RuleSet(source=source, rules=rules)
    return _end_to_end(r, fields["end_to_end"][1], RuleSet(source=source, rules=rules))


def _end_to_end(r: _Reader, node: yaml.Node, ruleset: RuleSet) -> RuleSet:
    """`end_to_end`: output tolerances (as a rule's), `metrics` (bounds on evaluate()'s) and `enforce`."""
    fields = r.mapping(node, "end_to_end", (*METRICS, "metrics", "enforce"))
    bounds, enforce = (), False
    if "metrics" in fields:
        bounds = tuple(_metric_bound(r, key, value) for key, value in
                       r.mapping(fields["metrics"][1], "end_to_end.metrics", None).values())
    if "enforce" in fields:
        enforce = r.scalar(fields["enforce"][1], "end_to_end.enforce", bool)
    tolerance = _tolerance_fields(r, {k: v for k, v in fields.items() if k in METRICS}, "end_to_end")
    if enforce and not (bounds or tolerance.as_dict()):
        raise r.fail(fields["enforce"][1], "end_to_end.enforce needs a bound to enforce (a metric in "
                                           "end_to_end.metrics, or an output tolerance such as top1_agreement)")
    return replace(ruleset, end_to_end=tolerance, metrics=bounds, enforce=enforce)


def _metric_bound(r: _Reader, key: yaml.Node, node: yaml.Node) -> MetricBound:
    name = r.scalar(key, "a metric name", str)
    what = f"end_to_end.metrics.{name}"
    fields = r.mapping(node, what, ("max_drop", "max_rise"))
    if len(fields) != 1:
        raise r.fail(node, f"{what} needs exactly one of max_drop (higher is better) or max_rise (lower is better)")
    (kind, (_, value)), = fields.items()
    limit = r.scalar(value, f"{what}.{kind}", float)
    if not limit >= 0:
        raise r.fail(value, f"{what}.{kind} must be ≥ 0, got {limit:g}")
    return MetricBound(name, limit, kind == "max_drop", f"{r.source}:{key.start_mark.line + 1}")


# --- rescale rules (fxopt.rescale): which convolutions get smaller kernels -----------------------

@dataclass(frozen=True)
class RescaleRule:
    """Convolutions this rule claims get kernels of about k/factor taps per axis, where they have
    at least `min_kernel` taps along it (smaller kernels keep their size)."""

    name: str
    match: Match
    min_kernel: int
    priority: int
    index: int
    where: str


@dataclass(frozen=True)
class RescaleRules:
    source: str
    rules: tuple[RescaleRule, ...]


RESCALE_OPS = ("conv2d",)


def _rescale_rule(r: _Reader, node: yaml.Node, index: int) -> RescaleRule:
    fields = r.mapping(node, f"rescale rule #{index + 1}", ("name", "match", "min_kernel", "priority"))
    match = _match_within(r, fields, RESCALE_OPS, lambda bad: f"rescaling resizes {', '.join(RESCALE_OPS)} kernels only")
    min_kernel = 5
    if "min_kernel" in fields:
        min_kernel = r.scalar(fields["min_kernel"][1], "min_kernel", int)
        if min_kernel < 2:
            raise r.fail(fields["min_kernel"][1], f"min_kernel must be ≥ 2 (a 1-tap kernel cannot shrink), got {min_kernel}")
    return RescaleRule(
        name=_name(r, fields, f"rescale{index + 1}"), match=match, min_kernel=min_kernel, priority=_priority(r, fields),
        index=index, where=f"{r.source}:{node.start_mark.line + 1}")


def parse_rescale(text: str, source: str = "<rules>") -> RescaleRules:
    """Parse a rescale rule file (`version` and a `rescale:` list); errors name source:line:column."""
    r = _Reader(source)
    fields = _root(r, text, ("version", "rescale"))
    return RescaleRules(source, _list(r, fields["rescale"][1], "rescale", lambda node, i: _rescale_rule(r, node, i)))


def shipped() -> dict[str, Path]:
    """Rule files shipped with fxopt, by stem (`kron` → …/rules/kron.yaml)."""
    folder = resources.files("fxopt.rulesets")
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def _read(spec: str | Path) -> tuple[str, str]:
    """(text, source) of a rule file given by path or shipped name."""
    path = Path(spec)
    if not path.exists() and isinstance(spec, str) and spec in shipped():
        path = shipped()[spec]
    if not path.is_file():
        known = ", ".join(sorted(shipped()))
        raise RuleError(str(spec), 1, 1, f"no such rule file (shipped rule sets: {known})")
    try:
        return path.read_text(encoding="utf-8"), str(spec)
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleError(str(spec), 1, 1, f"cannot read rule file: {exc}") from None


def load(spec: str | Path | RuleSet) -> RuleSet:
    """A RuleSet from a path, a shipped rule set's name (`"kron"`), or a RuleSet (returned as is)."""
    return spec if isinstance(spec, RuleSet) else parse(*_read(spec))


def load_rescale(spec: str | Path | RescaleRules) -> RescaleRules:
    """Rescale rules from a path, a shipped name (`"rescale"`), or RescaleRules (returned as is)."""
    return spec if isinstance(spec, RescaleRules) else parse_rescale(*_read(spec))


def load_any(spec: str | Path) -> RuleSet | RescaleRules:
    """Either kind of rule file, told apart by its `rescale:` key (`fxopt rules check`)."""
    text, source = _read(spec)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        root = None  # parse reports it with its position
    keys = {k.value for k, _ in root.value} if isinstance(root, yaml.MappingNode) else set()
    return parse_rescale(text, source) if "rescale" in keys else parse(text, source)
