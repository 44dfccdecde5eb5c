"""Shipped rule sets (data), installed as `fxopt.rulesets`; use them by name: `--rules kron`."""
