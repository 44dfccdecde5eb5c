"""Installed as the package `fxopt.console` (see pyproject.toml), whose one module is `cli.py`.

The repository root doubles as that package so that the top-level `cli.py` of the project layout
installs as `fxopt.console.cli` and no generic `cli` module lands in site-packages.
"""
