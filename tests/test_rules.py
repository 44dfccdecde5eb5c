"""Rule language: parsing, defaults, and an error with file:line:column for every bad input."""

import pytest

from fxopt import rules
from fxopt.errors import RuleError

GOOD = """\
version: 1
rules:
  - name: big
    match:
      op: [linear]
      module_type: Linear
      name: ["blocks.*", "head"]
      name_regex: "^blocks\\\\.[0-9]+"
      in_features: {min: 64, max: 4096, divisible_by: 4}
      exclude: {first: true, name: "blocks.0*"}
    substitute: kron
    params: {rank: 2, factors: {out: [8, 8], in: [8, 8]}}
    tolerance: {sqnr_db: 10, max_abs: 1e-3}
    priority: 5
  - substitute: kron
end_to_end: {top1_agreement: 0.95}
"""


def test_parses_every_field():
    rs = rules.parse(GOOD, "good.yaml")
    big, second = rs.rules
    assert big.match.ops == ("linear",) and big.match.module_types == ("Linear",)
    assert big.match.names == ("blocks.*", "head") and big.match.name_regex == r"^blocks\.[0-9]+"
    assert dict(big.match.shape)["in_features"] == rules.Bound(64, 4096, 4)
    assert big.match.exclude == rules.Exclude(first=True, names=("blocks.0*",))
    assert big.param_dict == {"rank": 2, "compression": 32.0, "factors": {"out": (8, 8), "in": (8, 8)},
                              "max_flops_ratio": 1.0}
    assert big.tolerance == rules.Tolerance(max_abs=1e-3, sqnr_db=10.0)  # "1e-3" coerced
    assert big.priority == 5 and big.where == "good.yaml:3"
    assert second.name == "rule2" and second.match.ops == ("linear", "conv1d", "conv2d")
    assert rs.end_to_end.top1_agreement == 0.95


def test_shipped_rule_sets_load_by_name_and_path():
    assert {"kron", "lowrank", "separable", "bottleneck"} <= set(rules.shipped())
    by_name = rules.load("kron")
    assert by_name.rules and by_name.rules[0].substitute == "kron"
    by_path = rules.load(str(rules.shipped()["kron"]))
    assert [r.params for r in by_path.rules] == [r.params for r in by_name.rules]


def body(rule: str, top: str = "") -> str:
    return "version: 1\nrules:\n" + rule + top


@pytest.mark.parametrize("text, where, message", [
    ("version: 1\nrules: [\n", (3, 1), "invalid YAML"),
    ("", (1, 1), "empty rule file"),
    ("version: 2\nrules: []\n", (1, 10), "unsupported schema version"),
    ("version: 1\n", (1, 1), "missing required key 'rules'"),
    ("version: 1\nrules: []\n", (2, 8), "non-empty list"),
    ("version: 1\nrules: {}\nextra: 1\n", (3, 1), "unknown key 'extra'"),
    (body("  - substitute: nope\n"), (3, 17), "unknown substitute 'nope' (known: binary, bottleneck, kron, lowrank, separable, wta_hash)"),
    (body("  - match: {op: linear}\n"), (3, 5), "missing required key 'substitute'"),
    (body("  - substitute: kron\n    colour: red\n"), (4, 5), "unknown key 'colour' in rule #1"),
    (body("  - substitute: kron\n    match: {op: conv3d}\n"), (4, 17), "unknown op 'conv3d'"),
    (body("  - substitute: kron\n    match: {op: linear, in_channels: {min: 3}}\n"), (4, 25),
     "in_channels applies to conv1d/conv2d"),
    (body("  - substitute: kron\n    match: {in_features: {min: many}}\n"), (4, 32), "in_features.min must be a int"),
    (body("  - substitute: kron\n    match: {in_features: {min: 9, max: 3}}\n"), (4, 26), "min 9 > max 3"),
    (body("  - substitute: kron\n    match: {in_features: {divisible_by: 0}}\n"), (4, 41), "must be positive"),
    (body("  - substitute: kron\n    match: {name_regex: '('}\n"), (4, 25), "not a valid regular expression"),
    (body("  - substitute: kron\n    match: {exclude: {first: yes please}}\n"), (4, 30), "exclude.first must be a bool"),
    (body("  - substitute: kron\n    params: {rank: 0}\n"), (4, 20), "params.rank: expected a positive integer"),
    (body("  - substitute: kron\n    params: {rank: two}\n"), (4, 20), "params.rank"),
    (body("  - substitute: kron\n    params: {compression: 0.5}\n"), (4, 27), "greater than 1"),
    (body("  - substitute: kron\n    params: {factors: [2, 2]}\n"), (4, 23), "params.factors"),
    (body("  - substitute: kron\n    params: {alpha: 1}\n"), (4, 14), "unknown key 'alpha' in params of 'kron'"),
    (body("  - substitute: kron\n    params: {rank: 2, compression: 4}\n"), (4, 13), "either 'rank' or 'compression'"),
    (body("  - substitute: kron\n    tolerance: {sqnr: 3}\n"), (4, 17), "unknown key 'sqnr'"),
    (body("  - substitute: kron\n    tolerance: {cosine: 2}\n"), (4, 25), "tolerance.cosine out of range"),
    (body("  - substitute: kron\n    tolerance: {top1_agreement: 0.9}\n"), (4, 17), "unknown key 'top1_agreement'"),
    (body("  - substitute: kron\n    tolerance: {max_abs: small}\n"), (4, 26), "must be a float"),
    (body("  - substitute: kron\n    priority: high\n"), (4, 15), "priority must be a int"),
    (body("  - {name: a, substitute: kron}\n  - {name: a, substitute: kron}\n"), (4, 5), "duplicate rule name 'a'"),
    (body("  - substitute: kron\n    substitute: kron\n"), (4, 5), "duplicate key 'substitute'"),
    (body("  - substitute: kron\n", "end_to_end: {cosine: high}\n"), (4, 22), "end_to_end.cosine must be a float"),
])
def test_errors_name_file_line_column(text, where, message):
    with pytest.raises(RuleError) as info:
        rules.parse(text, "bad.yaml")
    err = info.value
    assert (err.line, err.column) == where, str(err)
    assert message in str(err)
    assert str(err).startswith(f"bad.yaml:{where[0]}:{where[1]}: ")
    assert "\n" not in str(err)


def test_missing_file_names_the_shipped_sets(tmp_path):
    with pytest.raises(RuleError, match="no such rule file .*shipped rule sets: binary, bottleneck, kron, lowrank, rescale"):
        rules.load(str(tmp_path / "missing.yaml"))


def test_tolerance_violations():
    tol = rules.Tolerance(max_abs=0.1, sqnr_db=20, cosine=0.99)
    assert tol.violations({"max_abs": 0.05, "sqnr_db": 30.0, "cosine": 0.999}) == []
    assert tol.violations({"max_abs": 0.2, "sqnr_db": 10.0, "cosine": 0.9}) == [
        "max_abs 0.2 > 0.1", "sqnr_db 10 < 20", "cosine 0.9 < 0.99"]
    assert tol.violations({"max_abs": 0.0, "sqnr_db": None, "cosine": 1.0}) == []  # exact: infinite SQNR
